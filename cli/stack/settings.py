"""The settings the stack runs with: LLMP_* resolved once for `up`, addresses, URLs and the admin key."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cli.stack.errors import StackError
from services.common import config

LOCAL_HOSTS = {"", "127.0.0.1", "localhost", "::1", "0.0.0.0"}
TRUE = {"1", "true", "yes", "on"}


def base_env(environ: Mapping[str, str], cwd: Path | None = None) -> dict[str, str]:
    """Every LLMP_* setting (services' and the launcher's) from `environ` over the defaults, with the
    state dir made absolute and the local defaults that depend on it filled in. Pure."""
    variables = config.VARIABLES
    env = {v.name: environ.get(v.name, v.default) for v in variables}
    state = Path(env["LLMP_STATE_DIR"])
    if not state.is_absolute():
        state = (cwd or Path.cwd()) / state
    env["LLMP_STATE_DIR"] = str(state)
    if not env["LLMP_TRITON_MODEL_REPOSITORY"]:
        env["LLMP_TRITON_MODEL_REPOSITORY"] = str(state / "triton-models")
    return env


def child_env(env: Mapping[str, str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a service process: the caller's, without its LLMP_* variables, plus the
    resolved settings the services know (launcher-only variables stay out: services reject them)."""
    source = os.environ if environ is None else environ
    result = {k: v for k, v in source.items() if not k.startswith("LLMP_")}
    result.update({k: v for k, v in env.items() if k in config.DEFAULTS})
    result["PATH"] = f"{Path(sys.executable).parent}:{result.get('PATH', '/usr/bin:/bin')}"
    result["PYTHONUNBUFFERED"] = "1"
    return result


def host_port(address: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' (or a URL) -> (host, port)."""
    if "://" in address:
        parts = urlsplit(address)
        return parts.hostname or "127.0.0.1", parts.port or default_port or 0
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        if default_port is None:
            raise StackError(f"{address!r} has no port")
        return address, default_port
    return host or "127.0.0.1", int(port)


def with_port(url: str, host: str, port: int, default_user: str | None = None) -> str:
    """`url` moved to host:port, keeping user (`default_user` when it has none), password, path and query."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0] or (default_user or "")
    netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact(url: str) -> str:
    """`url` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def admin_key(env: Mapping[str, str]) -> str:
    """LLMP_ADMIN_KEY, else the key in <state>/admin.key, else a new one written there (mode 0600)."""
    if env.get("LLMP_ADMIN_KEY"):
        return env["LLMP_ADMIN_KEY"]
    path = Path(env["LLMP_STATE_DIR"]) / "admin.key"
    if path.exists():
        return path.read_text().strip()
    key = "llmp-admin-" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key
