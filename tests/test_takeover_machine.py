"""Taking over a VM nested in an agent machine (takeover/agent/nested_vm.py, machine_disk.py, host/serve_back.py),
against a real machine made here (tests/agent_machine_helpers.py) and a real QEMU inside it with a monitor and a
qcow2 but no guest. Root in the machine is the agent: the ready file, the process, the monitor and the disk are
all its word, and each lie below must stop the takeover before anything changes, or cost only the agent."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from takeover.agent import nested_vm
from takeover.agent.machine import Connection
from takeover.agent.machine_disk import STAGING_NAME, fetch_disk
from takeover.agent.nested_vm import (
    find_nested_vm,
    nested_alive,
    nested_snapshots,
    remove_nested_file,
    restart_nested,
    tell_agent,
)
from takeover.errors import (
    DiskFormatError,
    DiskMismatch,
    InvalidInput,
    MonitorNotQMP,
    NotEnoughSpace,
    NotTheAgentsVM,
    ReadyFileError,
)
from takeover.host import serve_back
from takeover.host.files import ensure_host_dir
from takeover.host.monitor import Monitor
from takeover.models import CHECKPOINT_TAG, Endpoint
from takeover.steps.checkpoint import checkpoint_nested
from takeover.steps.relocate import relocate_disk
from takeover.steps.revoke import revoke_in_machine

from .agent_machine_helpers import AgentMachineRig, QemuInMachine, start_agent_machine, start_qemu_in_machine

pytestmark = pytest.mark.root
COPY_USER = "spvm-copy-test"
CHECKOUT = Path(__file__).resolve().parents[1]
READ_CONFIG = "from proxy.agent.config import load_config; c = load_config(); print(c.url, c.token)"


@pytest.fixture(scope="module")
def rig() -> Iterator[AgentMachineRig]:
    machine = start_agent_machine()
    yield machine
    machine.stop()


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A host directory the copy user can reach, as /var/lib/secret-proxy-vm is (pytest's tmp_path is not)."""
    base = Path(tempfile.mkdtemp(prefix="spvm-machine-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    yield ensure_host_dir(base / "host")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def conn(rig: AgentMachineRig, host_dir: Path) -> Iterator[Connection]:
    with Connection(rig.machine(), host_dir) as connection:
        yield connection


@pytest.fixture
def vm(rig: AgentMachineRig, agent_user, request) -> Iterator[QemuInMachine]:
    qemu = start_qemu_in_machine(rig, agent_user.pw_name, name=f"vm{abs(hash(request.node.name)) % 10**6}")
    yield qemu
    qemu.kill()
    rig.inside(["rm", "-rf", qemu.dir])


def test_the_nested_vm_is_found_over_ssh_as_its_ready_file_qemu_and_monitor_agree(vm, conn, host_dir, agent_user):
    source = find_nested_vm(conn, vm.ready, host_dir)
    assert source.machine == f"root@{vm.rig.address}"
    assert (source.pid, source.uid, source.disk, source.monitor) == (vm.pid, agent_user.pw_uid, vm.disk, vm.monitor)
    assert source.machine_proxy == Endpoint("127.0.0.1", vm.proxy_port)
    assert source.cmdline[0].endswith("qemu-system-x86_64") and source.block_nodes
    assert not Path(vm.disk).exists()  # all of it was read in the machine, none of it here


def test_a_ready_file_larger_than_the_bound_is_refused(vm, conn, host_dir):
    vm.rig.inside(["sh", "-c", f"head -c 200000 /dev/zero | tr '\\0' x >> {vm.ready}"], user=vm.user)
    with pytest.raises(ReadyFileError, match="more than|larger"):
        find_nested_vm(conn, vm.ready, host_dir)


def test_a_ready_file_without_its_marker_is_refused(vm, conn, host_dir):
    vm.rig.inside(["sh", "-c", f"echo '{{}}' > {vm.ready}"], user=vm.user)
    with pytest.raises(ReadyFileError, match="does not start with READY_FOR_TAKEOVER"):
        find_nested_vm(conn, vm.ready, host_dir)


def test_a_ready_file_naming_a_process_that_is_not_qemu_is_refused(vm, conn, host_dir):
    sleeper = subprocess.Popen([*vm.rig.enter, "runuser", "-u", vm.user, "--", "sleep", "60"])
    try:
        time.sleep(0.5)
        pid = int(vm.rig.inside(["pgrep", "-n", "-u", vm.user, "sleep"]).stdout)
        vm.write_ready(pid=pid, pidfile=None)
        with pytest.raises(DiskMismatch, match="not QEMU"):
            find_nested_vm(conn, vm.ready, host_dir)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_pidfile_that_disagrees_with_the_ready_file_is_refused(vm, conn, host_dir):
    vm.rig.inside(["sh", "-c", f"echo 1 > {vm.pidfile}"], user=vm.user)
    with pytest.raises(NotTheAgentsVM, match="pidfile"):
        find_nested_vm(conn, vm.ready, host_dir)


def test_a_disk_that_qemu_does_not_have_open_is_refused(vm, conn, host_dir):
    other = f"{vm.dir}/other.qcow2"
    vm.rig.inside(["qemu-img", "create", "-q", "-f", "qcow2", other, "16M"], user=vm.user)
    vm.write_ready(disk=other)
    with pytest.raises(DiskMismatch, match="does not have"):
        find_nested_vm(conn, vm.ready, host_dir)


def test_a_monitor_that_does_not_speak_qmp_is_refused(vm, conn, host_dir):
    fake = f"{vm.dir}/fake.sock"
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1]);s.listen(1)\n"
        "while True:\n c,_=s.accept();c.sendall(b'220 not qmp\\r\\n' * 100);c.close()\n"
    )
    server = subprocess.Popen([*vm.rig.enter, "runuser", "-u", vm.user, "--", "/usr/bin/python3", "-c", script, fake])
    try:
        for _ in range(50):
            if vm.rig.inside(["test", "-S", fake]).returncode == 0:
                break
            time.sleep(0.1)
        vm.write_ready(monitor=fake)
        with pytest.raises(MonitorNotQMP):
            find_nested_vm(conn, vm.ready, host_dir)
    finally:
        server.kill()
        server.wait()


def test_checkpoint_stops_the_nested_qemu_and_a_rollback_starts_it_again_from_the_snapshot(vm, conn, host_dir):
    source = find_nested_vm(conn, vm.ready, host_dir)
    result = checkpoint_nested(source, conn, host_dir)
    assert result.tag == CHECKPOINT_TAG
    assert not nested_alive(conn, source.pid, source.pid_start_ticks)
    assert CHECKPOINT_TAG in nested_snapshots(conn, vm.disk)
    restart_nested(conn, source, load_checkpoint=True)
    vm.write_ready(pid=None)  # the replay rewrote the pidfile; the ready file names it
    again = find_nested_vm(conn, vm.ready, host_dir)
    assert again.pid != source.pid
    assert again.uid == source.uid != 0  # as the agent's user in its machine, never as root
    assert again.cmdline[-2:] == ["-loadvm", CHECKPOINT_TAG]
    with Monitor(host_dir / nested_vm.MONITOR_NAME) as mon:
        assert mon.execute("query-status")["status"] == "running"


def test_revoke_removes_only_what_step_one_saw_in_the_machine(vm, conn, host_dir):
    source = find_nested_vm(conn, vm.ready, host_dir)
    checkpoint_nested(source, conn, host_dir)
    # The agent swaps its disk for another file, and its pidfile for a file of root's in the machine.
    vm.rig.inside(["mv", vm.disk, f"{vm.disk}.moved"])
    vm.rig.inside(["cp", f"{vm.disk}.moved", vm.disk])
    vm.rig.inside(["sh", "-c", f"rm -f {vm.pidfile} && echo root > {vm.pidfile}"])
    result = revoke_in_machine(source, conn, keep_source=False)
    outcomes = {item["path"]: item["outcome"] for item in result.removed + result.kept}
    assert outcomes[vm.monitor] in ("removed", "already gone")  # QEMU removes its socket when it quits
    assert outcomes[vm.ready] == "removed"
    assert outcomes[vm.pidfile].startswith("not removed: owned by uid 0")
    assert outcomes[vm.disk] == "not removed: not the file checked in step 1"
    assert vm.rig.inside(["test", "-e", vm.disk]).returncode == 0
    assert vm.rig.inside(["test", "-e", vm.ready]).returncode != 0


def test_revoke_refuses_while_the_nested_qemu_runs_again(vm, conn, host_dir):
    source = find_nested_vm(conn, vm.ready, host_dir)
    with pytest.raises(Exception, match="running again"):
        revoke_in_machine(source, conn, keep_source=False)
    assert vm.alive()


def test_the_disk_comes_out_as_bytes_owned_by_the_copy_user_and_is_flattened_by_the_local_rules(vm, conn, host_dir):
    source = find_nested_vm(conn, vm.ready, host_dir)
    checkpoint_nested(source, conn, host_dir)
    staged = fetch_disk(conn, source, host_dir, COPY_USER)
    st = os.lstat(staged)
    assert st.st_uid == pwd.getpwnam(COPY_USER).pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(host_dir).st_mode) == 0o711  # the copy user traverses, lists nothing
    result = relocate_disk(staged, host_dir, expect_inode=(st.st_dev, st.st_ino), self_contained=True)
    final = Path(result.path)
    assert final.stat().st_uid == 0 and stat.S_IMODE(final.stat().st_mode) == 0o600
    assert result.virtual_size == 64 * 2**20


def test_a_disk_from_a_machine_with_a_backing_file_is_refused(vm, conn, host_dir):
    overlay = f"{vm.dir}/overlay.qcow2"
    vm.rig.inside(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", overlay, "1M"], user=vm.user
    )
    source = find_nested_vm(conn, vm.ready, host_dir)
    staged = fetch_disk(conn, replace(source, disk=overlay), host_dir, COPY_USER)
    st = os.lstat(staged)
    with pytest.raises(DiskFormatError, match="backing files"):
        relocate_disk(staged, host_dir, expect_inode=(st.st_dev, st.st_ino), self_contained=True)
    assert not (host_dir / "disk.qcow2").exists()


def test_a_disk_larger_than_the_host_can_take_is_cut_off_and_nothing_kept(vm, conn, host_dir):
    small = host_dir.parent / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400M,mode=0755", "spvm-small", str(small)], check=True)
    try:
        host_dir = ensure_host_dir(small / "host")
        big = f"{vm.dir}/big.qcow2"
        made = vm.rig.inside(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", big, "200M"], user=vm.user
        )
        assert made.returncode == 0, made.stderr
        source = find_nested_vm(conn, vm.ready, host_dir)
        with pytest.raises(NotEnoughSpace, match="larger than"):
            fetch_disk(conn, replace(source, disk=big), host_dir, COPY_USER)
        assert not (host_dir / STAGING_NAME).exists()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_the_agent_machine_is_told_its_new_address_and_token(vm, conn, agent_user):
    written = tell_agent(conn, "http://10.213.0.1:3737", b"tok-123\n", agent_user.pw_uid, agent_user.pw_gid)
    assert written == [nested_vm.AGENT_URL_FILE, nested_vm.AGENT_TOKEN_FILE]
    assert vm.rig.inside(["cat", nested_vm.AGENT_URL_FILE]).stdout == b"http://10.213.0.1:3737\n"
    mode = vm.rig.inside(["stat", "-c", "%a %U", nested_vm.AGENT_TOKEN_FILE]).stdout.decode().split()
    assert mode == ["600", agent_user.pw_name]
    assert not Path(nested_vm.AGENT_URL_FILE).exists()  # written in the machine, not on this host
    # The agent's tools there read both when their variables are unset.
    said = vm.rig.inside(
        ["env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={CHECKOUT}", "python3", "-c", READ_CONFIG],
        user=agent_user.pw_name,
    )
    assert said.stdout.decode().split() == ["http://10.213.0.1:3737", "tok-123"], said.stderr


def test_remove_nested_file_never_removes_a_file_of_another_kind(vm, conn, host_dir):
    source = find_nested_vm(conn, vm.ready, host_dir)
    assert remove_nested_file(conn, vm.dir, "regular file", source) == "not removed: not a regular file"
    assert remove_nested_file(conn, f"{vm.dir}/nothing", "regular file", source) == "already gone"


# -- the served address: the agent machine alone reaches it ----------------------------------------------


def _neighbour(rig: AgentMachineRig) -> str:
    """A second namespace on the machine's bridge: another VM of this host's, not the agent machine."""
    name = f"spvm-nb{rig.index}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(
        ["ip", "link", "add", f"spvm-n{rig.index}", "type", "veth", "peer", "name", f"spvm-m{rig.index}"], check=True
    )
    subprocess.run(["ip", "link", "set", f"spvm-n{rig.index}", "master", rig.bridge, "up"], check=True)
    subprocess.run(["ip", "link", "set", f"spvm-m{rig.index}", "netns", name], check=True)
    for args in (
        ["addr", "add", f"10.213.{rig.index}.3/24", "dev", f"spvm-m{rig.index}"],
        ["link", "set", f"spvm-m{rig.index}", "up"],
    ):
        subprocess.run(["ip", "-n", name, *args], check=True)
    return name


def _connects(argv_prefix: list[str], host: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(('{host}', {port}), timeout=3).close()"
    return (
        subprocess.run(
            [*argv_prefix, "/usr/bin/python3", "-I", "-c", probe], capture_output=True, timeout=30
        ).returncode
        == 0
    )


def test_the_served_proxy_is_reachable_from_the_agent_machine_alone(rig, agent_user, tmp_path):
    serve_on = Endpoint(rig.host_address, 3900 + rig.index)
    listener = socket.create_server((serve_on.host, serve_on.port))
    listener.settimeout(0.2)
    neighbour = _neighbour(rig)
    accepted: list[str] = []
    try:
        table = serve_back.apply(serve_on, rig.address, tmp_path)

        def drain() -> None:
            while True:
                try:
                    conn, peer = listener.accept()
                except TimeoutError:
                    return
                accepted.append(peer[0])
                conn.close()

        assert _connects(rig.enter, serve_on.host, serve_on.port)  # the agent machine: in
        drain()
        assert accepted == [rig.address]
        assert not _connects(["ip", "netns", "exec", neighbour], serve_on.host, serve_on.port)  # another VM: dropped
        as_user = ["setpriv", f"--reuid={agent_user.pw_uid}", f"--regid={agent_user.pw_gid}", "--clear-groups"]
        assert not _connects(as_user, serve_on.host, serve_on.port)  # a local user of this host: refused
        assert _connects([], serve_on.host, serve_on.port)  # root here (the takeover's own checks)
        drain()
        assert accepted == [rig.address, serve_on.host]  # neither the neighbour nor the local user got through
        assert serve_back.remove(serve_on) and table
    finally:
        serve_back.remove(serve_on)
        listener.close()
        subprocess.run(["ip", "netns", "del", neighbour], check=False)
        subprocess.run(["ip", "link", "del", f"spvm-n{rig.index}"], check=False, capture_output=True)


@pytest.mark.parametrize(
    "serve_on, error",
    [
        (Endpoint("127.0.0.1", 3737), "loopback"),
        (Endpoint("0.0.0.0", 3737), "every network"),
        (Endpoint("192.0.2.1", 3737), "cannot be served from this host"),
    ],
)
def test_a_serve_on_address_the_machine_cannot_use_or_that_serves_everyone_is_refused(serve_on, error, rig):
    with pytest.raises(Exception, match=error):
        serve_back.check_serve_on(serve_on, rig.address)


def test_the_default_served_address_is_this_hosts_side_of_the_route_to_the_machine(rig):
    assert serve_back.route_source(rig.address) == rig.host_address


# -- what the operator names: refused before anything is touched ------------------------------------------


def _run_args(*more: str) -> list[str]:
    return ["run", "--ready-file", "/srv/agent/run/ready", "--agent-machine", "root@10.213.9.2", *more]


@pytest.mark.parametrize(
    "more, error",
    [
        ((), "needs --agent-machine-key and --agent-machine-known-hosts"),
        (
            ("--agent-machine-key", "/k", "--agent-machine-known-hosts", "/h", "--ssh-listen", "10.0.0.1:2223"),
            "loopback",
        ),
        (
            ("--agent-machine-key", "/k", "--agent-machine-known-hosts", "/h", "--proxy-listen", "127.0.0.1:9"),
            "--serve-on",
        ),
    ],
)
def test_agent_machine_options_that_would_expose_the_vm_or_guess_a_key_are_refused(more, error):
    from takeover.cli import build_parser, config_from_args

    with pytest.raises(InvalidInput, match=error):
        config_from_args(build_parser().parse_args(_run_args(*more)))


def test_serve_on_without_an_agent_machine_is_refused():
    from takeover.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--ready-file", "/r", "--serve-on", "10.0.0.1:3737"])
    with pytest.raises(InvalidInput, match="--serve-on is for an agent machine"):
        config_from_args(args)


@pytest.mark.parametrize(
    "which, mode, error", [("key", 0o644, "readable by others"), ("known_hosts", 0o666, "writable")]
)
def test_a_machine_key_or_pinned_host_key_others_could_read_or_change_is_refused(rig, tmp_path, which, mode, error):
    from takeover.agent.machine import machine_of
    from takeover.config import TakeoverConfig

    key, known = tmp_path / "key", tmp_path / "known_hosts"
    shutil.copy(rig.work / "root_key", key)
    shutil.copy(rig.work / "known_hosts", known)
    os.chmod(key, 0o600)
    os.chmod(known, 0o644)
    os.chmod(key if which == "key" else known, mode)
    cfg = TakeoverConfig(agent_machine=f"root@{rig.address}", agent_machine_key=key, agent_machine_known_hosts=known)
    with pytest.raises(InvalidInput, match=error):
        machine_of(cfg)
