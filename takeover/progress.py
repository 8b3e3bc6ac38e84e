"""The takeover's progress display: vm_image's, one line per step of `steps.STEPS`, notes indented beneath.

Every line goes through `terminal.printable`: notes and errors quote the agent's strings.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from vm_image.progress import Steps

from .host.terminal import printable
from .steps import NAMES, TITLES


class Progress(Steps):
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        super().__init__(len(NAMES), stream)
        self.started_at: dict[str, float] = {}

    def line(self, text: str) -> None:
        super().line(printable(text))

    def begin(self, step: str) -> None:
        self.started_at[step] = time.monotonic()
        self.started(NAMES.index(step) + 1, TITLES[step])

    def end(self, step: str) -> float:
        seconds = time.monotonic() - self.started_at.get(step, time.monotonic())
        self.finished(seconds)
        return seconds

    def skip(self, step: str, why: str) -> None:
        self.skipped(NAMES.index(step) + 1, TITLES[step], why)

    def fail(self, step: str, error: BaseException) -> None:
        seconds = time.monotonic() - self.started_at.get(step, time.monotonic())
        self.line(f"      FAILED after {seconds:.1f} s: {error}")
