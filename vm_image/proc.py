"""Is our QEMU running? (pidfile + /proc, so a reused pid is not mistaken for it)."""

from __future__ import annotations

import os
from pathlib import Path


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_qemu(pid: int) -> bool:
    try:
        return "qemu-system" in os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False


def running_qemu(pidfile: Path) -> int | None:
    pid = read_pid(pidfile)
    return pid if pid is not None and is_qemu(pid) else None
