"""What /proc says about a process: our own QEMU (pidfile + /proc) and one we did not start (the agent's).

A pid alone can be reused; a (pid, start time) pair names one process for the
life of the machine, so every "is it still there" check of a process we did not
start compares both. Shared by vm_image and takeover.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
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
    uids: tuple[int, ...] = ()  # real, effective, saved, filesystem: a setuid process has more than one
    gids: tuple[int, ...] = ()


def current_boot_id() -> str:
    """This boot of the machine: a (pid, start time) pair recorded before a reboot names nothing after it."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def read_process(pid: int) -> ProcessInfo:
    base = Path(f"/proc/{pid}")
    status = _status_fields(base / "status")
    uids = tuple(int(u) for u in status["Uid"].split())
    gids = tuple(int(g) for g in status["Gid"].split())
    groups = tuple(int(g) for g in status.get("Groups", "").split())
    raw = (base / "cmdline").read_bytes()
    cmdline = tuple(os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]) if raw else ()
    return ProcessInfo(
        pid,
        start_ticks(pid),
        uids[0],
        gids[0],
        groups,
        os.readlink(base / "exe"),
        os.readlink(base / "cwd"),
        cmdline,
        uids,
        gids,
    )


@dataclass(frozen=True)
class Stat:
    state: str  # field 3: R, S, D, Z, ...
    ppid: int  # field 4
    start_ticks: int  # field 22: start time since boot, in clock ticks


def read_stat(pid: int) -> Stat:
    """The fields of /proc/PID/stat we use. OSError if the process is gone; ValueError if unreadable."""
    return parse_stat(Path(f"/proc/{pid}/stat").read_text(), pid)


def parse_stat(stat: str, pid: int) -> Stat:
    """/proc/PID/stat's text (read here, or in an agent machine) as a Stat; ValueError if it is not that."""
    if ")" not in stat:
        raise ValueError(f"/proc/{pid}/stat is not in the kernel's format")
    # The command name (field 2) may contain spaces and parentheses; fields resume after the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    try:
        return Stat(rest[0], int(rest[1]), int(rest[19]))
    except IndexError:
        raise ValueError(f"/proc/{pid}/stat has fewer fields than Linux writes") from None


def start_ticks(pid: int) -> int:
    return read_stat(pid).start_ticks


def alive(pid: int, ticks: int) -> bool:
    try:
        return start_ticks(pid) == ticks and _state(pid) != "Z"
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return False


def _state(pid: int) -> str:
    return read_stat(pid).state


def wait_gone(pid: int, ticks: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid, ticks):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def terminate(pid: int, ticks: int, grace: float = 10) -> str:
    """SIGTERM, then SIGKILL after `grace` seconds; only if (pid, ticks) is still the same process.

    Returns how it ended: "exited" (before a signal), "terminated" or "killed".
    """
    how = "exited"
    for sig, wait, name in ((signal.SIGTERM, grace, "terminated"), (signal.SIGKILL, 10, "killed")):
        if not alive(pid, ticks):
            return how
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return how
        how = name
        if wait_gone(pid, ticks, wait):
            return how
    return how


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


def executable_files(pid: int) -> list[tuple[str, os.stat_result]]:
    """Every file mapped executable into the process (its binary, the loader, each library), with the
    kernel's stat of the mapped inode itself (/proc/PID/map_files), not of whatever the path names now."""
    found, seen = [], set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "x" not in fields[1] or not fields[5].startswith("/"):
            continue  # anonymous (TCG's translated code), [vdso], [vsyscall]
        if fields[0] in seen:
            continue
        seen.add(fields[0])
        try:
            st = os.stat(f"/proc/{pid}/map_files/{fields[0]}")
        except PermissionError:  # map_files needs CAP_SYS_ADMIN; without it, the path as mapped
            st = os.stat(fields[5].removesuffix(" (deleted)"))
        found.append((fields[5], st))
    return found


@dataclass(frozen=True)
class TcpListener:
    address: str
    port: int
    inode: str  # the socket's inode, as /proc/PID/fd names it: "socket:[INODE]"


def tcp_listeners(net: Path = Path("/proc/net")) -> list[TcpListener]:
    """Every TCP socket in LISTEN in the network namespace of `net` (/proc/net: ours; /proc/PID/net: that
    process's), from the kernel's tables tcp and tcp6. The one parser of /proc/net/tcp."""
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = (net / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A":  # 0A: LISTEN
                continue
            addr_hex, port_hex = local.rsplit(":", 1)
            found.append(TcpListener(_kernel_address(addr_hex, family), int(port_hex, 16), inode))
    return found


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds open (its /proc/PID/fd). OSError if it is gone."""
    inodes = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def listening_tcp(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process holds in LISTEN, as the kernel sees it
    (the process's own network namespace: /proc/PID/net), whatever the process says about itself."""
    inodes = socket_inodes(pid)
    return {(ln.address, ln.port) for ln in tcp_listeners(Path(f"/proc/{pid}/net")) if ln.inode in inodes}


def _kernel_address(text: str, family: int) -> str:
    # /proc/net/tcp prints each 32-bit word of the address in host byte order.
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    return socket.inet_ntop(family, words)


def _status_fields(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


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
