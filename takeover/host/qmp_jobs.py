"""QMP's snapshot jobs (snapshot-save, snapshot-delete), run to their end: the agent's checkpoint and the host's.

A job is started, polled until it concludes, dismissed, and its error (if any) raised as the
caller's error type, so the checkpoint and the first boot say in their own words what failed.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import QMPCommandError, TakeoverError
from .monitor import Monitor

SAVE_TIMEOUT = 900.0  # RAM state under TCG writes at tens of MB/s; a 4 GiB guest still fits


def run_job(
    mon: Monitor,
    command: str,
    arguments: dict[str, Any],
    error: type[TakeoverError],
    timeout: float = SAVE_TIMEOUT,
) -> None:
    """Start job `command` and wait for it to conclude; any failure is raised as `error`."""
    job_id = arguments["job-id"]
    try:
        mon.execute(command, arguments)
    except QMPCommandError as exc:
        raise error(f"{command} was refused: {exc}") from None
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j["id"]: j for j in mon.execute("query-jobs")}
        job = jobs.get(job_id)
        if job is None:
            raise error(f"the {command} job {job_id} disappeared before it concluded")
        if job["status"] == "concluded":
            mon.execute("job-dismiss", {"id": job_id})
            if job.get("error"):
                raise error(f"{command} failed: {job['error']}")
            return
        if time.monotonic() > deadline:
            raise error(f"{command} did not finish within {timeout:.0f} s (status {job['status']})")
        time.sleep(0.2)


def snapshot_names(mon: Monitor, node: str) -> set[str]:
    """The internal snapshots of block node `node`, as QEMU lists them."""
    for block in mon.execute("query-block"):
        inserted = block.get("inserted") or {}
        if inserted.get("node-name") == node:
            return {s.get("name") for s in (inserted.get("image") or {}).get("snapshots") or []}
    return set()


def save_snapshot(
    mon: Monitor, tag: str, vmstate: str, devices: list[str], error: type[TakeoverError], job_id: str
) -> None:
    """Save internal snapshot `tag` (disk and RAM), replacing one of that name left by an earlier attempt."""
    if tag in snapshot_names(mon, vmstate):
        run_job(mon, "snapshot-delete", {"job-id": job_id + "-old", "tag": tag, "devices": devices}, error)
    run_job(mon, "snapshot-save", {"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": devices}, error)


def delete_snapshot(mon: Monitor, tag: str, devices: list[str], error: type[TakeoverError], job_id: str) -> None:
    run_job(mon, "snapshot-delete", {"job-id": job_id, "tag": tag, "devices": devices}, error)
