"""libguestfs's appliance under a deadline, with the tail of what it said kept for the error.

`guestfs.launch()` is one blocking C call, and libguestfs waits 20 minutes for an
appliance that never answers. On a KVM whose vCPU runs no ordinary guest (a
paravirtual KVM, dmesg `kvm-pvm: loaded`) the appliance's QEMU starts, prints
nothing and spins, so the takeover would sit in "starting libguestfs" for good.

A watchdog thread bounds the launch and then the whole session: when time is up
it kills the processes libguestfs started for this handle (children of this
process, started during the launch: QEMU, or supermin building the appliance),
and the blocked call returns with an error. Nothing else is touched: a process
that was already our child before the launch is left alone, and after the launch
only the appliance's QEMU, named by pid and start time, can be killed.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from vm_image import proc

LAUNCH_TIMEOUT = 300.0  # TCG launches take ~20-40 s here, plus ~10 s for supermin's first build
SESSION_TIMEOUT = 1800.0  # the whole scrub of one disk, launch included
LOG_LINES = 30


class ApplianceLog:
    """The last lines libguestfs and the appliance printed (event callback), for an error message."""

    def __init__(self, g: Any, lines: int = LOG_LINES) -> None:
        import guestfs

        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self._partial = ""
        self._echo = bool(g.get_verbose())  # LIBGUESTFS_DEBUG=1: the operator asked to see everything
        g.set_event_callback(self._event, guestfs.EVENT_APPLIANCE | guestfs.EVENT_LIBRARY | guestfs.EVENT_WARNING)

    def _event(self, event: int, event_handle: int, buf: Any, array: Any) -> None:
        text = buf.decode(errors="replace") if isinstance(buf, bytes) else str(buf)
        if self._echo:
            sys.stderr.write(text if text.endswith("\n") else text + "\n")
        *complete, self._partial = (self._partial + text.replace("\r", "")).split("\n")
        self.lines.extend(line for line in complete if line.strip())
        if len(self._partial) > 4096:
            self.lines.append(self._partial)
            self._partial = ""

    def tail(self) -> str:
        lines = [*self.lines, *([self._partial] if self._partial.strip() else [])]
        if not lines:
            return "    (the appliance printed nothing: its virtual CPU may never have run)"
        return "\n".join("    " + _printable(line)[:200] for line in lines)


class Watchdog:
    """Kills what a libguestfs handle started once a deadline passes; `fired` says whether it did."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.fired = False
        self.what = ""

    def arm_launch(self, seconds: float) -> None:
        """Before `launch()`: on expiry, kill every child of ours that was not there before."""
        before = set(_children(os.getpid()))

        def started_since() -> list[int]:
            return [pid for pid, ticks in _children(os.getpid()) if (pid, ticks) not in before]

        self._arm(seconds, "launch", started_since)

    def arm_session(self, seconds: float, appliance_pid: int) -> None:
        """After a launch: on expiry, kill the appliance's QEMU (the pid, at its start time) and nothing else."""
        ticks = _start_ticks(appliance_pid)
        self._arm(seconds, "session", lambda: [appliance_pid] if _start_ticks(appliance_pid) == ticks else [])

    def disarm(self) -> bool:
        """Stop the clock; True if it had already fired."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return self.fired

    def _arm(self, seconds: float, what: str, victims: Any) -> None:
        self.disarm()

        def fire() -> None:
            with self._lock:
                if self._timer is None:
                    return  # disarmed meanwhile
                self._timer = None
                self.fired, self.what = True, what
                for pid in victims():
                    _kill_tree(pid)

        with self._lock:
            self.fired = False
            self._timer = threading.Timer(seconds, fire)
            self._timer.daemon = True
            self._timer.start()


def _children(parent: int) -> list[tuple[int, int]]:
    """(pid, start ticks) of the live children of `parent`."""
    found = []
    for pid, (ppid, ticks, state) in _process_table().items():
        if ppid == parent and state != "Z":
            found.append((pid, ticks))
    return found


def _kill_tree(pid: int) -> None:
    # Not vm_image.shutdown.kill_group: libguestfs forks the appliance inside its C library, not as a Popen
    # child in a session of ours, so it is found by parentage; nor stop_qemu: nothing in it needs a clean stop.
    table = _process_table()
    doomed, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, (ppid, _, _) in table.items() if ppid in frontier]
        doomed.extend(frontier)
    for p in doomed:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _process_table() -> dict[int, tuple[int, int, str]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = fields
    return table


def _stat_fields(pid: int) -> tuple[int, int, str]:
    """(ppid, start ticks, state) of the process, from vm_image's one reader of /proc/PID/stat."""
    stat = proc.read_stat(pid)
    return stat.ppid, stat.start_ticks, stat.state


def _start_ticks(pid: int) -> int | None:
    try:
        return _stat_fields(pid)[1]
    except (OSError, ValueError, IndexError):
        return None


def _printable(text: str) -> str:
    # The appliance prints what the agent's disk makes it print; no control sequence reaches root's terminal.
    return "".join(c if c.isprintable() else "?" for c in text)
