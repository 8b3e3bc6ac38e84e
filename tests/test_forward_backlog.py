"""QEMU's forwarded ports hold a burst of agents connecting at once (`takeover/host/forward_backlog.py`).

Played with a real QEMU, run as an unprivileged user (`-runas`, as the host's VM runs),
whose forwards are libslirp's own listening sockets. QEMU is stopped (SIGSTOP) during
each burst, so it accepts nothing and only the listen backlog decides which handshakes
the kernel completes: the worst case of a guest too busy to take new connections.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from takeover.host.forward_backlog import BacklogError, widen
from takeover.models import Endpoint
from tests.takeover_helpers import ensure_user, free_port, listen_backlog

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64"),
]

QEMU_USER = "spvm-backlog-qemu"


@pytest.fixture
def qemu_forwarding() -> Iterator[tuple[int, Endpoint, Endpoint]]:
    """A QEMU (no disk, vCPU never started) forwarding two loopback ports, as the unprivileged QEMU user."""
    ensure_user(QEMU_USER)
    proxy, ssh = Endpoint("127.0.0.1", free_port()), Endpoint("127.0.0.1", free_port())
    qemu = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-netdev",
            f"user,id=n0,hostfwd=tcp:{proxy}-:3737,hostfwd=tcp:{ssh}-:22",
            "-device",
            "virtio-net-pci,netdev=n0",
            "-runas",
            QEMU_USER,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while listen_backlog(proxy.port) is None or listen_backlog(ssh.port) is None:
            assert qemu.poll() is None, qemu.stderr.read() if qemu.stderr else ""
            assert time.monotonic() < deadline, "QEMU did not listen on its forwards"
            time.sleep(0.1)
        yield qemu.pid, proxy, ssh
    finally:
        qemu.kill()
        qemu.wait(timeout=10)


def burst(port: int, count: int, within: float = 0.5) -> int:
    """Open `count` connections at once; return how many handshakes completed within `within` seconds.

    A handshake the kernel dropped for a full backlog is retried only after a second, so it
    does not complete in time.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        pending, done = set(socks), 0
        deadline = time.monotonic() + within
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], max(0.0, deadline - time.monotonic()))
            for s in writable:
                pending.discard(s)
                done += s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        return done
    finally:
        for s in socks:
            s.close()


def test_a_burst_of_agents_is_dropped_by_qemus_own_backlog_and_held_once_widened(qemu_forwarding):
    pid, proxy, ssh = qemu_forwarding
    assert listen_backlog(proxy.port) == 1  # libslirp's listen(s, 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert burst(proxy.port, 50) <= 2  # the backlog of 1 holds two; the kernel drops the rest
    finally:
        os.kill(pid, signal.SIGCONT)

    assert widen(pid, [proxy, ssh]) == {str(proxy): 4096, str(ssh): 4096}
    assert listen_backlog(proxy.port) == 4096 and listen_backlog(ssh.port) == 4096
    # Still QEMU's socket, in QEMU's hands: root kept no copy of it.
    holders = subprocess.run(
        ["ss", "-Htlnp", f"sport = :{proxy.port}"], capture_output=True, text=True, check=True
    ).stdout
    assert f"pid={pid}," in holders and f"pid={os.getpid()}," not in holders
    os.kill(pid, signal.SIGSTOP)
    try:
        assert burst(proxy.port, 500) == 500
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_port_the_process_does_not_listen_on_is_named(qemu_forwarding):
    pid, proxy, _ = qemu_forwarding
    elsewhere = Endpoint("127.0.0.1", free_port())
    with pytest.raises(BacklogError, match=f"listens on no TCP socket at {elsewhere}") as exc:
        widen(pid, [proxy, elsewhere])
    assert exc.value.widened == {str(proxy): 4096}  # the one it found is widened, and the report says so


def test_a_process_that_is_gone_is_named():
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(BacklogError, match=f"cannot open process {child.pid}"):
        widen(child.pid, [Endpoint("127.0.0.1", 3737)])
