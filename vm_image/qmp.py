"""One synchronous QMP client for both sides: vm_image's own VM, and the takeover's (takeover/monitor.py).

We open the unix socket ourselves (so a caller can ask the kernel who accepted it, see
`QMP.connected`) and hand it to `qemu.qmp.QMPClient`, which does the protocol. Every call blocks
until QEMU answers or its timeout ends; every failure is one of vm_image/errors.py's monitor errors.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError
from qemu.qmp.qmp_client import ExecuteError

from .errors import IS_IT_RUNNING, MonitorNotQMP, MonitorUnreachable, QMPCommandError, QMPTimeout, VmImageError

CONNECT_TIMEOUT = 10.0


class QMP:
    """One QMP session. Use as a context manager."""

    def __init__(self, path: Path, timeout: float = CONNECT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(type(self).__name__.lower())
        self._connect()

    def connected(self, sock: socket.socket) -> None:
        """Called with the connected socket before QMP's greeting is read (takeover reads SO_PEERCRED)."""

    def _connect(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._loop.close()
            raise MonitorUnreachable(f"monitor socket {self.path} does not exist") from None
        if not stat.S_ISSOCK(st.st_mode):
            self._loop.close()
            raise MonitorNotQMP(f"{self.path} is not a unix socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            self._loop.close()
            raise MonitorUnreachable(f"cannot connect to monitor socket {self.path}: {exc.strerror or exc}") from None
        try:
            self.connected(sock)  # may refuse the peer: then nothing of what it sends is read
        except BaseException:
            sock.close()
            self._loop.close()
            raise
        sock.setblocking(False)
        try:
            self._run(self._client.connect(sock), self.timeout)
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            sock.close()
            self.close()
            reason = f"no greeting within {self.timeout:.0f} s" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise MonitorNotQMP(f"{self.path} does not speak QMP ({reason})") from None

    def _run(self, coro: Any, timeout: float | None) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = 60) -> Any:
        try:
            return self._run(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QMPCommandError(command, exc.error_class, str(exc)) from None
        except TimeoutError:
            raise QMPTimeout(f"QEMU did not answer {command!r} within {timeout} s") from None

    def hmp(self, command_line: str, timeout: float | None = 600) -> str:
        return str(self.execute("human-monitor-command", {"command-line": command_line}, timeout))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 10))
        except (TimeoutError, QMPError, OSError, EOFError):
            pass  # the peer may have gone away (after `quit`), which is what we asked for
        finally:
            self._loop.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def execute(monitor: Path, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
    """Run one QMP command and return its result; errors say which socket and command failed."""
    try:
        with QMP(monitor, timeout) as qmp:
            return qmp.execute(command, arguments or None, timeout)
    except (VmImageError, QMPError, OSError, EOFError) as exc:
        raise VmImageError(
            f"QMP {command!r} on {monitor} failed: {exc or type(exc).__name__}", hint=IS_IT_RUNNING
        ) from None
