"""QEMU's forwarded ports, given a listen backlog that holds a burst of agents.

libslirp listens on each `hostfwd` port with a backlog of 1 (`tcp_listen` calls
`listen(s, 1)`). When more agents connect at once than QEMU accepts between two
turns of its main loop, the host kernel drops their handshakes, and each of them
waits for its SYN to be sent again (1 s, 3 s, 7 s...): a thousand agents
reconnecting after a restart of the VM lost most of their connections (see
docs/benchmarks.md).

A backlog belongs to the listening socket, not to the process: root takes a copy
of QEMU's descriptor (`pidfd_getfd`, which needs ptrace rights over QEMU; root has
them) and calls `listen()` on it again with a real backlog, which QEMU's own
descriptor then shares. Root reads nothing from the socket and closes its copy at
once. QEMU needs no patch and no extra process sits in the agents' path.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..models import Endpoint

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (the unified syscall table)


class BacklogError(Exception):
    """A forwarded port's backlog could not be widened; the VM still serves, one handshake at a time.

    `widened` holds the ports that were (endpoint -> backlog), when some were.
    """

    def __init__(self, message: str, widened: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.widened = widened or {}


def somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 4096


def widen(pid: int, endpoints: Iterable[Endpoint], backlog: int = BACKLOG) -> dict[str, int]:
    """Set the listen backlog of `pid`'s TCP listening sockets at `endpoints`; return each one's new backlog.

    Raises BacklogError, naming the endpoint or the reason, when the process is gone, the
    kernel refuses the copy, or one of the endpoints is not a socket that process listens on.
    """
    wanted = {(_canonical(e.host), e.port): str(e) for e in endpoints}
    effective = min(backlog, somaxconn())
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise BacklogError(f"cannot open process {pid}: {exc.strerror}") from None
    done: dict[str, int] = {}
    try:
        for fd in _socket_fds(pid):
            with _copy(pidfd, pid, fd) as sock:
                if sock is None or not _is_tcp_listener(sock):
                    continue
                host, port = sock.getsockname()[:2]
                name = wanted.get((_canonical(host), port))
                if name is not None:
                    sock.listen(backlog)
                    done[name] = effective
    except BacklogError as exc:
        raise BacklogError(str(exc), done) from None
    except OSError as exc:
        raise BacklogError(f"a socket of process {pid} refused: {exc.strerror or exc}", done) from None
    finally:
        os.close(pidfd)
    missing = sorted(set(wanted.values()) - set(done))
    if missing:
        raise BacklogError(f"process {pid} listens on no TCP socket at {', '.join(missing)}", done)
    return done


def _canonical(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _socket_fds(pid: int) -> list[int]:
    fds = []
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError as exc:
        raise BacklogError(f"cannot list the descriptors of process {pid}: {exc.strerror}") from None
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}").startswith("socket:["):
                fds.append(int(name))
        except OSError:  # closed since the listing
            continue
    return sorted(fds)


@contextmanager
def _copy(pidfd: int, pid: int, fd: int) -> Iterator[socket.socket | None]:
    """A copy of another process's descriptor as a socket; closing it leaves the original open."""
    libc = ctypes.CDLL(None, use_errno=True)
    copied = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if copied < 0:
        err = ctypes.get_errno()
        if err == errno.EBADF:  # closed since the listing
            yield None
            return
        raise BacklogError(f"the kernel refused a copy of descriptor {fd} of process {pid}: {os.strerror(err)}")
    try:
        sock = socket.socket(fileno=copied)
    except OSError:
        os.close(copied)
        yield None
        return
    with sock:
        yield sock


def _is_tcp_listener(sock: socket.socket) -> bool:
    return (
        sock.family in (socket.AF_INET, socket.AF_INET6)
        and sock.type == socket.SOCK_STREAM
        and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    )
