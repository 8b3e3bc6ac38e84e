"""SIGUSR1 tells `proxy serve` to retry Telegram now instead of sitting out its backoff.

The host sends it (as `secret-proxy telegram retry-now`, over its SSH login as the proxy's user)
after resuming a VM that was saved where Telegram was out of reach; an operator sends it after
fixing the network. The server side is `handle_retry` / `ignore_retry`; the CLI side finds the
serving process and signals it only if it is a `proxy serve` of the caller's own uid: a wrong
`--pid`, a stale MainPID or a reused pid must never deliver a signal to a stranger (SIGUSR1's
default action ends most programs).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RETRY_SIGNAL = signal.SIGUSR1
UNIT = "secret-proxy.service"
SYSTEMCTL_TIMEOUT_SECONDS = 10


def ignore_retry() -> None:
    """Before serving: a SIGUSR1 is harmless until a bot handles it, and stays harmless without one."""
    signal.signal(RETRY_SIGNAL, signal.SIG_IGN)


def handle_retry(loop: asyncio.AbstractEventLoop, retry: Callable[[], None]) -> Callable[[], None]:
    """Call `retry` on the loop at every SIGUSR1; returns the undo, which leaves the signal ignored
    (asyncio's own removal would restore the default action, which kills the process)."""
    loop.add_signal_handler(RETRY_SIGNAL, retry)

    def undo() -> None:
        loop.remove_signal_handler(RETRY_SIGNAL)
        ignore_retry()

    return undo


class NoServer(Exception):
    """No `proxy serve` to signal: the unit is not running, or the pid is gone."""


class NotOurServer(Exception):
    """The pid is another user's process, or not a `proxy serve`: never signalled."""


@dataclass(frozen=True)
class Signalled:
    pid: int
    how: str  # where the pid came from: "systemd (secret-proxy.service)" or "--pid"


def serving_pid() -> int:
    """The unit's main pid as systemd knows it (any user may ask); NoServer when it is not running."""
    argv = ["systemctl", "show", "--property", "MainPID", "--value", UNIT]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise NoServer("systemctl is not installed; give the server's pid with --pid PID") from None
    except subprocess.TimeoutExpired:
        raise NoServer(f"`systemctl show {UNIT}` did not answer within {SYSTEMCTL_TIMEOUT_SECONDS} s") from None
    value = result.stdout.strip()
    if result.returncode != 0 or not value.isdigit():
        why = " ".join((result.stderr or value).split())[-200:]  # one line: systemctl may say it in two
        raise NoServer(f"`systemctl show {UNIT}` failed: {why}; without systemd, give the server's pid with --pid PID")
    if value == "0":
        raise NoServer(f"{UNIT} is not running; start it with `systemctl start {UNIT}`")
    return int(value)


def is_proxy_serve(argv: list[str]) -> bool:
    """`python ... -m proxy [--data-dir DIR] serve ...`: the server, as the unit and the docs start it."""
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "proxy":
            rest = argv[i + 2 :]
            if rest[:1] and rest[0].startswith("--data-dir="):
                rest = rest[1:]
            elif rest[:1] == ["--data-dir"]:
                rest = rest[2:]
            return rest[:1] == ["serve"]
    return False


def check_our_server(pid: int, proc: Path = Path("/proc")) -> None:
    """The process is a `proxy serve` whose every uid (real, effective, saved, filesystem) is the caller's."""
    try:
        status = (proc / str(pid) / "status").read_text()
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
    except FileNotFoundError:
        raise NoServer(f"no process {pid}") from None
    except PermissionError:
        raise NotOurServer(f"process {pid} is not readable by uid {os.getuid()}; not signalled") from None
    uids = next((line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")), [])
    me = str(os.getuid())
    if not uids or any(uid != me for uid in uids):
        raise NotOurServer(
            f"process {pid} runs as uid {'/'.join(uids) or 'unknown'}, not as the caller's uid {me}; not signalled "
            "(run this as the proxy's user)"
        )
    argv = [part.decode(errors="replace") for part in cmdline.split(b"\0") if part]
    if not is_proxy_serve(argv):
        shown = " ".join(argv)[:120] or "(no command line: a kernel thread or a zombie)"
        raise NotOurServer(f"process {pid} is not `proxy serve` ({shown}); not signalled")


def retry_telegram_now(pid: int | None = None) -> Signalled:
    """SIGUSR1 to the serving proxy (`pid`, or systemd's MainPID), after checking it is ours.

    The process is held by a pidfd from before the checks to the signal: if it exits and its pid is
    reused meanwhile, the signal fails (ESRCH) instead of reaching the newcomer."""
    how = "--pid" if pid is not None else f"systemd ({UNIT})"
    target = pid if pid is not None else serving_pid()
    if target <= 0:
        raise NoServer(f"{target} is not a process id")
    try:
        pidfd = os.pidfd_open(target)
    except ProcessLookupError:
        raise NoServer(f"no process {target}") from None
    try:
        check_our_server(target)
        try:
            signal.pidfd_send_signal(pidfd, RETRY_SIGNAL)
        except ProcessLookupError:
            raise NoServer(f"process {target} exited before it was signalled") from None
        except PermissionError:
            raise NotOurServer(f"not allowed to signal process {target}") from None
    finally:
        os.close(pidfd)
    return Signalled(target, how)
