"""`takeover upgrade` without a VM: its command line, its record (upgrade.json), the disk swap and its undoing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from takeover.cli import build_parser, main
from takeover.errors import UpgradeError
from takeover.guest.carry import CarryResult
from takeover.host.store_figures import Figures
from takeover.upgrade import (
    NEW_DISK,
    NEW_PIN,
    OLD_DISK,
    OLD_PIN,
    RECORD_NAME,
    STAGES,
    UpgradeRecord,
    build_identity,
    check_no_unfinished_upgrade,
    load_records,
    save_records,
    summary,
    swap_in,
    swap_out,
)

BEFORE = Figures(secrets=2, agents=1, audit_entries=9, requests={"approved": 1, "pending": 1})


def test_the_command_parses_with_its_hidden_fault_injection(capsys):
    args = build_parser().parse_args(["upgrade", "--host-dir", "/srv/vm", "--fail-after", "carry", "--json"])
    assert (args.command, args.host_dir, args.fail_after, args.json) == ("upgrade", Path("/srv/vm"), "carry", True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["upgrade", "--fail-after", "nowhere"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["upgrade", "--help"])
    shown = capsys.readouterr().out
    assert "--host-dir" in shown and "--fail-after" not in shown  # for tests only


def test_the_stages_stop_the_old_vm_only_after_building_and_counting():
    assert list(STAGES) == ["build", "count", "stop", "carry", "swap", "start", "verify"]


@pytest.mark.root
def test_an_upgrade_needs_a_verified_takeover(tmp_path, capsys):
    host_dir = tmp_path / "host"
    host_dir.mkdir(mode=0o700)
    assert main(["upgrade", "--host-dir", str(host_dir)]) == 1
    assert "holds no verified takeover" in capsys.readouterr().err


def test_the_record_keeps_every_attempt_root_only(tmp_path):
    carried = CarryResult(5, 1, 12345, ["pipe: a FIFO"], "13:13", 20.5)
    first = UpgradeRecord(1.0, "0.1.0+venv.aaaa", "0.1.0+venv.bbbb", "rolled back", 2.0, "swap", "InjectedFault: x")
    second = UpgradeRecord(
        3.0,
        "0.1.0+venv.aaaa",
        "0.1.0+venv.bbbb",
        "upgraded",
        4.0,
        downtime_s=61.2,
        before=BEFORE,
        after=BEFORE,
        carried=carried,
        seconds={"build": 80.0},
    )
    save_records(tmp_path, [first, second])
    assert os.stat(tmp_path / RECORD_NAME).st_mode & 0o777 == 0o600
    assert load_records(tmp_path) == [first, second]
    raw = json.loads((tmp_path / RECORD_NAME).read_text())
    assert raw["upgrades"][1]["downtime_s"] == 61.2 and raw["upgrades"][1]["before"]["requests"]["pending"] == 1


def test_no_record_reads_as_no_attempts(tmp_path):
    assert load_records(tmp_path) == []


def test_a_difference_in_any_figure_is_named():
    lost = Figures(secrets=2, agents=0, audit_entries=9, requests={"approved": 1})
    assert BEFORE.differences(BEFORE) == []
    assert BEFORE.differences(lost) == ["agents: 1 before, 0 after", "pending requests: 1 before, 0 after"]


def test_the_summary_reports_the_builds_and_the_downtime():
    record = UpgradeRecord(1.0, "0.1.0+venv.aaaa", "0.1.0+venv.bbbb", "upgraded", 2.0, downtime_s=61.25, after=BEFORE)
    text = summary(record)
    assert "0.1.0+venv.aaaa -> 0.1.0+venv.bbbb" in text
    assert "downtime:  61.2 s (from the old VM's stop to the new VM's /health)" in text


def test_the_build_identity_is_the_release_and_the_venvs_digest():
    assert build_identity(Path("/h/venv/venv-0123456789abcdef.tar")).endswith("+venv.0123456789abcdef")


def _host_dir(tmp_path: Path) -> Path:
    for name, text in (("disk.qcow2", "old"), (NEW_DISK, "new"), ("known_hosts", "old pin"), (NEW_PIN, "new pin")):
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_swap_keeps_the_old_disk_and_pin_and_is_undone_whole(tmp_path):
    host_dir = _host_dir(tmp_path)
    old_inode = os.stat(host_dir / "disk.qcow2").st_ino
    swap_in(host_dir)
    assert (host_dir / "disk.qcow2").read_text() == "new" and (host_dir / "known_hosts").read_text() == "new pin"
    assert (host_dir / OLD_DISK).read_text() == "old" and (host_dir / OLD_PIN).read_text() == "old pin"
    assert not (host_dir / NEW_DISK).exists() and not (host_dir / NEW_PIN).exists()
    with pytest.raises(UpgradeError, match="an earlier upgrade stopped after swapping the disks"):
        check_no_unfinished_upgrade(host_dir)  # a rerun does not guess which disk is right
    swap_out(host_dir)
    assert (host_dir / "disk.qcow2").read_text() == "old" and (host_dir / "known_hosts").read_text() == "old pin"
    assert os.stat(host_dir / "disk.qcow2").st_ino == old_inode  # the old disk itself, never a copy
    assert sorted(p.name for p in host_dir.iterdir()) == ["disk.qcow2", "known_hosts"]


def test_undoing_before_the_swap_only_deletes_the_new_disk(tmp_path):
    host_dir = _host_dir(tmp_path)
    swap_out(host_dir)
    assert (host_dir / "disk.qcow2").read_text() == "old" and (host_dir / "known_hosts").read_text() == "old pin"
    assert sorted(p.name for p in host_dir.iterdir()) == ["disk.qcow2", "known_hosts"]
