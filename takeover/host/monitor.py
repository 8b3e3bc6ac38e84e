"""vm_image's QMP client, knowing who is on the other end.

Before QMP's greeting is read, the kernel tells us the peer's credentials (SO_PEERCRED: the
pid and uid of the process that accepted). The pid comes from the kernel, not from the agent's
ready file, so the QEMU we checkpoint and wait for is the one we talk to. vm_image's errors
become the takeover's, with the takeover's advice.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm_image import qmp

from ..errors import from_vm_image

CONNECT_TIMEOUT = qmp.CONNECT_TIMEOUT


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


class Monitor(qmp.QMP):
    """One QMP session with its peer's credentials in `peer`. Use as a context manager."""

    peer: Peer

    def __init__(
        self, path: Path, timeout: float = CONNECT_TIMEOUT, check_peer: Callable[[Peer], None] | None = None
    ) -> None:
        # Runs on the kernel's credentials before a byte of the peer's is read: a process that is not
        # the VM being taken over never gets its greeting parsed by root.
        self._check_peer = check_peer
        with from_vm_image():
            super().__init__(path, timeout)

    def connected(self, sock: socket.socket) -> None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.peer = Peer(*struct.unpack("3i", creds))
        if self._check_peer is not None:
            self._check_peer(self.peer)

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = 60) -> Any:
        with from_vm_image():
            return super().execute(command, arguments, timeout)

    def __enter__(self) -> Monitor:
        return self
