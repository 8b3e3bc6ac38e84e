"""The progress display: one line per step as it starts and ends, notes indented beneath.

Every line goes through `terminal.printable`: notes and errors quote the agent's strings.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .steps import NAMES, TITLES
from .terminal import printable


class Progress:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.started: dict[str, float] = {}

    def _print(self, text: str) -> None:
        print(printable(text), file=self.stream, flush=True)

    def begin(self, step: str) -> None:
        self.started[step] = time.monotonic()
        self._print(f"[{NAMES.index(step) + 1}/{len(NAMES)}] {TITLES[step]} ...")

    def note(self, text: str) -> None:
        self._print(f"      {text}")

    def end(self, step: str) -> float:
        seconds = time.monotonic() - self.started.get(step, time.monotonic())
        self._print(f"      done in {seconds:.1f} s")
        return seconds

    def skip(self, step: str, why: str) -> None:
        self._print(f"[{NAMES.index(step) + 1}/{len(NAMES)}] {TITLES[step]}: {why}")

    def fail(self, step: str, error: BaseException) -> None:
        seconds = time.monotonic() - self.started.get(step, time.monotonic())
        self._print(f"      FAILED after {seconds:.1f} s: {error}")
