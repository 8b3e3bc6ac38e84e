"""The takeover's progress display: vm_image's, a line per step of the run's plan, notes indented beneath.

Every line goes through `terminal.printable`: notes and errors quote the agent's strings.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from vm_image.progress import Steps

from .host.terminal import printable
from .steps import IN_ORDER, Plan


class Progress(Steps):
    def __init__(self, stream: TextIO = sys.stderr, plan: Plan = IN_ORDER) -> None:
        super().__init__(len(plan.steps), stream)
        self.use(plan)
        self.started_at: dict[str, float] = {}

    @classmethod
    def counting(cls, total: int, stream: TextIO = sys.stderr) -> Progress:
        """A display for a command's own numbered steps (`step()`), such as `takeover upgrade`'s stages."""
        progress = cls(stream)
        progress.total = total
        return progress

    def use(self, plan: Plan) -> None:
        """Number and title the steps of `plan` (the runbook knows it once the journal is open)."""
        self.plan, self.total = plan, len(plan.steps)

    def line(self, text: str) -> None:
        super().line(printable(text))

    def begin(self, step: str) -> None:
        self.started_at[step] = time.monotonic()
        self.started(self.plan.names.index(step) + 1, self.plan.titles[step])

    def end(self, step: str) -> float:
        seconds = time.monotonic() - self.started_at.get(step, time.monotonic())
        self.finished(seconds)
        return seconds

    def skip(self, step: str, why: str) -> None:
        self.skipped(self.plan.names.index(step) + 1, self.plan.titles[step], why)

    def fail(self, step: str, error: BaseException) -> None:
        seconds = time.monotonic() - self.started_at.get(step, time.monotonic())
        self.line(f"      FAILED after {seconds:.1f} s: {error}")
