"""The journal: atomic, private, and it decides where a rerun resumes."""

from __future__ import annotations

import json
import os
import stat

import pytest

from takeover.config import TakeoverConfig
from takeover.errors import DestinationTaken, JournalError
from takeover.host.files import ensure_host_dir
from takeover.journal import DONE, ROLLED_BACK, Journal, check_destination
from takeover.runbook import open_journal
from takeover.steps import CUT_OVER, IN_ORDER, plan_for, plan_of


@pytest.fixture
def host_dir(tmp_path):
    return ensure_host_dir(tmp_path / "host")


def finished(journal, *steps):
    for step in steps:
        journal.begin(step)
        journal.finish(step, {"ok": step})


def test_journal_is_written_atomically_and_private(host_dir):
    journal = Journal.new(host_dir, {"runner": "qemu"})
    finished(journal, "find_vm")
    st = os.stat(journal.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert [p.name for p in host_dir.iterdir()] == ["journal.json"]  # no temp files left
    loaded = Journal.load(host_dir)
    assert loaded.done("find_vm") and loaded.result("find_vm") == {"ok": "find_vm"}
    assert loaded.entry("find_vm")["duration_s"] >= 0


def first_step_to_run(journal: Journal) -> str | None:
    return plan_of(journal).first_step_to_run(journal)


def test_a_fresh_run_starts_at_step_1(host_dir):
    assert first_step_to_run(Journal.new(host_dir, {})) == "find_vm"


def test_the_cut_over_runs_wherever_it_can(host_dir):
    assert plan_for(TakeoverConfig()) is CUT_OVER  # the default
    for why_not in (
        TakeoverConfig(cut_over=False),  # --in-order
        # --keep-agent-system: the agent's disk is the one scrubbed
        TakeoverConfig(cut_over=True, rebuild_system=False),
        TakeoverConfig(cut_over=True, runner="libvirt"),
        TakeoverConfig(cut_over=True, agent_machine="root@10.213.10.2"),
    ):
        assert plan_for(why_not) is IN_ORDER
    # A journal from before the cut-over existed resumes in order, as it began.
    assert plan_of(Journal.new(host_dir, {"runner": "qemu"})) is IN_ORDER
    assert plan_of(Journal.new(host_dir, TakeoverConfig(cut_over=True).to_dict())) is CUT_OVER


CUT = ["find_vm", "scrub", "first_boot", "checkpoint", "restart", "verify"]
IN = ["find_vm", "checkpoint", "relocate", "scrub", "restart", "verify"]


@pytest.mark.parametrize(
    "cut_over, done, unfinished, resume_at",
    [
        (False, [], "find_vm", "find_vm"),
        # the live VM must be checked again before anything is sent to its monitor
        (False, IN[:1], "checkpoint", "find_vm"),
        (False, IN[:2], "relocate", "relocate"),
        # a half-scrubbed copy is never trusted: copy again
        (False, IN[:3], "scrub", "relocate"),
        (False, IN[:4], "restart", "restart"),
        # a VM that failed verification is restarted
        (False, IN[:5], "verify", "restart"),
        (False, IN[:6], "revoke", "revoke"),
        # the cut-over (--cut-over)
        (True, CUT[:1], "scrub", "scrub"),
        # a first boot that did not finish leaves a disk that booted once, unchecked: build it again
        (True, CUT[:2], "first_boot", "scrub"),
        # the agent's VM was never touched before the checkpoint: it is checked again
        (True, CUT[:3], "checkpoint", "find_vm"),
        (True, CUT[:4], "restart", "restart"),
        (True, CUT[:5], "verify", "restart"),
        (True, CUT[:6], "relocate", "relocate"),
    ],
)
def test_rerun_resumes_where_it_is_safe(host_dir, cut_over, done, unfinished, resume_at):
    plan = CUT_OVER if cut_over else IN_ORDER
    journal = Journal.new(host_dir, TakeoverConfig(cut_over=cut_over).to_dict())
    finished(journal, *done)
    journal.begin(unfinished)
    journal.fail(unfinished, RuntimeError("boom"))
    assert plan_of(journal) is plan and first_step_to_run(journal) == resume_at
    assert [s.name for s in plan.steps_to_run(journal)] == list(plan.names[plan.names.index(resume_at) :])


@pytest.mark.parametrize(
    "cut_over, done, next_step",
    [
        # --fail-after first_boot: the preparation is kept, the agent's VM is checkpointed next
        (True, CUT[:3], "checkpoint"),
        (True, CUT[:2], "first_boot"),
        (True, CUT[:1], "scrub"),
        (False, IN[:1], "checkpoint"),
        (False, IN[:3], "scrub"),
        (False, IN[:5], "verify"),
    ],
)
def test_a_step_that_never_began_is_where_a_rerun_starts(host_dir, cut_over, done, next_step):
    """A resume point distrusts a step's own half-done work; a step that never began has none."""
    plan = CUT_OVER if cut_over else IN_ORDER
    journal = Journal.new(host_dir, TakeoverConfig(cut_over=cut_over).to_dict())
    finished(journal, *done)
    assert first_step_to_run(journal) == next_step
    assert plan.steps_to_run(journal)[0].name == next_step


def test_everything_done_means_nothing_to_run(host_dir):
    for plan in (IN_ORDER, CUT_OVER):
        journal = Journal.new(host_dir, TakeoverConfig(cut_over=plan is CUT_OVER).to_dict())
        finished(journal, *plan.names)
        assert first_step_to_run(journal) is None


def test_a_finished_takeover_is_not_overwritten(host_dir):
    journal = Journal.new(host_dir, {})
    journal.set_state(DONE)
    with pytest.raises(DestinationTaken, match="already holds a taken-over VM"):
        check_destination(Journal.load(host_dir))
    with pytest.raises(DestinationTaken):
        open_journal(TakeoverConfig(host_dir=host_dir), host_dir)


def test_a_disk_without_a_journal_is_not_overwritten(host_dir):
    (host_dir / "disk.qcow2").write_bytes(b"someone's VM")
    with pytest.raises(DestinationTaken, match="no journal"):
        open_journal(TakeoverConfig(host_dir=host_dir), host_dir)


def test_a_rolled_back_journal_is_archived_and_a_new_run_starts(host_dir):
    old = Journal.new(host_dir, {})
    finished(old, "find_vm")
    old.set_state(ROLLED_BACK)
    journal = open_journal(TakeoverConfig(host_dir=host_dir), host_dir)
    assert first_step_to_run(journal) == "find_vm"
    assert any(p.name.startswith("journal-rolled_back-") for p in host_dir.iterdir())


def test_an_in_progress_journal_is_resumed(host_dir):
    old = Journal.new(host_dir, {})
    finished(old, "find_vm", "checkpoint")
    journal = open_journal(TakeoverConfig(host_dir=host_dir), host_dir)
    assert first_step_to_run(journal) == "relocate"


def test_a_corrupt_journal_is_a_clear_error(host_dir):
    (host_dir / "journal.json").write_text("{not json")
    with pytest.raises(JournalError, match="not valid JSON"):
        Journal.load(host_dir)
    (host_dir / "journal.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(JournalError, match="not a version 1"):
        Journal.load(host_dir)


def test_the_report_and_the_progress_display_take_the_steps_from_the_one_table(host_dir):
    import io

    from takeover.progress import Progress
    from takeover.steps.report import build_report

    journal = Journal.new(host_dir, {})
    finished(journal, "find_vm")
    report = build_report(journal, host_dir, IN_ORDER.titles)
    assert [(s["step"], s["title"]) for s in report["steps"]] == [(s.name, s.title) for s in IN_ORDER.steps]
    assert [s["status"] for s in report["steps"][:2]] == ["done", "pending"]
    out = io.StringIO()
    Progress(out).begin("scrub")  # in order, by default
    assert out.getvalue() == f"[4/{len(IN_ORDER.steps)}] scrub and re-key the copy ...\n"
    out = io.StringIO()
    Progress(out, CUT_OVER).begin("first_boot")
    assert out.getvalue() == f"[3/{len(CUT_OVER.steps)}] boot it in private, check it, save it booted ...\n"


def test_the_command_line_chooses_the_plan():
    from takeover.cli import build_parser, config_from_args

    def plan(*extra: str):
        return plan_for(config_from_args(build_parser().parse_args(["run", "--accel", "tcg", *extra])))

    assert plan() is CUT_OVER and plan("--cut-over") is CUT_OVER
    assert plan("--in-order") is IN_ORDER and plan("--keep-agent-system") is IN_ORDER
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(["run", "--cut-over", "--in-order"])
