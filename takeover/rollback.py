"""`python -m takeover rollback`: stop the host's VM and bring the agent's VM back from `takeover-checkpoint`.

Only for an unfinished takeover: once the host's VM is verified the agent's disk may be gone.
The agent's QEMU is started again through agent/replay.py's fences; the host's copy is deleted only
once the agent's VM answers /health again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vm_image import health, proc

from .agent.diskimage import inspect_image
from .agent.machine import connect
from .agent.machine_disk import discard_staging
from .agent.nested_vm import nested_alive, nested_snapshots, restart_nested, wait_nested_health
from .agent.replay import start_source_vm
from .config import TakeoverConfig
from .errors import JournalError, RollbackError, from_vm_image
from .host import egress, serve_back
from .journal import DONE, ROLLED_BACK, Journal
from .models import CHECKPOINT_TAG, SourceVM
from .progress import Progress
from .runbook import require_root
from .steps.context import DISK_NAME, Context, runner_for, vm_spec
from .steps.relocate import PARTIAL_NAME

# The host's files for its VM, besides the disk and the keys: a rollback removes them with the copy.
HOST_FILES = ("qmp.sock", "qemu.pid", "serial.log", "qemu.log", "agent-qmp.sock", "agent-proxy.sock", *egress.FILES)
HEALTH_TIMEOUT = 300.0


def roll_back(cfg: TakeoverConfig, progress: Progress | None = None, *, cold: bool = False) -> dict[str, Any]:
    """Stop the host's VM if any, start the agent's VM from its checkpoint, wait for /health, clean up."""
    require_root()
    progress = progress or Progress()
    host_dir = cfg.host_dir
    journal = _unfinished_journal(host_dir)
    if not journal.done("find_vm"):
        journal.set_state(ROLLED_BACK)
        return {"rolled_back": True, "detail": "nothing had changed (step 1 did not finish)"}
    source = journal.read("find_vm", SourceVM)
    started = time.monotonic()
    _stop_host_vm(journal, host_dir, progress)
    if source.machine is not None:
        detail = _restart_nested_vm(journal, source, host_dir, progress, cold=cold)
    elif proc.alive(source.pid, source.pid_start_ticks):
        progress.note(f"the agent's QEMU (pid {source.pid}) is still running; nothing to restart")
        detail = "the agent's VM was still running"
    else:
        detail = _restart_agent_vm(source, host_dir, progress, cold=cold)
    # Only now, with the agent's VM answering, does the host's copy go.
    _remove_host_copy(host_dir)
    journal.set_state(ROLLED_BACK)
    return {"rolled_back": True, "detail": detail, "seconds": round(time.monotonic() - started, 3)}


def _unfinished_journal(host_dir: Path) -> Journal:
    """The run's journal, if it is one a rollback may undo: it exists, is not verified, not rolled back."""
    journal = Journal.load(host_dir)
    if journal is None:
        raise JournalError(f"no takeover journal in {host_dir}; nothing to roll back")
    if journal.state == DONE or journal.done("verify"):
        raise RollbackError(
            "the host's VM was verified; the takeover is complete and the agent's disk may be gone",
            hint="stop the host's VM yourself if you must; a rollback is only for unfinished runs",
        )
    if journal.state == ROLLED_BACK:
        raise RollbackError("this takeover was already rolled back", hint="nothing to do")
    return journal


def _stop_host_vm(journal: Journal, host_dir: Path, progress: Progress) -> None:
    """The host's VM and its egress proxy stopped, if the run got far enough to start them."""
    saved = TakeoverConfig.saved(journal.options, host_dir)  # the runner and VM the run used
    # The cut-over's first boot runs the same disk under the same runner, in a private network.
    if journal.entry("restart") or journal.entry("first_boot"):
        try:
            spec = vm_spec(Context(saved, host_dir, journal, progress))
            if runner_for(saved).stop(spec):
                progress.note("stopped the host's VM")
        except (JournalError, KeyError):
            pass  # the restart never got far enough to have a spec
    if egress.release(host_dir, drop_rules=True).get("forward_proxy_stopped"):
        progress.note("stopped the host's egress proxy")


def _restart_agent_vm(source: SourceVM, host_dir: Path, progress: Progress, *, cold: bool) -> str:
    """The agent's QEMU started again from its checkpoint (or cold), answering /health; says which."""
    disk = Path(source.disk)
    if not disk.exists():
        raise RollbackError(f"the agent's disk {disk} is gone; it cannot be restarted")
    has_checkpoint = CHECKPOINT_TAG in inspect_image(disk, force_share=True, owner=source.uid).snapshots
    if not has_checkpoint and not cold:
        raise RollbackError(
            f"{disk} has no {CHECKPOINT_TAG} snapshot",
            hint="rerun with --cold to boot the agent's disk without its saved state",
        )
    from_checkpoint = has_checkpoint and not cold
    progress.note(
        f"starting the agent's QEMU again as uid {source.uid}, in a session of its own without "
        f"a terminal" + (f", from {CHECKPOINT_TAG}" if from_checkpoint else " (cold boot)")
    )
    log = host_dir / "rollback-qemu.log"
    start_source_vm(source, log, load_checkpoint=from_checkpoint)
    with from_vm_image(RollbackError, "the agent's VM started but ", hint=f"read {log}; {RollbackError.hint}"):
        seconds = health.wait_for_health(source.proxy.url, HEALTH_TIMEOUT)
    progress.note(f"{source.proxy.url}/health answers after {seconds:.0f} s")
    return "the agent's VM is back from its checkpoint" if from_checkpoint else "cold boot"


def _restart_nested_vm(journal: Journal, source: SourceVM, host_dir: Path, progress: Progress, *, cold: bool) -> str:
    """The nested VM started again inside its agent machine, from its checkpoint (or cold), answering /health."""
    serve_back.remove(source.proxy)
    saved = TakeoverConfig.saved(journal.options, host_dir)
    with connect(saved, host_dir) as conn:
        if nested_alive(conn, source.pid, source.pid_start_ticks):
            progress.note(f"the nested QEMU (pid {source.pid}) still runs in {source.machine}; nothing to restart")
            return "the nested VM was still running"
        has_checkpoint = CHECKPOINT_TAG in nested_snapshots(conn, source.disk)
        if not has_checkpoint and not cold:
            raise RollbackError(
                f"{source.disk} in {source.machine} has no {CHECKPOINT_TAG} snapshot",
                hint="rerun with --cold to boot the nested disk without its saved state",
            )
        from_checkpoint = has_checkpoint and not cold
        progress.note(
            f"starting the nested QEMU again in {source.machine} as uid {source.uid}"
            + (f", from {CHECKPOINT_TAG}" if from_checkpoint else " (cold boot)")
        )
        restart_nested(conn, source, load_checkpoint=from_checkpoint)
        seconds = wait_nested_health(conn, source, host_dir, HEALTH_TIMEOUT)
    progress.note(f"the nested proxy at {source.machine_proxy} answers /health after {seconds:.0f} s")
    return "the nested VM is back from its checkpoint" if from_checkpoint else "cold boot"


def _remove_host_copy(host_dir: Path) -> None:
    discard_staging(host_dir)
    for name in (DISK_NAME, PARTIAL_NAME, "host_key", "host_key.pub", "known_hosts", *HOST_FILES):
        (host_dir / name).unlink(missing_ok=True)
