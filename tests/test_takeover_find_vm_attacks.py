"""A hostile agent against step 1: aim root's takeover at a VM that is not its own, be someone it should not
be, choose where root's QEMU listens, or pass off another program as QEMU.

Every attack is played with real Unix users and real processes: QEMU with `-machine none` (a real QMP
monitor, a real open qcow2 and a real user-mode network forward, no guest), and for the fake QEMU a copy of
python serving QMP. Each must be refused at step 1 with nothing changed.
"""

from __future__ import annotations

import ctypes
import grp
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from takeover.agent.diskimage import inspect_image
from takeover.agent.owner import HostBoundary
from takeover.agent.proxy_address import Forward, check_agent_address, choose_proxy_address, confirmed_forwards
from takeover.errors import (
    DiskFormatError,
    InvalidInput,
    NotTheAgentsVM,
    PrivilegedAgent,
    ReadyFileError,
    UnsafeProxyAddress,
    UntrustedQemu,
)
from takeover.host.files import ensure_host_dir
from takeover.host.monitor import Monitor
from takeover.models import Endpoint
from takeover.steps.find_vm import check_pidfile, explicit_ready, find_and_check_vm, read_ready_file
from takeover.steps.verify import read_agent_private_key
from vm_image import proc
from vm_image.qemu_command import VmConfig, qemu_argv

from .takeover_helpers import (
    MonitorOnlyQemu,
    agent_workdir,
    ensure_user,
    free_port,
    make_qcow2,
    remove_workdir,
    start_monitor_only_qemu,
)

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
AGENT = "spvm-find-agent"
OTHER = "spvm-find-other"
GROUPED = "spvm-find-grouped"


@pytest.fixture(scope="module", autouse=True)
def users() -> None:
    ensure_user(AGENT)
    ensure_user(OTHER)


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    return ensure_host_dir(tmp_path / "host")


def run_vm(user: str, **options: object) -> tuple[MonitorOnlyQemu, Path]:
    workdir = agent_workdir(user)
    disk = make_qcow2(workdir / "disk.qcow2", owner=user)
    return start_monitor_only_qemu(workdir, disk, user=user, **options), workdir


@pytest.fixture
def agent_vm() -> Iterator[MonitorOnlyQemu]:
    vm, workdir = run_vm(AGENT)
    yield vm
    vm.kill()
    remove_workdir(workdir)


@pytest.fixture
def other_vm() -> Iterator[MonitorOnlyQemu]:
    vm, workdir = run_vm(OTHER)
    yield vm
    vm.kill()
    remove_workdir(workdir)


def as_user(user: str, *argv: str) -> None:
    subprocess.run(["runuser", "-u", user, "--", *argv], check=True, capture_output=True, timeout=60)


def agent_writes_ready(directory: Path, **fields: object) -> Path:
    """The agent writes a ready file in its own directory, as its own user (so root did not make it)."""
    text = "READY_FOR_TAKEOVER\n" + json.dumps({"version": 1, **fields}) + "\n"
    path = directory / "ready"
    subprocess.run(
        ["runuser", "-u", AGENT, "--", "tee", str(path)], input=text, text=True, check=True, capture_output=True
    )
    return path


def takeover_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "takeover", "run", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_untouched(vm: MonitorOnlyQemu, disk_hash: str) -> None:
    """The VM still runs as it did: same process, its monitor answers, `running`, its disk byte for byte."""
    assert vm.alive()
    with Monitor(vm.monitor) as mon:
        assert mon.peer.pid == vm.pid
        assert mon.execute("query-status")["status"] == "running"
    assert sha256(vm.disk) == disk_hash


# -- 1. a VM that is not the agent's --------------------------------------------------------------


def test_a_ready_file_naming_another_users_vm_is_refused_and_that_vm_runs_on(tmp_path, other_vm):
    agent_dir = agent_workdir(AGENT)
    try:
        disk_hash = sha256(other_vm.disk)
        ready = agent_writes_ready(
            agent_dir,
            monitor=str(other_vm.monitor),
            disk=str(other_vm.disk),
            pid=other_vm.pid,
            pidfile=str(other_vm.pidfile),
            proxy={"host": "127.0.0.1", "port": other_vm.proxy_port},
        )
        result = takeover_run("--ready-file", str(ready), "--host-dir", str(tmp_path / "host"))
        assert result.returncode == 1, result.stderr
        assert "is not one user's" in result.stderr and f"{AGENT}'s" in result.stderr
        assert f"{OTHER}'s" in result.stderr and "what to do:" in result.stderr
        journal = json.loads((tmp_path / "host/journal.json").read_text())
        assert journal["steps"]["find_vm"]["status"] == "failed"
        assert journal["steps"].get("checkpoint", {}).get("status", "pending") == "pending"
        assert_untouched(other_vm, disk_hash)
    finally:
        remove_workdir(agent_dir)


def test_a_symlink_to_another_users_socket_is_refused(host_dir, other_vm):
    agent_dir = agent_workdir(AGENT)
    try:
        as_user(AGENT, "ln", "-s", str(other_vm.monitor), str(agent_dir / "qmp.sock"))
        disk_hash = sha256(other_vm.disk)
        with pytest.raises(NotTheAgentsVM, match="symlink"):
            find_and_check_vm(explicit_ready(agent_dir / "qmp.sock", other_vm.disk), host_dir)
        assert_untouched(other_vm, disk_hash)
    finally:
        remove_workdir(agent_dir)


def test_the_agents_own_ready_file_naming_its_own_vm_is_accepted(agent_vm, host_dir):
    """The same checks pass the honest case: one owner for everything, and the proxy where QEMU forwards it."""
    ready = agent_writes_ready(
        agent_vm.monitor.parent,
        monitor=str(agent_vm.monitor),
        disk=str(agent_vm.disk),
        pid=agent_vm.pid,
        pidfile=str(agent_vm.pidfile),
        proxy={"host": "127.0.0.1", "port": agent_vm.proxy_port},
    )
    source = find_and_check_vm(read_ready_file(ready), host_dir)
    assert source.uid == ensure_user(AGENT).pw_uid and source.pid == agent_vm.pid
    assert source.proxy == Endpoint("127.0.0.1", agent_vm.proxy_port)


def test_the_hosts_own_vm_in_a_host_directory_is_refused(tmp_path, host_dir):
    """The host's VM from an earlier takeover: a root directory holding a journal, its socket and disk root's."""
    earlier = ensure_host_dir(tmp_path / "earlier-host")
    (earlier / "journal.json").write_text("{}")
    vm = start_monitor_only_qemu(earlier, make_qcow2(earlier / "disk.qcow2"))
    try:
        disk_hash = sha256(vm.disk)
        agent_dir = agent_workdir(AGENT)
        ready = agent_writes_ready(agent_dir, monitor=str(vm.monitor), disk=str(vm.disk))
        result = takeover_run("--ready-file", str(ready), "--host-dir", str(host_dir))
        assert result.returncode == 1
        assert "inside the host directory" in result.stderr and str(earlier) in result.stderr
        assert_untouched(vm, disk_hash)
        remove_workdir(agent_dir)
    finally:
        vm.kill()


@pytest.mark.parametrize("qemu_user", ["libvirt-qemu", OTHER])
def test_a_vm_of_the_hosts_qemu_user_is_refused(host_dir, qemu_user):
    """libvirt's QEMU user, or the takeover's own --qemu-user, runs the host's VMs: never 'the agent'."""
    try:
        pwd.getpwnam(qemu_user)
    except KeyError:
        pytest.skip(f"no {qemu_user} user here (Debian's libvirt-daemon-system creates it)")
    vm, workdir = run_vm(qemu_user)
    try:
        disk_hash = sha256(vm.disk)
        boundary = HostBoundary.for_takeover(host_dir, qemu_user=OTHER)
        with pytest.raises(NotTheAgentsVM, match=f"belongs to {qemu_user}"):
            find_and_check_vm(explicit_ready(vm.monitor, vm.disk), host_dir, boundary)
        assert_untouched(vm, disk_hash)
    finally:
        vm.kill()
        remove_workdir(workdir)


def test_a_pidfile_that_names_another_process_is_refused(agent_vm, host_dir):
    decoy = agent_vm.monitor.parent / "decoy.pid"
    as_user(AGENT, "sh", "-c", f"echo 1 > {decoy}")
    ready = agent_writes_ready(
        agent_vm.monitor.parent, monitor=str(agent_vm.monitor), disk=str(agent_vm.disk), pidfile=str(decoy)
    )
    with pytest.raises(NotTheAgentsVM, match="pidfile .* names '1'"):
        find_and_check_vm(read_ready_file(ready), host_dir)


# -- 2. the agent's groups -------------------------------------------------------------------------


def setpriv(user: str, groups: str | None) -> tuple[str, ...]:
    """Start a process as `user` with exactly these supplementary groups (None: none)."""
    entry = pwd.getpwnam(user)
    return (
        "setpriv",
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",
        f"--groups={groups}" if groups else "--clear-groups",
        "--",
    )


@pytest.mark.parametrize(
    "account_groups, process_groups, named",
    [
        ("disk", "disk", "disk"),  # the account and its running QEMU are both in disk
        ("adm", None, "adm"),  # the account is in adm; the QEMU was started without it: getgrouplist still sees it
        ("", "kvm", "kvm"),  # the account is clean, but its QEMU runs with kvm (started before a gpasswd -d)
    ],
)
def test_an_agent_in_a_privileged_group_is_refused(host_dir, account_groups, process_groups, named):
    ensure_user(GROUPED, *([account_groups] if account_groups else []))
    workdir = agent_workdir(GROUPED)
    vm = None
    try:
        gid = grp.getgrnam(process_groups).gr_gid if process_groups else None
        disk = make_qcow2(workdir / "disk.qcow2", owner=GROUPED)
        vm = start_monitor_only_qemu(workdir, disk, wrap=setpriv(GROUPED, str(gid) if gid else None))
        disk_hash = sha256(disk)
        with pytest.raises(PrivilegedAgent, match=f"is in the group\\(s\\) {named}") as err:
            find_and_check_vm(explicit_ready(vm.monitor, disk), host_dir)
        assert f"gpasswd -d {GROUPED} {named}" in err.value.hint
        assert_untouched(vm, disk_hash)
    finally:
        if vm is not None:
            vm.kill()
        remove_workdir(workdir)
        subprocess.run(["userdel", GROUPED], capture_output=True)  # leave no privileged test account behind


# -- 3. where root's QEMU listens ------------------------------------------------------------------


def test_a_ready_file_asking_for_every_interface_and_port_443_is_refused(agent_vm, host_dir):
    ready = agent_writes_ready(
        agent_vm.monitor.parent,
        monitor=str(agent_vm.monitor),
        disk=str(agent_vm.disk),
        proxy={"host": "0.0.0.0", "port": 443},
    )
    result = takeover_run("--ready-file", str(ready), "--host-dir", str(host_dir))
    assert result.returncode == 1
    assert "puts the proxy at 0.0.0.0:443" in result.stderr and "--proxy-listen" in result.stderr
    assert agent_vm.alive()


def test_a_proxy_port_the_agents_qemu_does_not_forward_is_refused(agent_vm, host_dir):
    ready = agent_writes_ready(
        agent_vm.monitor.parent,
        monitor=str(agent_vm.monitor),
        disk=str(agent_vm.disk),
        proxy={"host": "127.0.0.1", "port": agent_vm.proxy_port + 1},
    )
    with pytest.raises(UnsafeProxyAddress, match=f"forwards 127.0.0.1:{agent_vm.proxy_port} -> guest port 3737"):
        find_and_check_vm(read_ready_file(ready), host_dir)


def test_a_proxy_the_agents_qemu_really_serves_on_every_interface_is_refused(host_dir):
    """The agent's QEMU really forwards 0.0.0.0:PORT (played in a network namespace of its own, so nothing is
    exposed here) and the ready file says so truthfully: still refused, the host serves loopback only."""
    port = free_port()
    vm, workdir = run_vm(AGENT, proxy="0.0.0.0", proxy_port=port, wrap=("unshare", "--net", "--"))
    try:
        ready = agent_writes_ready(
            workdir, monitor=str(vm.monitor), disk=str(vm.disk), proxy={"host": "0.0.0.0", "port": port}
        )
        with pytest.raises(UnsafeProxyAddress, match="not an IPv4 loopback address"):
            find_and_check_vm(read_ready_file(ready), host_dir)
        # The operator may choose otherwise, explicitly.
        chosen = Endpoint("127.0.0.1", free_port())
        source = find_and_check_vm(read_ready_file(ready), host_dir, proxy_listen=chosen)
        assert source.proxy == chosen and any("--proxy-listen" in n for n in source.notes)
    finally:
        vm.kill()
        remove_workdir(workdir)


def test_an_ipv6_scope_id_never_reaches_a_command_line(tmp_path):
    ready = tmp_path / "ready"
    ready.write_text(
        "READY_FOR_TAKEOVER\n"
        + json.dumps(
            {
                "version": 1,
                "monitor": "/m.sock",
                "disk": "/d.qcow2",
                "proxy": {"host": "1::%,hostfwd=tcp:0.0.0.0:2222-:22", "port": 3737},
            }
        )
    )
    with pytest.raises(ReadyFileError, match="no IPv6 scope id"):
        read_ready_file(ready)
    with pytest.raises(InvalidInput, match="no IPv6 scope id"):
        Endpoint.parse("[fe80::1%eth0]:3737")


def test_the_hosts_address_policy():
    check_agent_address(Endpoint("127.0.0.1", 3737))
    check_agent_address(Endpoint("127.0.0.2", 1024))
    for bad in (
        Endpoint("127.0.0.1", 443),
        Endpoint("0.0.0.0", 3737),
        Endpoint("10.0.2.2", 3737),
        Endpoint("::1", 3737),
    ):
        with pytest.raises(UnsafeProxyAddress):
            check_agent_address(bad)


def test_a_forward_qemu_reports_but_the_kernel_does_not_show_is_not_believed():
    usernet = (
        "Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
        "  TCP[HOST_FORWARD]  13       127.0.0.1 45123       10.0.2.15  3737     0     0\r\n"
        "  TCP[HOST_FORWARD]  11               * 45124       10.0.2.15    22     0     0\r\n"
    )
    assert confirmed_forwards(usernet, {("127.0.0.1", 45123), ("0.0.0.0", 45124)}) == [
        Forward("127.0.0.1", 45123, 3737),
        Forward("0.0.0.0", 45124, 22),
    ]
    assert confirmed_forwards(usernet, {("0.0.0.0", 45124)}) == [Forward("0.0.0.0", 45124, 22)]
    with pytest.raises(UnsafeProxyAddress, match="0 of those"):
        choose_proxy_address(None, [Forward("0.0.0.0", 45124, 22)], None)


# -- 4. a program that is not the host's QEMU ------------------------------------------------------

FAKE_QMP = r"""
import json, os, socket, sys
disk, monitor, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
held = os.open(disk, os.O_RDWR)  # hold the disk open, as QEMU would: /proc/PID/fd shows its inode
tcp = socket.socket()
tcp.bind(("127.0.0.1", port))
tcp.listen()
server = socket.socket(socket.AF_UNIX)
server.bind(monitor + ".new")
server.listen()
os.rename(monitor + ".new", monitor)  # appears only once it listens: the test waits for the path
answers = {
    "qmp_capabilities": {},
    "query-block": [{"device": "d0", "inserted": {"node-name": "n0", "file": disk, "drv": "qcow2", "ro": False}}],
    "query-commands": [{"name": n} for n in ("snapshot-save", "human-monitor-command", "query-status", "quit")],
    "query-status": {"status": "running", "running": True},
    "human-monitor-command": "  TCP[HOST_FORWARD]  9  127.0.0.1 %d  10.0.2.15  3737  0  0\r\n" % port,
}
decoder = json.JSONDecoder()
greeting = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}
def serve(conn):
    conn.sendall(json.dumps(greeting).encode() + b"\n")
    pending = ""
    while chunk := conn.recv(65536):
        pending += chunk.decode()
        while pending.strip():  # QMP clients need not end a command with a newline
            try:
                request, end = decoder.raw_decode(pending.lstrip())
            except ValueError:
                break
            pending = pending.lstrip()[end:]
            reply = {"return": answers.get(request.get("execute"), {})}
            if "id" in request:
                reply["id"] = request["id"]
            conn.sendall(json.dumps(reply).encode() + b"\n")
while True:
    conn, _ = server.accept()
    try:
        serve(conn)
    except OSError:
        pass  # the takeover hung up on seeing who we are, before reading the greeting
    conn.close()
"""


def test_python_renamed_to_qemu_serving_fake_qmp_is_refused(host_dir):
    workdir = agent_workdir(AGENT)
    fake = None
    try:
        disk = make_qcow2(workdir / "disk.qcow2", owner=AGENT)
        as_user(AGENT, "cp", os.path.realpath("/usr/bin/python3"), str(workdir / "qemu-system-x86_64"))
        script = workdir / "fake_qmp.py"
        subprocess.run(
            ["runuser", "-u", AGENT, "--", "tee", str(script)],
            input=FAKE_QMP,
            text=True,
            check=True,
            capture_output=True,
        )
        monitor, port = workdir / "qmp.sock", free_port()
        fake = subprocess.Popen(
            [
                "runuser",
                "-u",
                AGENT,
                "--",
                str(workdir / "qemu-system-x86_64"),
                "-I",
                str(script),
                str(disk),
                str(monitor),
                str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while not monitor.exists():
            assert fake.poll() is None, fake.stderr.read()
            assert time.monotonic() < deadline, "the fake QMP server did not start"
            time.sleep(0.05)
        ready = agent_writes_ready(
            workdir, monitor=str(monitor), disk=str(disk), proxy={"host": "127.0.0.1", "port": port}
        )
        disk_hash = sha256(disk)
        with pytest.raises(UntrustedQemu, match="not the host's installed QEMU") as err:
            find_and_check_vm(read_ready_file(ready), host_dir)
        assert "qemu-system-x86_64" in str(err.value) and str(workdir) in str(err.value)
        result = takeover_run("--ready-file", str(ready), "--host-dir", str(host_dir))
        assert result.returncode == 1 and "nothing it says is believed" in result.stderr
        assert sha256(disk) == disk_hash
    finally:
        if fake is not None:
            os.killpg(fake.pid, 9)
            fake.wait()
        remove_workdir(workdir)


def test_the_real_qemu_running_the_agents_library_is_refused(host_dir):
    """The genuine binary, but with LD_PRELOAD of a library the agent owns: its code runs inside QEMU."""
    workdir = agent_workdir(AGENT)
    library = workdir / "libz.so.1"
    shutil.copy("/usr/lib/x86_64-linux-gnu/libz.so.1", library)
    entry = ensure_user(AGENT)
    os.chown(library, entry.pw_uid, entry.pw_gid)
    disk = make_qcow2(workdir / "disk.qcow2", owner=AGENT)
    vm = start_monitor_only_qemu(workdir, disk, wrap=setpriv(AGENT, None), env={"LD_PRELOAD": str(library)})
    try:
        with pytest.raises(UntrustedQemu, match="runs code from .*libz.so.1.*owned by uid"):
            find_and_check_vm(explicit_ready(vm.monitor, disk), host_dir)
    finally:
        vm.kill()
        remove_workdir(workdir)


# -- the honest case, with vm_image's own QEMU command line ----------------------------------------


def vm_images_own_qemu(workdir: Path, disk: Path) -> tuple[VmConfig, MonitorOnlyQemu]:
    """vm_image's real command line (q35, virtio, both forwards, daemonized, 256 MB, 1 vCPU), paused with -S."""
    cfg = VmConfig(
        disk=disk,
        kernel=None,
        initrd=None,
        append="",
        monitor=workdir / "qmp.sock",
        pidfile=workdir / "qemu.pid",
        serial_log=workdir / "serial.log",
        proxy_port=free_port(),
        ssh_port=free_port(),
        memory_mb=256,
        accel="tcg",
    )
    as_user(AGENT, *qemu_argv(cfg, "/usr/bin/qemu-system-x86_64"), "-S")
    pid = int(cfg.pidfile.read_text())
    return cfg, MonitorOnlyQemu(pid, proc.start_ticks(pid), cfg.monitor, disk, cfg.pidfile, cfg.proxy_port)


def test_vm_image_s_own_qemu_command_line_passes_step_1(host_dir):
    """No guest runs: its modules and libraries are the host's, its files the agent's, its proxy forward on loopback."""
    workdir = agent_workdir(AGENT)
    disk = make_qcow2(workdir / "disk.qcow2", owner=AGENT)
    cfg, vm = vm_images_own_qemu(workdir, disk)
    try:
        ready = agent_writes_ready(
            workdir,
            monitor=str(cfg.monitor),
            disk=str(disk),
            pid=vm.pid,
            pidfile=str(cfg.pidfile),
            proxy={"host": "127.0.0.1", "port": cfg.proxy_port},
        )
        source = find_and_check_vm(read_ready_file(ready), host_dir)
        assert (source.pid, source.uid, source.proxy) == (
            vm.pid,
            pwd.getpwnam(AGENT).pw_uid,
            Endpoint("127.0.0.1", cfg.proxy_port),
        )
    finally:
        vm.kill()
        remove_workdir(workdir)


def test_the_ready_files_size_claims_reach_nothing_root_does(host_dir):
    """The ready file asks for 64 GiB and 64 vCPUs, or claims 64 MB to slip past the free-space check:
    step 1 takes the RAM the checkpoint writes from QEMU itself, and the host's VM is the operator's size."""
    workdir = agent_workdir(AGENT)
    disk = make_qcow2(workdir / "disk.qcow2", owner=AGENT)
    cfg, vm = vm_images_own_qemu(workdir, disk)
    try:
        for claim in ({"memory_mb": 65536, "cpus": 64}, {"memory_mb": 64, "cpus": 1}):
            ready = agent_writes_ready(
                workdir,
                monitor=str(cfg.monitor),
                disk=str(disk),
                proxy={"host": "127.0.0.1", "port": cfg.proxy_port},
                **claim,
            )
            source = find_and_check_vm(read_ready_file(ready), host_dir)
            assert (source.memory_mb, source.cpus) == (256, 1)  # what QEMU runs, whatever the claim
        result = takeover_run("--ready-file", str(ready), "--host-dir", str(host_dir), "--cpus", "65")
        assert result.returncode == 2 and "argument --cpus: 65 is outside 1..64" in result.stderr
        assert vm.alive()
    finally:
        vm.kill()
        remove_workdir(workdir)


# -- a device behind the agent's directory link --------------------------------------------------


def _opens_of(node: Path) -> Callable[[], int]:
    """Counts the opens of `node` from now on (inotify IN_OPEN; an O_PATH open is not one)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(fd, str(node).encode(), 0x20) >= 0  # IN_OPEN

    def count() -> int:
        try:
            return len(os.read(fd, 65536)) // 16  # one 16-byte event each (no name for a watched file)
        except BlockingIOError:
            return 0
        finally:
            os.close(fd)

    return count


@pytest.mark.parametrize("target", ["ready", "pidfile", "setup_key"])
def test_root_never_opens_a_device_the_agent_points_at_through_a_linked_directory(tmp_path, target):
    """`O_NOFOLLOW` guards the last component only: the agent's `l -> DEVDIR` would make root open the
    device (a watchdog reboots the host when closed). Root pins the name with O_PATH and opens only a
    regular file. A private node with /dev/null's numbers stands in for the device, so its opens can be
    counted."""
    devdir = tmp_path / "dev"
    devdir.mkdir()
    node = devdir / "watchdog"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    home = agent_workdir(AGENT)
    try:
        link = home / "l"
        subprocess.run(["runuser", "-u", AGENT, "--", "ln", "-s", str(devdir), str(link)], check=True)
        opens = _opens_of(node)
        if target == "ready":
            with pytest.raises(ReadyFileError, match="not a regular file"):
                read_ready_file(link / "watchdog")
        elif target == "pidfile":
            with pytest.raises(NotTheAgentsVM, match="regular file"):
                check_pidfile(link / "watchdog", os.getpid())
        else:
            assert read_agent_private_key(link / "watchdog", None) is None
        assert opens() == 0
    finally:
        remove_workdir(home)


def test_a_disk_name_swapped_after_step_1_cannot_make_the_sandbox_run_as_another_user(host_dir):
    """After step 1 the agent turns its disk's name into a link to another user's qcow2: the sandbox
    would take that owner's uid and groups. The owner pinned in step 1 decides, and a link is refused."""
    vm, workdir = run_vm(AGENT)
    other = agent_workdir(OTHER)
    try:
        source = find_and_check_vm(explicit_ready(vm.monitor, vm.disk), host_dir)
        victim = make_qcow2(other / "victim.qcow2", owner=OTHER)
        vm.kill()
        swapped = Path(source.disk)
        swapped.unlink()
        subprocess.run(["runuser", "-u", AGENT, "--", "ln", "-s", str(victim), str(swapped)], check=True)
        with pytest.raises(DiskFormatError, match=f"no longer a regular file of uid {source.uid}"):
            inspect_image(swapped, force_share=True, owner=source.uid)
    finally:
        vm.kill()
        remove_workdir(workdir)
        remove_workdir(other)
