"""Step 2: save the agent's VM as internal snapshot `takeover-checkpoint`, then stop it.

The snapshot (disk and RAM, inside the qcow2) is what `rollback` restarts
from. `quit` then makes QEMU flush and close the qcow2, so the copy in step 3
reads a consistent, unlocked file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vm_image import proc

from ..agent.diskimage import inspect_image
from ..agent.machine import Connection
from ..agent.nested_vm import forward_monitor, nested_alive, nested_snapshots, wait_nested_gone
from ..errors import CheckpointError
from ..host.monitor import Monitor, Peer
from ..host.qmp_jobs import SAVE_TIMEOUT, save_snapshot
from ..models import CHECKPOINT_TAG, SourceVM
from .context import Context

JOB_ID = "takeover-checkpoint-save"
QUIT_TIMEOUT = 120.0


@dataclass(frozen=True)
class CheckpointResult:
    tag: str
    method: str  # "snapshot-save" or "savevm"
    save_seconds: float = 0.0  # 0 when recovered after an interrupted run (runbook.recover_interrupted_checkpoint)
    quit_seconds: float = 0.0


def save_checkpoint_and_stop(source: SourceVM, progress: Callable[[str], None] = lambda _: None) -> CheckpointResult:
    def check_peer(peer: Peer) -> None:
        if peer.pid != source.pid or not proc.alive(source.pid, source.pid_start_ticks):
            raise CheckpointError(
                f"the monitor now belongs to pid {peer.pid}, not the QEMU checked in step 1 (pid {source.pid})",
                hint="rerun `python -m takeover run` to check the VM again",
            )

    with Monitor(Path(source.monitor), check_peer=check_peer) as mon:
        method, save_seconds = _save_and_quit(mon, source, progress)
    started = time.monotonic()
    if not proc.wait_gone(source.pid, source.pid_start_ticks, QUIT_TIMEOUT):
        raise _still_running(source)
    quit_seconds = time.monotonic() - started
    confirm_checkpoint(source)
    return CheckpointResult(CHECKPOINT_TAG, method, round(save_seconds, 3), round(quit_seconds, 3))


def checkpoint_nested(
    source: SourceVM, conn: Connection, host_dir: Path, progress: Callable[[str], None] = lambda _: None
) -> CheckpointResult:
    """The same for a VM nested in an agent machine: its monitor forwarded, its exit and snapshot as it says."""
    if not nested_alive(conn, source.pid, source.pid_start_ticks):
        raise CheckpointError(
            f"the nested QEMU (pid {source.pid}) is no longer running in {source.machine}",
            hint="rerun `python -m takeover run` to find the VM again",
        )
    with Monitor(forward_monitor(conn, source.monitor, host_dir)) as mon:
        method, save_seconds = _save_and_quit(mon, source, progress)
    started = time.monotonic()
    if not wait_nested_gone(conn, source, QUIT_TIMEOUT):
        raise _still_running(source)
    quit_seconds = time.monotonic() - started
    if CHECKPOINT_TAG not in nested_snapshots(conn, source.disk):
        raise CheckpointError(
            f"{source.disk} in {source.machine} has no snapshot {CHECKPOINT_TAG} after the save",
            hint="start the nested VM again (`vm_image launch` in the agent machine) and rerun the takeover",
        )
    return CheckpointResult(CHECKPOINT_TAG, method, round(save_seconds, 3), round(quit_seconds, 3))


def _save_and_quit(mon: Monitor, source: SourceVM, progress: Callable[[str], None]) -> tuple[str, float]:
    """Save the checkpoint (a job where QEMU has one, else HMP savevm), then quit; returns the method and time."""
    started = time.monotonic()
    commands = {c["name"] for c in mon.execute("query-commands")}
    progress(f"saving snapshot {CHECKPOINT_TAG} (disk and {source.memory_mb} MiB of RAM)")
    if "snapshot-save" in commands:
        _save_with_job(mon, source)
        method = "snapshot-save"
    else:
        _save_with_hmp(mon)
        method = "savevm"
    save_seconds = time.monotonic() - started
    # Not vm_image's stop_qemu: a QEMU that will not quit is the agent's, and the takeover stops and says
    # so rather than kill it with its checkpoint maybe half-written (the caller waits, then fails).
    progress("stopping the agent's QEMU (quit flushes and closes the disk)")
    try:
        mon.execute("quit", timeout=30)
    except Exception:  # noqa: BLE001 - QEMU may close the socket before answering; the caller checks the pid
        pass
    return method, save_seconds


def _still_running(source: SourceVM) -> CheckpointError:
    return CheckpointError(
        f"QEMU pid {source.pid} did not exit within {QUIT_TIMEOUT:.0f} s after quit",
        hint="the snapshot is saved; stop that QEMU and rerun `python -m takeover run`",
    )


def confirm_checkpoint(source: SourceVM) -> None:
    """The snapshot must be in the (now closed) disk, or a rollback would have nothing to load."""
    image = inspect_image(Path(source.disk), force_share=True, owner=source.uid)
    if CHECKPOINT_TAG not in image.snapshots:
        raise CheckpointError(
            f"{source.disk} has no snapshot {CHECKPOINT_TAG} after the save",
            hint="start the agent's VM again (`vm_image launch`) and rerun the takeover",
        )


def _save_with_job(mon: Monitor, source: SourceVM) -> None:
    # A snapshot with this tag from an interrupted earlier attempt is replaced.
    save_snapshot(mon, CHECKPOINT_TAG, source.vmstate_node, source.block_nodes, CheckpointError, JOB_ID)


def _save_with_hmp(mon: Monitor) -> None:
    # HMP prints errors as text and still "succeeds" at the QMP level; any output is a failure.
    out = mon.hmp(f"savevm {CHECKPOINT_TAG}", timeout=SAVE_TIMEOUT).strip()
    if out:
        raise CheckpointError(f"savevm failed: {out[-300:]}")


def step_checkpoint(ctx: Context) -> CheckpointResult:
    source = ctx.source
    if source.machine is not None:
        return checkpoint_nested(source, ctx.machine(), ctx.host_dir, ctx.note)
    return save_checkpoint_and_stop(source, ctx.note)
