"""`make clean` and the demo's reset remove what the demo's run made, found from its own records, and
nothing else: not a user it did not create, not an agent machine another run made, and not the host's
VM's files while that VM may still run (scripts/demo.py: clean, reset).

Real users, nftables and network namespaces, as tests/test_egress.py; no VM.
"""

from __future__ import annotations

import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import demo
from takeover.host import egress
from takeover.host.files import ensure_host_dir
from tests.egress_helpers import exists, forget_user
from tests.takeover_helpers import ensure_user

pytestmark = pytest.mark.root

QEMU_USER = "spvm-demo-qemu"
BYSTANDER = "spvm-demo-bystander"  # a user of this machine's that the demo never made
OTHER_MACHINE = 249  # an agent machine index another run holds


def demo_args(host_dir: Path, *more: str) -> object:
    argv = ["--host-dir", str(host_dir), "--qemu-user", QEMU_USER, "--agent-user", BYSTANDER]
    return demo.parse_args([*argv, "--agent-machine-index", str(OTHER_MACHINE), *more])


@pytest.fixture
def demo_env(monkeypatch) -> Iterator[None]:
    monkeypatch.setattr(demo, "PYTHON", sys.executable)  # this checkout's interpreter runs `takeover`
    forget_user(QEMU_USER)
    ensure_user(BYSTANDER)
    yield
    forget_user(QEMU_USER)


def test_clean_removes_the_users_the_demos_run_created_and_keeps_one_it_did_not(demo_env, tmp_path):
    host_dir = ensure_host_dir(tmp_path / "host")
    egress.enforce(egress.new_plan([], QEMU_USER), host_dir)  # as the takeover does: both users made here
    uid = pwd.getpwnam(QEMU_USER).pw_uid
    egress.release(host_dir)  # `takeover stop`
    args = demo_args(host_dir)
    try:
        demo.clean(args)
    finally:
        demo.run_record_path(args).unlink(missing_ok=True)
    assert not exists(QEMU_USER) and not exists(egress.egress_user(uid))  # the forward proxy's user too
    assert egress.table_owner(uid) is None
    assert not host_dir.exists()
    assert exists(BYSTANDER)  # an agent user the demo found is not the demo's to delete


@pytest.fixture
def other_runs_machine(monkeypatch) -> Iterator[list[int]]:
    """Agent machine OTHER_MACHINE's namespace exists (another run's); removals are recorded, not done."""
    subprocess.run(["ip", "netns", "add", f"spvm-am{OTHER_MACHINE}"], check=True, capture_output=True)
    removed: list[int] = []
    monkeypatch.setattr(demo, "remove_agent_machine", removed.append)
    yield removed
    subprocess.run(["ip", "netns", "del", f"spvm-am{OTHER_MACHINE}"], capture_output=True)


def test_reset_leaves_an_agent_machine_its_run_did_not_make(demo_env, other_runs_machine, tmp_path):
    args = demo_args(tmp_path / "host", "--agent-machine")
    demo.reset(args)
    assert other_runs_machine == []
    assert Path(f"/run/netns/spvm-am{OTHER_MACHINE}").exists()


def test_reset_removes_the_agent_machine_its_run_recorded(demo_env, other_runs_machine, tmp_path):
    args = demo_args(tmp_path / "host")
    demo.record_made(args, agent_machine=OTHER_MACHINE)
    try:
        demo.reset(args)
        assert other_runs_machine == [OTHER_MACHINE]
        assert "agent_machine" not in demo.run_record(args)
    finally:
        demo.run_record_path(args).unlink(missing_ok=True)


def test_reset_stops_and_says_so_when_the_host_vm_cannot_be_removed(demo_env, tmp_path):
    host_dir = ensure_host_dir(tmp_path / "host")
    (host_dir / "journal.json").write_text("{")  # `takeover remove` cannot tell what runs: it fails
    (host_dir / "disk.qcow2").write_bytes(b"the VM's disk")
    with pytest.raises(SystemExit) as stopped:
        demo.reset(demo_args(host_dir))
    assert "takeover remove --stop" in str(stopped.value.code) and "may still run" in str(stopped.value.code)
    assert (host_dir / "disk.qcow2").exists()


def test_the_benchs_clean_removes_its_egress_table_and_users_through_takeover_remove(demo_env, tmp_path):
    from bench import bench_takeover

    host_dir = ensure_host_dir(tmp_path / "bench-host")
    egress.enforce(egress.new_plan([], QEMU_USER), host_dir)
    uid = pwd.getpwnam(QEMU_USER).pw_uid
    egress.release(host_dir)  # `takeover stop`
    opts = bench_takeover.parse_args(
        ["--clean", "--host-dir", str(host_dir), "--qemu-user", QEMU_USER, "--agent-user", BYSTANDER]
        + ["--agent-state", str(tmp_path / "no-agent-state")]
    )
    bench_takeover.clean(opts)
    assert egress.table_owner(uid) is None
    assert not exists(QEMU_USER) and not exists(egress.egress_user(uid))
    assert not host_dir.exists() and exists(BYSTANDER)
