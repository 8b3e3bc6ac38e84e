"""The takeover's steps, in order, in two plans: name, title, function, and where a rerun resumes.

Each step is a function `step_NAME(ctx)` in the module of this package named for it, taking
the run's `Context` (context.py) and returning plain data for the journal. `runbook.py` runs the
plan its run's options choose (`plan_for`), and the journal, the report and the progress display
take each step's name and title from it: adding or reordering a step is one edit to a plan. A
step imports no step that runs after it in either plan; what two steps share is in
`takeover/host` (or `agent`, `guest`), or in `context.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import TakeoverConfig
from ..journal import Journal
from .checkpoint import step_checkpoint
from .context import Context
from .find_vm import step_find_vm
from .first_boot import step_first_boot
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
    report = build_report(ctx.journal, ctx.host_dir, plan_of(ctx.journal).titles)
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


@dataclass(frozen=True)
class Plan:
    """One order of the steps; a run keeps the plan its saved options chose (`plan_for`)."""

    name: str
    steps: tuple[Step, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(step.name for step in self.steps)

    @property
    def titles(self) -> dict[str, str]:
        return {step.name: step.title for step in self.steps}

    @property
    def resume_points(self) -> frozenset[str]:
        """A step a rerun starts from invalidates what the steps after it produced."""
        return frozenset(step.resume_from for step in self.steps if step.resume_from)

    def first_step_to_run(self, journal: Journal) -> str | None:
        """The step a rerun starts from, or None when every step is done.

        A step's resume point applies only once it has begun: what it distrusts is its own half-done
        work. One that never began starts itself (the cut-over's checkpoint, after an interrupted
        preparation, checks on its own that the agent's QEMU is still the one step 1 found).
        """
        for step in self.steps:
            if not journal.done(step.name):
                begun = bool(journal.entry(step.name).get("status"))
                return (step.resume_from if begun else None) or step.name
        return None

    def steps_to_run(self, journal: Journal) -> list[Step]:
        start = self.first_step_to_run(journal)
        return [] if start is None else list(self.steps[self.names.index(start) :])


# The cut-over (the default): the host's VM is built, booted in private, checked and saved while the
# agent's still serves; then the agent's stops and the host's resumes on its address within a second.
# A rerun after an interrupted first boot builds the disk again (a half-booted disk is not trusted);
# the agent's VM was never touched, so nothing else is redone, and a preparation that finished is kept.
CUT_OVER = Plan(
    "cut-over",
    (
        Step("find_vm", "find and check the agent's VM", step_find_vm),
        Step("scrub", "build the host's disk (the agent's VM still serves)", step_scrub),
        Step("first_boot", "boot it in private, check it, save it booted", step_first_boot, resume_from="scrub"),
        Step("checkpoint", "checkpoint and stop the agent's VM", step_checkpoint, resume_from="find_vm"),
        Step("restart", "resume the host's VM on the proxy's address", step_restart),
        Step("verify", "verify the new VM", step_verify, resume_from="restart"),
        Step("relocate", "copy the agent's disk to the host, for the record", step_relocate),
        Step("revoke", "revoke the agent's leftovers", step_revoke),
        Step("report", "write the report", step_report),
    ),
)

# In order: what the cut-over cannot prepare ahead. --keep-agent-system scrubs the agent's own disk,
# libvirt's domain has no private network to boot in, and a VM nested in an agent machine is served
# back on an address of the machine's bridge (docs/takeover.md).
# A half-scrubbed copy is not trusted (we cannot know which plants were already removed), so
# scrub restarts from a fresh copy; a half-verified VM is restarted, and an unfinished checkpoint
# needs the live VM checked again before anything is sent to its monitor.
IN_ORDER = Plan(
    "in-order",
    (
        Step("find_vm", "find and check the agent's VM", step_find_vm),
        Step("checkpoint", "checkpoint and stop it", step_checkpoint, resume_from="find_vm"),
        Step("relocate", "copy the disk to the host", step_relocate),
        Step("scrub", "scrub and re-key the copy", step_scrub, resume_from="relocate"),
        Step("restart", "start the VM as the host's", step_restart),
        Step("verify", "verify the new VM", step_verify, resume_from="restart"),
        Step("revoke", "revoke the agent's leftovers", step_revoke),
        Step("report", "write the report", step_report),
    ),
)
ALL_NAMES: tuple[str, ...] = tuple(dict.fromkeys(CUT_OVER.names + IN_ORDER.names))


def plan_for(cfg: TakeoverConfig) -> Plan:
    """The cut-over wherever it can run: the host's own system on a blank disk, the qemu runner, a local agent."""
    if cfg.cut_over and cfg.rebuild_system and cfg.runner == "qemu" and cfg.agent_machine is None:
        return CUT_OVER
    return IN_ORDER


def plan_of(journal: Journal) -> Plan:
    """The plan a run follows: chosen by the options it started with, whatever a rerun's command line says."""
    return plan_for(TakeoverConfig.saved(journal.options, journal.path.parent))
