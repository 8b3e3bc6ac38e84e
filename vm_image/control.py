"""`vm_image status` and `vm_image stop`: is the VM up and answering; shut it down cleanly."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import proc, qmp
from .errors import VmImageError
from .layout import READY_MARKER, Layout
from .shutdown import stop_qemu


def read_ready(path: Path) -> dict[str, Any]:
    try:
        marker, _, body = path.read_text().partition("\n")
    except OSError:
        return {}
    if marker.strip() != READY_MARKER:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}  # what is not an object is as unreadable as bad JSON


def status(layout: Layout) -> dict[str, Any]:
    """What a user checks: is QEMU running, what does QMP say, does the proxy answer."""
    pid = proc.running_qemu(layout.pidfile)
    ready = read_ready(layout.ready)
    report: dict[str, Any] = {
        "state_dir": str(layout.state),
        "running": pid is not None,
        "pid": pid,
        "ready_file": str(layout.ready) if ready else None,
        "qmp_status": None,
        "health": None,
    }
    if pid is None:
        return report
    try:
        report["qmp_status"] = qmp.execute(layout.monitor, "query-status", timeout=5).get("status")
    except VmImageError as exc:
        report["qmp_status"] = f"unreachable: {exc}"
    if ready:
        url = f"http://{ready['proxy']['host']}:{ready['proxy']['port']}"
        report["proxy_url"] = url
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                report["health"] = json.loads(resp.read()).get("status")
        except (OSError, ValueError) as exc:
            report["health"] = f"no answer: {exc}"
    return report


def stop(layout: Layout, timeout: float = 60, note: Callable[[str], None] = lambda _: None) -> str:
    """system_powerdown, then `quit`, SIGTERM, SIGKILL (shutdown.py); removes the run files. Returns how it ended."""
    pid = proc.running_qemu(layout.pidfile)
    how = "not running"
    if pid is not None:
        # The guest is the user's own VM: it gets `timeout` seconds to shut down as a machine does.
        how = stop_qemu(layout.monitor, pid, powerdown=timeout, quit_wait=10, note=note)
    remove_run_files(layout)
    return how


def remove_run_files(layout: Layout) -> None:
    """The ready file, pidfile and a stale monitor socket; only once no QEMU of ours runs."""
    if proc.running_qemu(layout.pidfile):
        raise VmImageError("QEMU is still running; not removing its files")
    for path in (layout.ready, layout.pidfile, layout.monitor):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
