"""A step-by-step progress display for long commands: a line when a step starts and when it ends."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO


class Steps:
    def __init__(self, total: int, stream: TextIO = sys.stderr, label: str = "") -> None:
        self.total = total
        self.label = label  # tells this display's steps from those of a command it runs
        self.stream = stream
        self.number = 0
        self.seconds: dict[str, float] = {}

    def note(self, text: str) -> None:
        print(f"      {text}", file=self.stream, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        self.number += 1
        print(f"[{self.label}{self.number}/{self.total}] {title} ...", file=self.stream, flush=True)
        start = time.monotonic()
        try:
            yield self.note
        except BaseException:
            print(f"      {self.label}step {self.number} FAILED after {time.monotonic() - start:.1f} s",
                  file=self.stream, flush=True)
            raise
        self.seconds[title] = round(time.monotonic() - start, 1)
        print(f"      {self.label}done in {self.seconds[title]:.1f} s", file=self.stream, flush=True)
