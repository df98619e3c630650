"""The launcher's one error."""

from __future__ import annotations


class StackError(RuntimeError):
    """`up`/`down` could not do what was asked; the message says why (and shows the failing log)."""
