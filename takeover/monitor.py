"""A synchronous QMP connection that also knows who is on the other end.

We open the unix socket ourselves, read the peer's credentials (SO_PEERCRED:
the pid and uid of the process that accepted), then hand the socket to
`qemu.qmp.QMPClient`. The pid comes from the kernel, not from the agent's
ready file, so the QEMU we checkpoint and wait for is the one we talk to.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError
from qemu.qmp.qmp_client import ExecuteError

from .errors import MonitorNotQMP, MonitorUnreachable, TakeoverError

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


class Monitor:
    """One QMP session. Use as a context manager; every call blocks until QEMU answers."""

    def __init__(self, path: Path, timeout: float = CONNECT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("takeover")
        self.peer = self._connect()

    def _connect(self) -> Peer:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise MonitorUnreachable(f"monitor socket {self.path} does not exist") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise MonitorNotQMP(f"{self.path} is not a unix socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise MonitorUnreachable(f"cannot connect to monitor socket {self.path}: {exc.strerror or exc}") from None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer = Peer(*struct.unpack("3i", creds))
        sock.setblocking(False)
        try:
            self._run(self._client.connect(sock), self.timeout)
        except (QMPError, asyncio.TimeoutError, OSError, EOFError) as exc:
            sock.close()
            self.close()
            reason = "no greeting within %.0f s" % self.timeout if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise MonitorNotQMP(f"{self.path} does not speak QMP ({reason})") from None
        return peer

    def _run(self, coro: Any, timeout: float | None) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = 60) -> Any:
        try:
            return self._run(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QMPCommandError(command, exc.error_class, str(exc)) from None
        except asyncio.TimeoutError:
            raise TakeoverError(f"QEMU did not answer {command!r} within {timeout} s") from None

    def hmp(self, command_line: str, timeout: float | None = 600) -> str:
        return str(self.execute("human-monitor-command", {"command-line": command_line}, timeout))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 10))
        except (QMPError, asyncio.TimeoutError, OSError, EOFError):
            pass  # the peer may have gone away (after `quit`), which is what we asked for
        finally:
            self._loop.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QMPCommandError(TakeoverError):
    def __init__(self, command: str, error_class: str, message: str) -> None:
        super().__init__(f"QEMU refused {command!r}: {error_class}: {message}")
        self.command = command
        self.error_class = error_class
