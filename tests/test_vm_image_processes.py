"""vm_image's view of processes (proc.py) and how it stops them (shutdown.py), on real sockets and processes.

The takeover asks the same questions through these functions (who listens on the proxy's port,
is this still our QEMU, stop it), so they are proven here once, without root and without a guest.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vm_image import proc
from vm_image.shutdown import kill_group, stop_qemu

from .takeover_helpers import make_qcow2, start_monitor_only_qemu


def test_a_listening_socket_is_found_with_its_address_port_and_owner():
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client.connect(("127.0.0.1", port))  # a connected socket is not a listener
        found = [ln for ln in proc.tcp_listeners() if ln.port == port]
        assert [(ln.address, ln.port) for ln in found] == [("127.0.0.1", port)]
        assert found[0].inode in proc.socket_inodes(os.getpid())
        assert ("127.0.0.1", port) in proc.listening_tcp(os.getpid())
        assert client.getsockname()[1] not in {port for _, port in proc.listening_tcp(os.getpid())}


def test_an_ipv6_listener_is_read_from_tcp6_in_network_byte_order():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    with socket.socket(socket.AF_INET6) as server:
        try:
            server.bind(("::1", 0))
        except OSError:
            pytest.skip("no ::1 on this host")
        server.listen()
        port = server.getsockname()[1]
        assert ("::1", port) in proc.listening_tcp(os.getpid())


def test_a_closed_listener_is_gone_from_the_table():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
    assert ("127.0.0.1", port) not in proc.listening_tcp(os.getpid())


def test_stop_qemu_quits_a_real_qemu_through_its_monitor(tmp_path: Path):
    vm = start_monitor_only_qemu(tmp_path, make_qcow2(tmp_path / "disk.qcow2"))
    try:
        assert stop_qemu(vm.monitor, vm.pid, powerdown=None, quit_wait=30) == "quit through QMP"
        assert not vm.alive()
    finally:
        vm.kill()


def test_stop_qemu_without_a_monitor_falls_back_to_sigterm(tmp_path: Path):
    child = subprocess.Popen(["sleep", "60"])
    notes: list[str] = []
    try:
        how = stop_qemu(tmp_path / "no-monitor.sock", child.pid, powerdown=5, quit_wait=1, note=notes.append)
        assert how == "terminated"
        assert child.wait(5) == -15
        assert any("no clean power-down" in note for note in notes)
    finally:
        child.kill()
        child.wait()


def test_stop_qemu_of_a_process_already_gone_says_so(tmp_path: Path):
    child = subprocess.Popen(["true"])
    child.wait()
    assert stop_qemu(tmp_path / "qmp.sock", child.pid, powerdown=None, quit_wait=1) == "exited"


def test_kill_group_ends_what_the_child_started_even_after_the_child_exited():
    # The child starts a grandchild in its session and exits at once, as a forking helper does.
    script = "import subprocess, sys; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True)"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    child.stdout.close()
    child.wait(10)
    ticks = proc.start_ticks(grandchild)
    kill_group(child)
    assert proc.wait_gone(grandchild, ticks, 5)
