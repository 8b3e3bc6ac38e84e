"""Waits on something external end: a stuck libguestfs appliance, a stuck QEMU start, each with a clear error.

The stuck appliance is real QEMU started paused (`-S`) in place of libguestfs's
appliance (LIBGUESTFS_HV points at a wrapper): it starts, holds its sockets, prints
nothing and runs no guest instruction, which is what the appliance does on a KVM
that opens but runs nothing (a paravirtual KVM, dmesg `kvm-pvm: loaded`).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from takeover.errors import ScrubError, VerifyError
from takeover.guest.appliance import Watchdog
from takeover.guest.editor import Guest
from takeover.host.ssh import run_bounded
from vm_image.errors import LaunchFailed
from vm_image.launch import start_qemu

QEMU = shutil.which("qemu-system-x86_64")


def paused_appliance_hv(tmp_path: Path) -> Path:
    """A hypervisor for libguestfs: real QEMU for its capability queries, paused QEMU for the appliance."""
    wrapper = tmp_path / "stuck-hv"
    wrapper.write_text(f"""#!/bin/sh
case " $* " in
  *" -kernel "*) echo $$ >> {tmp_path}/appliance.pids; exec {QEMU} "$@" -S ;;
  *) exec {QEMU} "$@" ;;
esac
""")
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.slow
def test_a_stuck_libguestfs_appliance_ends_in_a_clear_error_within_its_deadline(tmp_path, monkeypatch):
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True, timeout=60)
    monkeypatch.setenv("LIBGUESTFS_HV", str(paused_appliance_hv(tmp_path)))
    bystander = subprocess.Popen(["sleep", "120"])  # a child of ours from before the launch: not the appliance's
    try:
        started = time.monotonic()
        with pytest.raises(ScrubError) as err:
            Guest.open(disk, force_tcg=True, launch_timeout=20)
        took = time.monotonic() - started
        assert bystander.poll() is None, "the watchdog killed a process that was not the appliance's"
    finally:
        bystander.kill()
        bystander.wait()
    assert 20 <= took < 50
    message = str(err.value)
    assert f"appliance for {disk} did not start within 20 s under TCG" in message
    assert "Last lines of its log" in message and "LIBGUESTFS_DEBUG=1" in message
    assert "libguestfs-test-tool" in err.value.hint
    [pid] = [int(p) for p in (tmp_path / "appliance.pids").read_text().split()]
    assert not Path(f"/proc/{pid}").exists(), "the stuck appliance's QEMU was left running"


def test_the_watchdog_kills_only_what_was_started_after_it_was_armed():
    older = subprocess.Popen(["sleep", "60"])
    watchdog = Watchdog()
    watchdog.arm_launch(1.0)
    # A child with a child of its own, like supermin building the appliance.
    newer = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(newer.stdout.readline())
        assert newer.wait(10) == -9
        time.sleep(0.2)
        assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text()
        assert watchdog.disarm() and watchdog.what == "launch"
        assert older.poll() is None
    finally:
        for child in (older, newer):
            child.kill()
            child.wait()


def test_a_disarmed_watchdog_kills_nothing():
    watchdog = Watchdog()
    watchdog.arm_launch(0.5)
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert watchdog.disarm() is False
        time.sleep(1)
        assert child.poll() is None and not watchdog.fired
    finally:
        child.kill()
        child.wait()


def test_the_session_watchdog_kills_only_the_appliance_pid():
    appliance = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])
    watchdog = Watchdog()
    watchdog.arm_session(0.5, appliance.pid)
    try:
        assert appliance.wait(10) == -9
        assert other.poll() is None and watchdog.fired and watchdog.what == "session"
    finally:
        other.kill()
        other.wait()


def test_a_qemu_stuck_before_it_daemonizes_ends_in_a_clear_error(tmp_path):
    # A stand-in that never returns and leaves a process holding its output open, as a QEMU stuck
    # before it daemonizes does: reading its output through a pipe would wait for that process too.
    stuck = ["sh", "-c", "sleep 20 & exec sleep 20"]
    started = time.monotonic()
    with pytest.raises(LaunchFailed, match="did not finish starting within 1 s") as err:
        start_qemu(stuck, tmp_path / "qemu.pid", timeout=1)
    assert time.monotonic() - started < 5
    assert "--accel tcg" in err.value.hint


def test_an_ssh_to_a_guest_that_never_answers_ends_in_a_verify_error():
    started = time.monotonic()
    with pytest.raises(VerifyError, match="did not finish within 1 s"):
        run_bounded(["sleep", "30"], timeout=1)
    assert time.monotonic() - started < 5
