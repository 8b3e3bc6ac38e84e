"""A network namespace of root's own, for the host's VM's first boot while the agent's VM still serves.

The first boot (steps/first_boot.py) must not listen where the agent can connect or squat: its
QEMU forwards the proxy and SSH on loopback *inside* a namespace made here, which holds nothing
but its own `lo`. Entering a network namespace takes CAP_SYS_ADMIN, so no user of this host but
root can reach those ports, and a port taken on the host's loopback is another port altogether.
Nothing in the namespace routes anywhere, so the guest has no way out during the first boot.

The namespace has no name (nothing under /run/netns to leave behind): it lives as long as a
descriptor of it or a process in it does. Work runs in it on a thread of its own that joined it
with setns(2), which moves only the calling thread; sockets and child processes that thread makes
(QEMU, ssh, ssh-keyscan) belong to the namespace.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

from ..errors import RestartError

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def _call(name: str, *args: int) -> None:
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise RestartError(
            f"{name}(CLONE_NEWNET) failed: {os.strerror(err)}",
            hint="the takeover needs root (CAP_SYS_ADMIN) to give the first boot a network of its own",
        )


def _in_thread(work: Callable[[], T]) -> T:
    """`work()` on a new thread, its result or its exception handed back: namespace changes die with the thread."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="private-net", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


class PrivateNet:
    """A new, empty network namespace with `lo` up (and `addresses` on it); `run(f)` runs f inside."""

    def __init__(self, addresses: tuple[str, ...] = ()) -> None:
        def make() -> int:
            _call("unshare", CLONE_NEWNET)
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _ip("link", "set", "lo", "up")
                for address in addresses:
                    ip = ipaddress.ip_address(address)  # checked: it reaches a command line
                    if not ip.is_loopback:
                        _ip("addr", "add", f"{ip}/{ip.max_prefixlen}", "dev", "lo")
            except BaseException:
                os.close(fd)
                raise
            return fd

        self._fd: int | None = _in_thread(make)

    def run(self, work: Callable[[], T]) -> T:
        fd = self._fd
        if fd is None:
            raise RestartError("the first boot's private network was already closed")

        def inside() -> T:
            _call("setns", fd, CLONE_NEWNET)
            return work()

        return _in_thread(inside)

    def close(self) -> None:
        """Drop root's handle; the namespace goes when the last process in it (the first boot's QEMU) exits."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> PrivateNet:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _ip(*args: str) -> None:
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False
    )
    if result.returncode != 0:
        raise RestartError(f"`ip {' '.join(args)}` in the first boot's network failed: {result.stderr.strip()}")
