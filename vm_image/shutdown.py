"""Stopping what we started: a QEMU by one escalation, and a child's whole process group.

A QEMU is asked before it is made to stop, as `qemu.machine` does: the guest powered down
(when the caller wants its disks closed by the guest itself), then QMP `quit` (QEMU flushes
and closes its disks), then SIGTERM (a QEMU whose monitor is gone still exits cleanly on
it), then SIGKILL. Each step only while the process is still the one named by its pid and
start time: after it exits, its pid may be anyone's. Used by `vm_image stop` and by the
takeover's qemu runner (takeover/host/runners.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from . import proc, qmp
from .errors import VmImageError

QUIT_ANSWER_TIMEOUT = 10.0  # seconds for QEMU to accept `quit`; then it exits on its own time


def stop_qemu(
    monitor: Path,
    pid: int,
    *,
    powerdown: float | None,
    quit_wait: float,
    note: Callable[[str], None] = lambda _: None,
) -> str:
    """Stop the QEMU `pid` whose QMP socket is `monitor`; returns how it ended.

    `powerdown`: seconds to wait for the guest to power itself down, or None to skip asking.
    `quit_wait`: seconds to wait for QEMU to exit after `quit`, before signals.
    """
    try:
        ticks = proc.start_ticks(pid)
    except (OSError, ValueError):
        return "exited"
    if powerdown is not None:
        try:
            qmp.execute(monitor, "system_powerdown", timeout=5)
            note(f"asked the guest to power down (waiting up to {powerdown:.0f} s)")
            if proc.wait_gone(pid, ticks, powerdown):
                return "powered down"
        except VmImageError as exc:
            note(f"no clean power-down: {exc}")
    try:
        qmp.execute(monitor, "quit", timeout=QUIT_ANSWER_TIMEOUT)
        if proc.wait_gone(pid, ticks, quit_wait):
            return "quit through QMP"
    except VmImageError:
        pass  # the monitor may be gone or stuck; the signals below do not need it
    return proc.terminate(pid, ticks)


def kill_group(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session `child` leads (started with start_new_session=True) and reap `child`.

    The whole group, even when `child` itself has exited: what it started (a forked helper, a
    process of the agent's) goes with it. Only children we started in a session of their own.
    """
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    child.wait()
