"""Step 1, 2 and 7 against real QEMU processes (`-machine none`: a monitor and an open qcow2, no guest),
and the clear errors the takeover gives before it changes anything."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
import xml.dom.minidom
from pathlib import Path

import pytest

from takeover.agent.diskimage import inspect_image
from takeover.agent.replay import start_source_vm
from takeover.config import read_proxy_config
from takeover.errors import (
    DiskMismatch,
    InvalidInput,
    MonitorNotQMP,
    MonitorUnreachable,
    NotTheAgentsVM,
    ReadyFileError,
)
from takeover.host.files import ensure_host_dir
from takeover.host.monitor import Monitor
from takeover.host.runners import HostVMSpec, libvirt_domain_xml, qemu_command
from takeover.journal import Journal
from takeover.models import CHECKPOINT_TAG, Endpoint
from takeover.runbook import recover_interrupted_checkpoint
from takeover.steps import IN_ORDER
from takeover.steps.checkpoint import save_checkpoint_and_stop
from takeover.steps.find_vm import explicit_ready, find_and_check_vm, read_ready_file
from takeover.steps.revoke import remove_agent_file

from .takeover_helpers import (
    agent_workdir,
    assert_replayed_and_quit,
    fake_socket_server,
    host_vm_spec,
    make_qcow2,
    remove_workdir,
    start_monitor_only_qemu,
    write_ready,
)

ROOT = Path(__file__).resolve().parent.parent
PROXY = Endpoint("127.0.0.1", 3737)
AGENT = "nobody"  # step 1 takes only an unprivileged user's VM: these QEMUs run as one


@pytest.fixture
def host_dir(tmp_path):
    return ensure_host_dir(tmp_path / "host")


@pytest.fixture
def qemu():
    workdir = agent_workdir(AGENT)
    vm = start_monitor_only_qemu(workdir, make_qcow2(workdir / "agent.qcow2", owner=AGENT), user=AGENT)
    yield vm
    vm.kill()
    remove_workdir(workdir)


def chown_to_agent(*paths: Path) -> None:
    entry = pwd.getpwnam(AGENT)
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)


# -- the ready file ------------------------------------------------------------------------------


def test_missing_ready_file_says_the_vm_is_not_ready(tmp_path):
    with pytest.raises(ReadyFileError, match="has not signalled it is ready") as err:
        read_ready_file(tmp_path / "ready")
    assert "--ready-file" in err.value.hint


def test_ready_file_must_start_with_the_magic_line(tmp_path):
    path = tmp_path / "ready"
    path.write_text('{"version": 1}\n')
    with pytest.raises(ReadyFileError, match="does not start with READY_FOR_TAKEOVER"):
        read_ready_file(path)


def test_ready_file_json_is_validated(tmp_path):
    path = write_ready(tmp_path / "ready", monitor="relative.sock", disk="/d.qcow2")
    with pytest.raises(ReadyFileError, match="monitor must be an absolute path"):
        read_ready_file(path)
    path = write_ready(
        tmp_path / "ready", monitor="/m.sock", disk="/d.qcow2", proxy={"host": "evil.example", "port": 1}
    )
    with pytest.raises(ReadyFileError, match="not an IP address"):
        read_ready_file(path)
    path.write_text("READY_FOR_TAKEOVER\n{oops")
    with pytest.raises(ReadyFileError, match="invalid"):
        read_ready_file(path)


def test_ready_file_is_not_read_through_a_symlink(tmp_path):
    (tmp_path / "ready").symlink_to("/etc/shadow")
    with pytest.raises(ReadyFileError, match="without following links"):
        read_ready_file(tmp_path / "ready")


def test_ready_file_fields_are_parsed(tmp_path):
    path = write_ready(
        tmp_path / "ready",
        monitor="/run/q.sock",
        disk="/img/disk.qcow2",
        pid=42,
        proxy={"host": "127.0.0.1", "port": 3838},
        memory_mb=512,
        cpus=2,
        setup_key_pub="/img/setup_key.pub",
    )
    ready = read_ready_file(path)
    assert (ready.monitor, ready.disk, ready.pid, ready.proxy.port) == (
        Path("/run/q.sock"),
        Path("/img/disk.qcow2"),
        42,
        3838,
    )
    # vm_image writes the VM's size; root takes it from QEMU (step 1) and the operator (the host's VM).
    assert not hasattr(ready, "memory_mb") and not hasattr(ready, "cpus")


# -- the monitor ---------------------------------------------------------------------------------


@pytest.mark.root
def test_a_socket_that_sends_garbage_is_not_qmp(tmp_path, host_dir):
    disk = make_qcow2(tmp_path / "d.qcow2", owner=AGENT)
    with fake_socket_server(tmp_path / "fake.sock", b"HTTP/1.1 200 OK\r\n\r\nhello\n") as sock:
        chown_to_agent(sock)
        with pytest.raises(MonitorNotQMP, match="does not speak QMP"):
            Monitor(sock, timeout=2)
        # The takeover does not get that far: root's server is not the agent's, whatever it would say.
        with pytest.raises(NotTheAgentsVM, match="served by pid"):
            find_and_check_vm(explicit_ready(sock, disk), host_dir)


def test_a_refused_peer_is_refused_on_its_credentials_before_anything_it_sent_is_read(tmp_path):
    """SO_PEERCRED first: root never parses the greeting (nor answers it) of a process it will not take over."""
    import socket
    import threading

    path = tmp_path / "other.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(3)
            try:
                conn.sendall(b"{not json, a greeting root must never parse\n")
                received.append(conn.recv(100))
            except (BrokenPipeError, ConnectionResetError):
                # Hung up before our greeting was taken, or with it unread (the kernel then resets).
                received.append(b"")
            except OSError as exc:
                received.append(repr(exc).encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    seen = []

    def refuse(peer):
        seen.append(peer)
        raise DiskMismatch(f"pid {peer.pid} is not the agent's QEMU")

    with pytest.raises(DiskMismatch, match=f"pid {os.getpid()} is not"):
        Monitor(path, timeout=2, check_peer=refuse)
    thread.join(5)
    server.close()
    assert seen[0].pid == os.getpid() and seen[0].uid == os.getuid()
    assert received == [b""], received  # the client hung up without a byte: no qmp_capabilities, no reply


def test_a_silent_socket_is_not_qmp(tmp_path):
    with fake_socket_server(tmp_path / "silent.sock", None) as sock:
        with pytest.raises(MonitorNotQMP, match="no greeting"):
            Monitor(sock, timeout=1)


def test_a_regular_file_is_not_a_monitor(tmp_path):
    (tmp_path / "m.sock").write_text("")
    with pytest.raises(MonitorNotQMP, match="not a unix socket"):
        Monitor(tmp_path / "m.sock")


def test_a_missing_socket_is_unreachable(tmp_path):
    with pytest.raises(MonitorUnreachable, match="does not exist"):
        Monitor(tmp_path / "nothing.sock")


@pytest.mark.root
def test_a_qemu_without_the_named_disk_is_refused(tmp_path, host_dir, qemu):
    other = make_qcow2(tmp_path / "other.qcow2", owner=AGENT)
    with pytest.raises(DiskMismatch, match="does not have .*other.qcow2 open"):
        find_and_check_vm(explicit_ready(qemu.monitor, other), host_dir)
    assert qemu.alive()  # nothing was changed


@pytest.mark.root
def test_a_ready_file_lying_about_the_pid_is_refused(tmp_path, host_dir, qemu):
    ready = write_ready(tmp_path / "ready", monitor=str(qemu.monitor), disk=str(qemu.disk), pid=qemu.pid + 1)
    chown_to_agent(ready)
    with pytest.raises(DiskMismatch, match="belongs to pid"):
        find_and_check_vm(read_ready_file(ready), host_dir)


@pytest.mark.root
def test_the_disk_is_found_through_a_symlinked_name(host_dir, qemu):
    link = qemu.disk.parent / "alias.qcow2"
    link.symlink_to(qemu.disk)
    source = find_and_check_vm(explicit_ready(qemu.monitor, link), host_dir)
    assert source.disk == str(qemu.disk) and source.pid == qemu.pid


@pytest.mark.root
def test_find_then_checkpoint_saves_the_snapshot_and_stops_qemu(tmp_path, host_dir, qemu):
    source = find_and_check_vm(explicit_ready(qemu.monitor, qemu.disk), host_dir)
    assert source.pid == qemu.pid and source.uid == pwd.getpwnam(AGENT).pw_uid
    assert source.cmdline[0].endswith("qemu-system-x86_64")
    assert source.block_nodes == [source.vmstate_node]
    result = save_checkpoint_and_stop(source)
    assert result.method == "snapshot-save"
    assert not qemu.alive()
    assert CHECKPOINT_TAG in inspect_image(qemu.disk).snapshots


@pytest.mark.root
def test_checkpoint_overwrites_a_stale_checkpoint_from_an_earlier_attempt(host_dir):
    workdir = agent_workdir(AGENT)
    disk = make_qcow2(workdir / "agent.qcow2", owner=AGENT)
    subprocess.run(["runuser", "-u", AGENT, "--", "qemu-img", "snapshot", "-c", CHECKPOINT_TAG, str(disk)], check=True)
    vm = start_monitor_only_qemu(workdir, disk, user=AGENT)
    try:
        source = find_and_check_vm(explicit_ready(vm.monitor, disk), host_dir)
        assert any("already had snapshots" in n for n in source.notes)
        save_checkpoint_and_stop(source)
        assert inspect_image(disk).snapshots == (CHECKPOINT_TAG,)
    finally:
        vm.kill()
        remove_workdir(workdir)


# -- rollback's replay of the agent's command line -----------------------------------------------


# (the command line's checks: tests/test_takeover_rollback_session.py)


@pytest.mark.root
def test_rollback_replays_the_agents_qemu_as_the_agent(tmp_path, host_dir):
    # The agent's directory and QEMU belong to an unprivileged user; the replay must too.
    nobody = pwd.getpwnam("nobody")
    agent_dir = Path(tempfile.mkdtemp(prefix="takeover-agent-", dir="/tmp"))
    os.chown(agent_dir, nobody.pw_uid, nobody.pw_gid)
    disk = make_qcow2(agent_dir / "agent.qcow2")
    os.chown(disk, nobody.pw_uid, nobody.pw_gid)
    vm = start_monitor_only_qemu(agent_dir, disk, user="nobody")
    try:
        source = find_and_check_vm(explicit_ready(vm.monitor, disk), host_dir)
        assert source.uid == nobody.pw_uid
        save_checkpoint_and_stop(source)
        start_source_vm(source, host_dir / "rollback-qemu.log")
        assert_replayed_and_quit(vm.monitor, nobody.pw_uid)
    finally:
        vm.kill()
        subprocess.run(["rm", "-rf", str(agent_dir)], check=False)


# -- step 7: only the agent's own files are removed ----------------------------------------------


@pytest.mark.root
def test_revoke_removes_only_files_the_agent_owns(tmp_path):
    nobody = pwd.getpwnam("nobody").pw_uid
    mine = tmp_path / "qemu.pid"
    mine.write_text("1")
    os.chown(mine, nobody, -1)
    roots = tmp_path / "shadow"
    roots.write_text("root's")
    link = tmp_path / "link"
    link.symlink_to(roots)
    os.lchown(link, nobody, -1)
    assert remove_agent_file(mine, "file", nobody) == "removed"
    assert "not the agent" in remove_agent_file(roots, "file", nobody)
    assert "not a file" in remove_agent_file(link, "file", nobody)
    assert roots.read_text() == "root's"
    assert remove_agent_file(tmp_path / "gone", "file", nobody) == "already gone"


@pytest.mark.root
def test_revoke_removes_a_disk_only_if_it_is_the_inode_checked_in_step_1(tmp_path):
    nobody = pwd.getpwnam("nobody").pw_uid
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"x")
    os.chown(disk, nobody, -1)
    st = os.stat(disk)
    assert "not the file checked" in remove_agent_file(disk, "file", nobody, inode=(st.st_dev, st.st_ino + 1))
    assert remove_agent_file(disk, "file", nobody, inode=(st.st_dev, st.st_ino)) == "removed"


# -- clear errors before anything changes --------------------------------------------------------


def run_cli(*args, user=None):
    argv = [sys.executable, "-m", "takeover", *args]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.root
def test_cli_refuses_to_run_without_root():
    result = run_cli("run", "--ready-file", "/nonexistent/ready", user="nobody")
    assert result.returncode == 1
    assert "must run as root" in result.stderr and "what to do:" in result.stderr


@pytest.mark.root
def test_cli_without_a_ready_file_says_what_to_do(tmp_path):
    result = run_cli("run", "--host-dir", str(tmp_path / "host"), "--ready-file", str(tmp_path / "ready"))
    assert result.returncode == 1
    assert "no ready file" in result.stderr and "what to do:" in result.stderr
    assert os.path.exists(tmp_path / "host/journal.json")  # the failed step 1 is journaled
    assert not os.path.exists(tmp_path / "host/disk.qcow2")


@pytest.mark.root
def test_cli_with_a_planted_socket_refuses(tmp_path):
    disk = make_qcow2(tmp_path / "d.qcow2", owner=AGENT)
    with fake_socket_server(tmp_path / "planted.sock", b"\x00\x01garbage\n") as sock:
        chown_to_agent(sock)
        result = run_cli("run", "--host-dir", str(tmp_path / "host"), "--monitor", str(sock), "--disk", str(disk))
    # Refused on the kernel's credentials (root's test process serves it), before its garbage is read.
    assert result.returncode == 1 and "is served by pid" in result.stderr


@pytest.mark.root
def test_host_dir_prepared_by_someone_else_is_refused(tmp_path):
    planted = tmp_path / "host"
    planted.mkdir(mode=0o700)
    os.chown(planted, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(InvalidInput, match="owned by uid"):
        ensure_host_dir(planted)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(InvalidInput, match="writable by others"):
        ensure_host_dir(open_dir)
    (tmp_path / "link").symlink_to(tmp_path / "real-host")
    (tmp_path / "real-host").mkdir(mode=0o700)
    with pytest.raises(InvalidInput, match="is not a directory \\(a symlink or a file\\)"):
        ensure_host_dir(tmp_path / "link")


def test_host_dir_is_created_0700(tmp_path):
    path = ensure_host_dir(tmp_path / "new")
    assert os.stat(path).st_mode & 0o777 == 0o700


@pytest.mark.root
def test_proxy_config_is_checked_before_use(tmp_path):
    good = tmp_path / "proxy.toml"
    good.write_text('telegram_token = "123:abc"\ntelegram_chat_id = 42\n')
    os.chmod(good, 0o600)
    assert b"telegram_token" in read_proxy_config(good)
    os.chmod(good, 0o644)
    with pytest.raises(InvalidInput, match="readable by others"):
        read_proxy_config(good)
    bad = tmp_path / "bad.toml"
    bad.write_text('telegram_tokn = "typo"\n')
    os.chmod(bad, 0o600)
    with pytest.raises(InvalidInput, match="unknown settings"):
        read_proxy_config(bad)


def test_endpoints_accept_only_ip_literals_and_ports():
    assert Endpoint.parse("127.0.0.1:2223") == Endpoint("127.0.0.1", 2223)
    for bad in ("localhost:22", "127.0.0.1:0", "127.0.0.1:99999", "1.2.3.4", "127.0.0.1:22,hostfwd=x"):
        with pytest.raises(InvalidInput):
            Endpoint.parse(bad)


# -- the host's VM description -------------------------------------------------------------------


def spec(tmp_path) -> HostVMSpec:
    return host_vm_spec(tmp_path, PROXY)


def test_qemu_command_forwards_only_the_proxy_and_a_host_only_ssh_port(tmp_path):
    argv = qemu_command(spec(tmp_path), "secret-proxy-vm")
    joined = " ".join(argv)
    assert "hostfwd=tcp:127.0.0.1:3737-:3737,hostfwd=tcp:127.0.0.1:2223-:22" in joined
    assert joined.count("hostfwd=") == 2
    assert '"backing": null' in joined  # no backing file is ever opened
    assert "-sandbox" in argv and argv[argv.index("-runas") + 1] == "secret-proxy-vm"
    assert "-daemonize" not in argv


def test_libvirt_domain_is_valid_xml_with_user_networking(tmp_path):
    text = libvirt_domain_xml(spec(tmp_path))
    doc = xml.dom.minidom.parseString(text)
    assert doc.documentElement.getAttribute("type") == "qemu"
    args = [a.getAttribute("value") for a in doc.getElementsByTagName("qemu:arg")]
    assert any("hostfwd=tcp:127.0.0.1:2223-:22" in a for a in args)
    assert doc.getElementsByTagName("backingStore")  # an empty backingStore: no backing chain


def test_unsafe_paths_never_reach_a_command_line(tmp_path):
    with pytest.raises(InvalidInput):
        HostVMSpec(**{**spec(tmp_path).__dict__, "disk": Path("/tmp/a,b.qcow2")})


@pytest.mark.root
def test_a_run_that_died_after_the_snapshot_resumes_after_the_checkpoint(host_dir, qemu):
    source = find_and_check_vm(explicit_ready(qemu.monitor, qemu.disk), host_dir)
    journal = Journal.new(host_dir, {})
    journal.begin("find_vm")
    journal.finish("find_vm", source.to_dict())
    journal.begin("checkpoint")
    save_checkpoint_and_stop(source)  # ... and the takeover died before journaling it
    recover_interrupted_checkpoint(journal)
    assert journal.done("checkpoint") and IN_ORDER.first_step_to_run(journal) == "relocate"


@pytest.mark.root
def test_a_run_that_died_before_the_snapshot_checks_the_vm_again(host_dir, qemu):
    source = find_and_check_vm(explicit_ready(qemu.monitor, qemu.disk), host_dir)
    journal = Journal.new(host_dir, {})
    journal.begin("find_vm")
    journal.finish("find_vm", source.to_dict())
    journal.begin("checkpoint")
    recover_interrupted_checkpoint(journal)
    assert not journal.done("checkpoint") and IN_ORDER.first_step_to_run(journal) == "find_vm"
    assert qemu.alive()


@pytest.mark.parametrize(
    ("memory", "cpus", "error"),
    [
        ({"base-memory": 268435456, "plugged-memory": 0}, [{"cpu-index": 0}], None),
        ({"base-memory": -1}, [], "base memory must be an integer"),
        ({"base-memory": "256M"}, [], "base memory must be an integer"),
        ({"base-memory": 2**60}, [], "base memory must be an integer"),
        ("256", [], "a shape QEMU never uses"),
        ({"base-memory": 0}, {"cpus": 1}, "a shape QEMU never uses"),
    ],
)
def test_the_vm_size_the_agents_qemu_answers_is_checked(memory, cpus, error):
    """The agent may ptrace its QEMU and answer anything: the size is bounded before step 1 uses it."""
    from takeover.agent.qemu_answers import vm_size
    from takeover.errors import TakeoverError

    class Answers:
        def execute(self, command: str) -> object:
            return {"query-memory-size-summary": memory, "query-cpus-fast": cpus}[command]

    if error is None:
        assert vm_size(Answers()) == (256, 1)
    else:
        with pytest.raises(TakeoverError, match=error):
            vm_size(Answers())
