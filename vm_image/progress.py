"""A step-by-step progress display for long commands: a line when a step starts and when it ends.

vm_image's commands use `step()`; the takeover's display (takeover/progress.py) is this one
with each line escaped, as its notes quote the agent's strings.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO


class Steps:
    def __init__(self, total: int, stream: TextIO = sys.stderr, label: str = "") -> None:
        self.total = total
        self.label = label  # tells this display's steps from those of a command it runs
        self.stream = stream
        self.number = 0
        self.seconds: dict[str, float] = {}

    def line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        self.line(f"      {text}")

    def started(self, number: int, title: str) -> None:
        self.line(f"[{self.label}{number}/{self.total}] {title} ...")

    def skipped(self, number: int, title: str, why: str) -> None:
        self.line(f"[{self.label}{number}/{self.total}] {title}: {why}")

    def finished(self, seconds: float) -> None:
        self.line(f"      {self.label}done in {seconds:.1f} s")

    @contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        self.number += 1
        self.started(self.number, title)
        start = time.monotonic()
        try:
            yield self.note
        except BaseException:
            self.line(f"      {self.label}step {self.number} FAILED after {time.monotonic() - start:.1f} s")
            raise
        self.seconds[title] = round(time.monotonic() - start, 1)
        self.finished(self.seconds[title])
