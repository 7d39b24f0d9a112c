"""A dependency-free progress bar: redraws in place on a terminal, one line per epoch in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, total: int, label: str, enabled: bool = True, stream: TextIO | None = None):
        self.total, self.label, self.enabled = max(total, 1), label, enabled
        self.stream = stream or sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, done: int, postfix: str = "") -> None:
        if not (self.enabled and self.interactive):
            return
        now = time.perf_counter()
        if now - self._last_draw < 0.1 and done < self.total:
            return
        self._last_draw = now
        self.stream.write("\r" + self._line(done, postfix))
        self.stream.flush()

    def close(self, postfix: str = "") -> None:
        if not self.enabled:
            return
        prefix = "\r" if self.interactive else ""
        self.stream.write(prefix + self._line(self.total, postfix) + "\n")
        self.stream.flush()

    def _line(self, done: int, postfix: str) -> str:
        width = 24
        filled = int(width * done / self.total)
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "." * (width - filled)
        return f"{self.label} [{bar}] {done}/{self.total} {elapsed:5.1f}s {postfix}".rstrip()
