"""What the agent's QEMU answers over QMP about its disks and size, bounded and checked for shape.

The same questions are asked of a local agent's QEMU (steps/find_vm.py) and of one nested in an
agent machine (agent/nested_vm.py); the answers are the agent's either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DiskMismatch, MonitorNotQMP
from ..host.monitor import Monitor
from .diskimage import ACCEPTED_FORMATS, AGENT_HINT, MAX_BACKING_FILES
from .ready_file import bounded_int


def disk_nodes(
    blocks: list[dict[str, Any]], disk: Path, resolve: Callable[[str], str] = os.path.realpath
) -> tuple[list[str], str]:
    """The writable nodes a checkpoint covers, and the node holding our disk (it also gets the RAM state).

    `resolve` turns a file name QEMU reports into the real path `disk` is: this host's realpath for a
    local agent, the agent machine's (asked over SSH) for a nested VM.
    """
    ours, writable = None, []
    for block in blocks:
        inserted = block.get("inserted")
        if not inserted:
            continue
        node = inserted.get("node-name", "")
        filename = inserted.get("file", "")
        if filename.startswith("/") and resolve(filename) == str(disk):
            ours = node
            if inserted.get("drv") != "qcow2":
                raise DiskMismatch(f"QEMU opened {disk} as {inserted.get('drv')!r}, not qcow2")
            # A cloud image's overlay sits on the user's base image: allowed. The chain is read later
            # only as the agent (relocate, diskimage); QEMU's own view is held to the same rule here.
            depth = inserted.get("backing_file_depth") or 0
            if not isinstance(depth, int) or depth > MAX_BACKING_FILES:
                raise DiskMismatch(
                    f"QEMU opened {disk} over {depth} backing files; at most {MAX_BACKING_FILES} are taken over",
                    hint=AGENT_HINT,
                )
            image = (inserted.get("image") or {}).get("backing-image")
            while isinstance(image, dict):
                if image.get("format") not in ACCEPTED_FORMATS:
                    raise DiskMismatch(
                        f"{disk} has a backing file {image.get('filename')!r} in format "
                        f"{image.get('format')!r}; accepted: {' and '.join(ACCEPTED_FORMATS)}",
                        hint=AGENT_HINT,
                    )
                image = image.get("backing-image")
        if not inserted.get("ro"):
            writable.append(node)
    if ours is None:
        opened = [b.get("inserted", {}).get("file") for b in blocks if b.get("inserted")]
        raise DiskMismatch(f"the QEMU behind this monitor does not have {disk} open (it has: {opened or 'no disks'})")
    return writable, ours


def vm_size(mon: Monitor) -> tuple[int, int]:
    """The agent's VM's RAM (MiB) and vCPUs, as its QEMU answers: the RAM is what the checkpoint writes.

    Still the agent's process's answer (it may ptrace its QEMU), so only bounded here; what keeps
    the copy within root's disk is relocate's byte budget.
    """
    ram = mon.execute("query-memory-size-summary")
    cpus = mon.execute("query-cpus-fast")
    if not isinstance(ram, dict) or not isinstance(cpus, list):
        raise MonitorNotQMP("the agent's QEMU answered its memory size or CPU list in a shape QEMU never uses")
    ram_bytes = bounded_int(ram.get("base-memory"), "the VM's base memory", 0, 2**46) + bounded_int(
        ram.get("plugged-memory", 0), "the VM's plugged memory", 0, 2**46
    )
    return -(-ram_bytes // 2**20), bounded_int(len(cpus), "the VM's vCPU count", 0, 1024)
