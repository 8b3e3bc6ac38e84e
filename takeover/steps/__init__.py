"""The takeover's steps, in order, in one table: name, title, function, and where a rerun resumes.

Each step is a function `step_NAME(ctx)` in the module of this package named for it, taking
the run's `Context` (context.py) and returning plain data for the journal. `runbook.py` runs the
table, and the journal, the report and the progress display take each step's name and title
from it: adding or reordering a step is one edit to `STEPS`. A step imports no later step; what
two steps share is in `takeover/host` (or `agent`, `guest`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..journal import Journal
from .checkpoint import step_checkpoint
from .context import Context
from .find_vm import step_find_vm
from .relocate import step_relocate
from .report import build_report, summary, write_report
from .restart import step_restart
from .revoke import step_revoke
from .scrub import step_scrub
from .verify import step_verify

# -- the last step: it lists every step, so it is written beside the table ----------------------


@dataclass(frozen=True)
class ReportResult:
    """Step 8's result: where the report is."""

    report: str


def step_report(ctx: Context) -> ReportResult:
    ctx.journal.data["steps"]["report"]["status"] = "done"  # the report lists itself as done
    report = build_report(ctx.journal, ctx.host_dir, TITLES)
    path = write_report(report, ctx.host_dir)
    ctx.summary = summary(report)
    return ReportResult(str(path))


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str  # the journal's key and --fail-after's value
    title: str  # what the progress display and the report call it
    run: Callable[[Context], object]  # returns the step's result, a dataclass the journal keeps (record.py)
    # Where a rerun starts again when it finds this step unfinished (None: the step itself).
    resume_from: str | None = None


# A half-scrubbed copy is not trusted (we cannot know which plants were already removed), so
# scrub restarts from a fresh copy; a half-verified VM is restarted, and an unfinished checkpoint
# needs the live VM checked again before anything is sent to its monitor.
STEPS: tuple[Step, ...] = (
    Step("find_vm", "find and check the agent's VM", step_find_vm),
    Step("checkpoint", "checkpoint and stop it", step_checkpoint, resume_from="find_vm"),
    Step("relocate", "copy the disk to the host", step_relocate),
    Step("scrub", "scrub and re-key the copy", step_scrub, resume_from="relocate"),
    Step("restart", "start the VM as the host's", step_restart),
    Step("verify", "verify the new VM", step_verify, resume_from="restart"),
    Step("revoke", "revoke the agent's leftovers", step_revoke),
    Step("report", "write the report", step_report),
)
NAMES: tuple[str, ...] = tuple(step.name for step in STEPS)
TITLES: dict[str, str] = {step.name: step.title for step in STEPS}
# A step a rerun starts from invalidates what the steps after it produced.
RESUME_POINTS: frozenset[str] = frozenset(step.resume_from for step in STEPS if step.resume_from)


def first_step_to_run(journal: Journal) -> str | None:
    """The step a rerun starts from, or None when every step is done."""
    for step in STEPS:
        if not journal.done(step.name):
            return step.resume_from or step.name
    return None


def steps_to_run(journal: Journal) -> list[Step]:
    start = first_step_to_run(journal)
    return [] if start is None else list(STEPS[NAMES.index(start) :])
