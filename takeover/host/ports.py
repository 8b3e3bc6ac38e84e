"""The host's TCP ports the VM is served on: who listens on one, whether it is free, and when /health answers.

Shared by the steps that start and verify the host's VM, by `takeover start`, and by the
egress proxy, so that "who holds this port" has one answer (from /proc, never from a pidfile).
"""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Callable
from pathlib import Path

from vm_image import errors as vm_errors
from vm_image import health, proc

from ..errors import RestartError, VerifyError
from ..models import Endpoint


def listener_pids(endpoint: Endpoint) -> set[int]:
    """Pids holding a listening TCP socket on `endpoint`'s port (from /proc/net/tcp{,6})."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == endpoint.port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    pids.add(int(entry.name))
                    break
        except OSError:
            continue
    return pids


def port_holders(endpoint: Endpoint) -> list[str]:
    """Who listens on `endpoint`'s port: "pid N (uid U user, EXE)" from /proc/net/tcp and /proc/*/fd."""
    found = []
    for pid in sorted(listener_pids(endpoint)):
        try:
            info = proc.read_process(pid)
        except OSError:
            continue
        try:
            user = pwd.getpwuid(info.uid).pw_name
        except KeyError:
            user = "?"
        found.append(f"pid {pid} (uid {info.uid} {user}, {info.exe})")
    return found


def bind_refusal(endpoint: Endpoint, *, reuse_addr: bool) -> str | None:
    """Why `endpoint` cannot be bound now (the OS's reason), or None when it is free.

    With `reuse_addr`, as QEMU's slirp binds: a connection in TIME_WAIT holds nothing.
    """
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((endpoint.host, endpoint.port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def check_port_free(endpoint: Endpoint, what: str) -> None:
    """Refuse to start while anyone holds a port the host's QEMU (or its egress proxy) is to listen on."""
    reason = bind_refusal(endpoint, reuse_addr=True)
    if reason is None:
        return
    holders = ", ".join(port_holders(endpoint)) or f"a process this host cannot name ({reason})"
    raise RestartError(
        f"{endpoint} ({what}) is held by {holders}; the host's VM must listen there, and whoever holds it "
        f"would answer in the VM's place",
        hint=f"find and stop that process (`ss -ltnp 'sport = :{endpoint.port}'`); if it is the agent's, it is "
        f"posing as the VM. Then rerun `python -m takeover start`",
    )


def wait_for_health(proxy: Endpoint, timeout: float, alive: Callable[[], bool] = lambda: True) -> float:
    """Seconds until the host's VM answers /health at `proxy`; VerifyError if QEMU dies or time runs out."""
    try:
        return health.wait_for_health(proxy.url, timeout, alive)
    except vm_errors.ProcessGone:
        raise VerifyError(f"the host's QEMU exited before {proxy.url}/health answered") from None
    except vm_errors.HealthTimeout as exc:
        raise VerifyError(str(exc)) from None
