"""The host's connection to an agent machine (takeover/agent/machine.py), against a real one made here:
its own network and mount namespaces and sshd (tests/agent_machine_helpers.py). Root in that machine is
the agent: it may show another host key, stall, flood, or name files that are not what they say."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeover.agent.machine import (
    AgentMachineError,
    AgentMachineFlood,
    AgentMachineTimeout,
    Connection,
    MachineAddress,
    check_remote_path,
)
from takeover.errors import InvalidInput

from .agent_machine_helpers import AgentMachineRig, start_agent_machine

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def rig() -> Iterator[AgentMachineRig]:
    machine = start_agent_machine()
    yield machine
    machine.stop()


@pytest.fixture
def conn(rig: AgentMachineRig, tmp_path: Path) -> Iterator[Connection]:
    with Connection(rig.machine(), tmp_path) as connection:
        yield connection


def test_the_machines_own_files_are_invisible_from_the_host_and_reached_over_ssh(rig, conn):
    rig.inside(["sh", "-c", f"echo inside > {rig.private}/marker"])
    assert not Path(rig.private, "marker").exists()  # the host sees an empty directory
    got = conn.run(["cat", f"{rig.private}/marker"])
    assert got.returncode == 0 and got.stdout == b"inside\n"


def test_a_machine_showing_another_host_key_is_refused_before_any_command_runs(rig, tmp_path):
    other = tmp_path / "other_known_hosts"
    other.write_text(
        f"{rig.address} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake\n"
    )
    before = (rig.work / "sshd.log").read_text()
    with pytest.raises(AgentMachineError, match="cannot log in"):
        Connection(rig.machine(other), tmp_path).open()
    after = (rig.work / "sshd.log").read_text()[len(before) :]
    assert "Accepted publickey" not in after  # the key was never offered: no login happened


def test_arguments_reach_the_machine_as_one_argv_not_as_shell_text(rig, conn):
    got = conn.run(["printf", "%s|", "a b", "$(id)", "; touch /tmp/spvm-pwned", "`id`"])
    assert got.stdout == b"a b|$(id)|; touch /tmp/spvm-pwned|`id`|"
    assert rig.inside(["test", "-e", "/tmp/spvm-pwned"]).returncode == 1


def test_a_file_larger_than_asked_for_is_refused_without_reading_it_whole(rig, conn):
    rig.inside(["sh", "-c", f"head -c 50000000 /dev/zero > {rig.private}/huge"])
    started = time.monotonic()
    with pytest.raises(AgentMachineFlood, match="over 4096 bytes"):
        conn.read_file(f"{rig.private}/huge", 4096)
    assert time.monotonic() - started < 10
    rig.inside(["sh", "-c", f"printf READY > {rig.private}/ready"])
    assert conn.read_file(f"{rig.private}/ready", 4096) == b"READY"


def test_a_command_that_stalls_ends_at_its_deadline(conn):
    started = time.monotonic()
    with pytest.raises(AgentMachineTimeout):
        conn.run(["sleep", "60"], timeout=2)
    assert time.monotonic() - started < 6


def test_a_command_that_floods_is_cut_off(conn):
    with pytest.raises(AgentMachineFlood):
        conn.run(["head", "-c", "10000000", "/dev/zero"], max_output=100_000)


def test_a_file_is_copied_out_within_its_bound(rig, conn):
    rig.inside(["sh", "-c", f"head -c 300000 /dev/urandom > {rig.private}/disk"])
    chunks: list[bytes] = []
    assert conn.copy_file(f"{rig.private}/disk", chunks.append, 1_000_000, timeout=30) == 300_000
    expected = rig.inside(["cat", f"{rig.private}/disk"]).stdout
    assert b"".join(chunks) == expected
    with pytest.raises(AgentMachineFlood):
        conn.copy_file(f"{rig.private}/disk", chunks.append, 100_000, timeout=30)


def test_a_unix_socket_of_the_machine_is_forwarded_to_root(rig, conn, tmp_path):
    script = (
        f"import socket; s = socket.socket(socket.AF_UNIX); s.bind('{rig.private}/qmp.sock'); s.listen(1); "
        "c, _ = s.accept(); c.sendall(b'{\"QMP\": {}}'); c.close()"
    )
    server = threading.Thread(target=rig.inside, args=(["python3", "-c", script],), kwargs={"timeout": 30})
    server.start()
    deadline = time.monotonic() + 10
    while rig.inside(["test", "-S", f"{rig.private}/qmp.sock"]).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    local = tmp_path / "qmp.sock"
    conn.forward_unix(f"{rig.private}/qmp.sock", local)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(local))
        assert s.recv(100) == b'{"QMP": {}}'
    server.join(30)


@pytest.mark.parametrize(
    "text", ["root@", "-oProxyCommand=x", "root@host:port", "ro ot@host", "root@[::1", "root@host:0", "root@a;b"]
)
def test_an_agent_machine_address_that_could_mean_something_else_is_refused(text):
    with pytest.raises(InvalidInput):
        MachineAddress.parse(text)


def test_agent_machine_addresses_parse():
    assert MachineAddress.parse("10.0.3.5") == MachineAddress("root", "10.0.3.5", 22)
    assert MachineAddress.parse("root@agent-vm:2222") == MachineAddress("root", "agent-vm", 2222)
    assert MachineAddress.parse("root@[fd00::5]:22").ssh_host == "fd00::5"


@pytest.mark.parametrize("path", ["relative/path", "/a/../etc/shadow", "/a\nb", "/a;b", "/a$(id)", "//x"])
def test_a_remote_path_that_is_not_plain_is_refused(path):
    with pytest.raises(InvalidInput):
        check_remote_path(path)
