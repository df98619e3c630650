"""Progress bars on stderr for long work (uploads, ingests, training), never on stdout: `--json` output stays
clean for scripts.

On a terminal the bar is redrawn in place (`\\r`); otherwise (a pipe, a log file, CI) it is written as plain
lines, one per tenth of the work, per change of label (a state or phase), and at the end, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30  # characters of the bar itself


def human(value: float, unit: str) -> str:
    """`value` of `unit` for people: bytes scaled to kB/MB/GB, anything else as a whole number."""
    if unit == "bytes":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{int(value)} B"
    return f"{int(value)}"


class Progress:
    """One piece of long work: `update()` as it advances, `close()` when it ends.

    `total` 0 means unknown (no bar, just the count). `tty` None: ask the stream.
    """

    def __init__(self, label: str, total: float = 0, unit: str = "", *, stream: TextIO | None = None,
                 tty: bool | None = None, min_interval: float = 0.1) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.min_interval = min_interval  # seconds between redraws on a terminal
        self.done = 0.0
        self.note = ""
        self._drawn_at = 0.0
        self._last_line = ""  # last plain line written (not on a terminal)
        self._last_tenth = -1
        self._last_label: str | None = None
        self._open = False

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.done / self.total) if self.total > 0 else None

    def render(self) -> str:
        fraction = self.fraction
        amount = human(self.done, self.unit)
        if self.total > 0:
            amount = f"{amount}/{human(self.total, self.unit)}"
        if self.unit and self.unit != "bytes":
            amount += f" {self.unit}"
        parts = [self.label]
        if fraction is not None:
            filled = int(fraction * WIDTH)
            parts.append(f"[{'#' * filled}{'.' * (WIDTH - filled)}] {fraction:4.0%}")
        parts.append(amount)
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def update(self, done: float | None = None, total: float | None = None, note: str | None = None,
               label: str | None = None) -> None:
        if done is not None:
            self.done = done
        if total is not None and total > 0:
            self.total = total
        if note is not None:
            self.note = note
        if label is not None:
            self.label = label
        self._draw(final=False)

    def close(self, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        self._draw(final=True)
        if self.tty and self._open:
            self.stream.write("\n")
            self.stream.flush()
        self._open = False

    def _draw(self, *, final: bool) -> None:
        line = self.render()
        if self.tty:
            now = time.monotonic()
            if not final and now - self._drawn_at < self.min_interval:
                return
            self._drawn_at = now
            self.stream.write("\r\x1b[2K" + line)  # back to the start, clear the line, redraw
            self.stream.flush()
            self._open = True
            return
        fraction = self.fraction
        tenth = int(fraction * 10) if fraction is not None else -1
        if line != self._last_line and (final or self.label != self._last_label or tenth != self._last_tenth):
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_line, self._last_tenth, self._last_label = line, tenth, self.label
