"""The takeover bench's numbers come from the takeover's report and journal, whatever its step list."""

from __future__ import annotations

import pytest

from bench.bench_takeover import BenchError, downtime, takeover_times

TODAY = ["find_vm", "checkpoint", "relocate", "scrub", "restart", "verify", "revoke", "report"]
PREPARED_FIRST = ["find_vm", "scrub", "first_boot", "checkpoint", "restart", "verify", "relocate", "revoke", "report"]


def records(names: list[str], seconds: dict[str, float], t0: float = 1000.0) -> tuple[dict, dict]:
    """A report and a journal of steps run one after the other from t0, each lasting seconds[name] (else 1 s)."""
    steps, entries, at = [], {}, t0
    for name in names:
        took = seconds.get(name, 1.0)
        steps.append({"step": name, "title": name, "status": "done", "duration_s": took})
        entries[name] = {"status": "done", "started": at, "finished": at + took, "duration_s": took}
        at += took
    return {"steps": steps}, {"steps": entries}


def watched(gap_from: float, gap_to: float) -> dict:
    return {
        "interval_s": 0.05,
        "timeout_s": 1.0,
        "longest_gap_s": gap_to - gap_from,
        "gap_started_at": gap_from,
        "gap_ended_at": gap_to,
        "answered_before": True,
        "answered_after": True,
        "polls": 100,
        "ok": 90,
        "failed": 10,
        "gaps": [{"seconds": gap_to - gap_from, "started_at": gap_from, "ended_at": gap_to}],
    }


def test_todays_order_prepares_only_by_finding_the_vm_and_cuts_over_through_the_copy_and_scrub():
    report, journal = records(TODAY, {"find_vm": 2, "checkpoint": 3, "relocate": 20, "scrub": 30, "restart": 10})
    times = takeover_times(report, journal, total_s=70.0)
    assert times.preparation_steps == ["find_vm"] and times.preparation_s == 2
    assert times.cutover_s == 3 + 20 + 30 + 10 + 1  # checkpoint's start to verify's end
    down = downtime(watched(1002.1, 1065.5), times)
    assert down.inside_cutover and down.seconds == pytest.approx(63.4) and down.other_gaps == []


def test_the_prepared_order_counts_the_first_boot_as_preparation_and_a_gap_outside_the_cutover_is_said():
    report, journal = records(PREPARED_FIRST, {"scrub": 30, "first_boot": 40, "checkpoint": 0.5, "restart": 0.3})
    times = takeover_times(report, journal, total_s=80.0)
    assert times.preparation_steps == ["find_vm", "scrub", "first_boot"] and times.preparation_s == 71
    assert times.cutover_s == pytest.approx(0.5 + 0.3 + 1)
    assert downtime(watched(1071.2, 1072.0), times).inside_cutover
    assert not downtime(watched(1031.0, 1060.0), times).inside_cutover  # during the first boot: not the cut-over


def test_a_report_without_a_checkpoint_is_refused_by_name():
    report, journal = records(["find_vm", "verify"], {})
    with pytest.raises(BenchError, match="no step 'checkpoint'"):
        takeover_times(report, journal, total_s=1.0)
