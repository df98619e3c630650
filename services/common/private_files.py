"""Files only their owner may read (generated keys and secrets), created without a window in which
another user could read them."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def create(path: Path, text: str) -> str:
    """Create `path` holding `text`, readable by its owner only from the first instant (no write-then-chmod
    window, whatever the umask), and whole or absent to readers: written under a temporary name created
    0600, then linked into place, which fails if another process created it meanwhile. Returns the
    file's content: `text`, or the other process's."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return path.read_text()
        return text
    finally:
        temporary.unlink(missing_ok=True)


def read_or_create(path: Path, make: Callable[[], str]) -> str:
    """The stripped content of `path`, created (owner-only) with `make()` when missing; processes racing to
    create it all end up with the one that won."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    return create(path, make() + "\n").strip()
