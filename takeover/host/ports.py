"""The host's TCP ports the VM is served on: who listens on one, and whether it is free.

Shared by the steps that start and verify the host's VM, by `takeover start`, and by the
egress proxy, so that "who holds this port" has one answer (from /proc, never from a pidfile).
"""

from __future__ import annotations

import pwd
import socket
from pathlib import Path

from vm_image import proc

from ..errors import RestartError
from ..models import Endpoint


def listener_pids(endpoint: Endpoint) -> set[int]:
    """Pids holding a listening TCP socket on `endpoint`'s port, any address (the host's /proc/net/tcp{,6})."""
    inodes = {listener.inode for listener in proc.tcp_listeners() if listener.port == endpoint.port}
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if proc.socket_inodes(int(entry.name)) & inodes:
                pids.add(int(entry.name))
        except OSError:
            continue  # exited since the listing, or not ours to read
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
