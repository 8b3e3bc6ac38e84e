"""What /proc says about a process we did not start (the agent's QEMU).

A pid alone can be reused; a (pid, start time) pair names one process for the
life of the machine, so every "is it still there" check compares both.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    start_ticks: int  # field 22 of /proc/PID/stat: start time since boot, in clock ticks
    uid: int
    gid: int
    groups: tuple[int, ...]
    exe: str
    cwd: str
    cmdline: tuple[str, ...]


def read_process(pid: int) -> ProcessInfo:
    base = Path(f"/proc/{pid}")
    status = _status_fields(base / "status")
    uid = int(status["Uid"].split()[0])
    gid = int(status["Gid"].split()[0])
    groups = tuple(int(g) for g in status.get("Groups", "").split())
    raw = (base / "cmdline").read_bytes()
    cmdline = tuple(os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]) if raw else ()
    return ProcessInfo(pid, start_ticks(pid), uid, gid, groups,
                       os.readlink(base / "exe"), os.readlink(base / "cwd"), cmdline)


def start_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces and parentheses; fields resume after the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def alive(pid: int, ticks: int) -> bool:
    try:
        return start_ticks(pid) == ticks and _state(pid) != "Z"
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return False


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()[0]


def wait_gone(pid: int, ticks: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid, ticks):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def terminate(pid: int, ticks: int, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; only if (pid, ticks) is still the same process."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        if not alive(pid, ticks):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, ticks, wait):
            return


def open_files(pid: int) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of every file the process has open."""
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            st = os.stat(entry)
        except OSError:
            continue
        found.append((st.st_dev, st.st_ino))
    return found


def _status_fields(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields
