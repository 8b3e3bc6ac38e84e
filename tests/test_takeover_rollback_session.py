"""A rollback replays the agent's QEMU command line from root's terminal: it must get nothing of root's.

The attack (issue 11): the agent makes a takeover fail after the checkpoint, so
root runs `takeover rollback` in a terminal. The replayed QEMU runs as the
agent's uid; had it root's terminal as its controlling tty, the agent could
ptrace it and read root's keys or push input into root's shell (TIOCSTI), or
name `/dev/tty` in the command line it wrote. So the replay runs in a new
session without a terminal, holding only /dev/null and a pipe root drains into its log, and its
command line may only use vm_image's own options on the agent's own files.

The agent here is the real unprivileged user `nobody` (fast tests, a QEMU with
no guest) or vm_image's `agent` user with a real VM (the slow test).
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from takeover.agent.replay import replay_command, start_source_vm
from takeover.errors import RollbackError, UnsafeCommandLine
from takeover.host.files import ensure_host_dir
from takeover.host.monitor import Monitor
from takeover.models import CHECKPOINT_TAG, Endpoint
from takeover.steps.checkpoint import save_checkpoint_and_stop
from takeover.steps.find_vm import explicit_ready, find_and_check_vm
from vm_image import proc
from vm_image.qemu_command import VmConfig, qemu_argv

from .takeover_helpers import MonitorOnlyQemu, make_qcow2, start_monitor_only_qemu

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
NOBODY = pwd.getpwnam("nobody")


# -- a root terminal, and what /proc says about a process ----------------------------------------


@dataclass
class Stat:
    pid: int
    state: str
    session: int
    tty_nr: int


def proc_stat(pid: int) -> Stat:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return Stat(pid, fields[0], int(fields[3]), int(fields[4]))


def tty_nr_of(fd: int) -> int:
    """The terminal's number as /proc/PID/stat's tty_nr shows it (the kernel's new_encode_dev)."""
    rdev = os.fstat(fd).st_rdev
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


class RootTerminal:
    """`argv` run as root in a new session whose controlling terminal is a fresh pseudo-terminal,
    as when the operator types the command; the terminal's output is collected."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        master, slave = os.openpty()
        self.tty_nr = tty_nr_of(slave)
        self.process = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )  # runs after setsid: take the pty
        os.close(slave)
        self.session = self.process.pid  # the session leader's pid names the session
        self.output = bytearray()
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()

    def _read(self, master: int) -> None:
        try:
            while chunk := os.read(master, 4096):
                self.output += chunk
        except OSError:
            pass  # EIO: every holder of the slave side is gone
        finally:
            os.close(master)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def text(self) -> str:
        return self.output.decode(errors="replace")


def process_fds(pid: int) -> list[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    return [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]


def assert_outside_roots_terminal(pid: int, terminal: RootTerminal, uid: int) -> None:
    st = proc_stat(pid)
    assert st.tty_nr == 0, f"pid {pid} has a controlling terminal ({st.tty_nr})"
    assert st.session != terminal.session, f"pid {pid} is in root's session"
    assert proc.read_process(pid).uid == uid
    terminals = [f for f in process_fds(pid) if f.startswith(("/dev/pts", "/dev/tty", "/dev/ptmx", "/dev/console"))]
    assert terminals == [], f"pid {pid} holds a terminal open: {terminals}"


# -- the agent's files, owned by a real unprivileged user ----------------------------------------


@pytest.fixture
def agent_dir():
    """A directory of nobody's, as vm_image's state directory is the agent's (not under pytest's 0700 tmp)."""
    path = Path(tempfile.mkdtemp(prefix="takeover-rollback-agent-", dir="/tmp"))
    os.chmod(path, 0o755)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_file(path: Path, content: bytes = b"x") -> Path:
    path.write_bytes(content)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    return path


def vm_image_argv(agent_dir: Path, *, seed: bool = False) -> list[str]:
    """The command line vm_image's `launch` writes, on files of the agent's."""
    disk = agent_file(agent_dir / "disk.qcow2")
    kernel = None if seed else agent_file(agent_dir / "vmlinuz")
    initrd = None if seed else agent_file(agent_dir / "initrd.img")
    cfg = VmConfig(
        disk,
        kernel,
        initrd,
        "console=ttyS0 quiet",
        agent_dir / "qmp.sock",
        agent_dir / "qemu.pid",
        agent_file(agent_dir / "serial.log", b""),
        seed=agent_file(agent_dir / "seed.img") if seed else None,
    )
    return qemu_argv(cfg, "/usr/bin/qemu-system-x86_64")


def replace_option(argv: list[str], option: str, value: str) -> list[str]:
    i = argv.index(option)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def test_vm_images_own_command_line_is_replayed_with_the_checkpoint(agent_dir):
    for seed in (False, True):
        argv = vm_image_argv(agent_dir, seed=seed)
        stale = ["-S", "-loadvm", "old", "--incoming", "tcp:0:4444"]  # dropped: they would replace the checkpoint
        replay = replay_command([*argv, *stale], str(agent_dir / "disk.qcow2"), owner=NOBODY.pw_uid)
        assert replay[1:] == [*argv[1:], "-loadvm", CHECKPOINT_TAG]
        assert replay[0] == shutil.which("qemu-system-x86_64")


def test_replay_refuses_a_process_that_is_not_qemu(agent_dir):
    disk = agent_file(agent_dir / "disk.qcow2")
    with pytest.raises(UnsafeCommandLine, match="not qemu-system-x86_64"):
        replay_command(["/bin/sh", "-c", f"file={disk}"], str(disk), owner=NOBODY.pw_uid)


def test_replay_refuses_a_command_line_without_the_disk(agent_dir):
    argv = vm_image_argv(agent_dir)
    other = agent_file(agent_dir / "other.qcow2")
    with pytest.raises(UnsafeCommandLine, match="does not name the disk"):
        replay_command(argv, str(other), owner=NOBODY.pw_uid)


# Each: how the agent edits vm_image's command line, and what the refusal must say.
REFUSED = {
    "serial on root's terminal": (lambda a, d: replace_option(a, "-serial", "/dev/tty"), "-serial '/dev/tty'"),
    "serial through a tty chardev": (lambda a, d: [*a, "-chardev", "tty,id=c0,path=/dev/tty"], "'-chardev'"),
    "monitor on stdio": (lambda a, d: [*a, "-monitor", "stdio"], "-monitor 'stdio'"),
    "serial on a new pty": (lambda a, d: replace_option(a, "-serial", "pty"), "no terminal"),
    "serial to a pipe": (lambda a, d: replace_option(a, "-serial", f"pipe:{d}/p"), "-serial"),
    "monitor on tcp": (lambda a, d: [*a, "-monitor", "tcp:127.0.0.1:4444,server=on,wait=off"], "-monitor"),
    "QMP on stdio": (lambda a, d: replace_option(a, "-qmp", "stdio"), "-qmp 'stdio'"),
    "runas root": (lambda a, d: [*a, "-runas", "root"], "'-runas'"),
    "chroot": (lambda a, d: [*a, "-chroot", "/"], "'-chroot'"),
    "run-with": (lambda a, d: [*a, "-run-with", "user=root"], "'-run-with'"),
    "sandbox off": (lambda a, d: [*a, "-sandbox", "off"], "'-sandbox'"),
    "a config file": (lambda a, d: [*a, "-readconfig", str(agent_file(d / "extra.cfg"))], "'-readconfig'"),
    "an object": (lambda a, d: [*a, "-object", "memory-backend-file,id=m0,mem-path=/dev/shm/x,size=1M"], "'-object'"),
    "a debug log": (lambda a, d: [*a, "-D", str(d / "log")], "'-D'"),
    "serial into root's file": (
        lambda a, d: replace_option(a, "-serial", "file:/etc/shadow"),
        "belongs to uid 0, not to the agent",
    ),
    "a host block device": (lambda a, d: [*a, "-drive", "file=/dev/sda,format=raw,if=virtio"], "under /dev"),
    "a link out of the agent's files": (
        lambda a, d: [*a, "-kernel", str(_agent_link(d, "/etc/shadow"))],
        "leads to '/etc/shadow'",
    ),
    "a root file in the agent's directory": (
        lambda a, d: replace_option(a, "-initrd", str(_root_file(d))),
        "belongs to uid 0",
    ),
    "a bare disk argument": (lambda a, d: [*a, "/dev/sda"], "bare argument '/dev/sda'"),
    "an escaped comma": (lambda a, d: [*a, "-drive", f"file={d}/disk.qcow2,,file=/etc/shadow"], "escaped comma"),
    "a drive property naming a host file": (
        lambda a, d: [*a, "-drive", f"file={d}/disk.qcow2,backing.file.filename=/etc/shadow"],
        "'backing.file",
    ),
    "a guestfwd that runs a command": (
        lambda a, d: [*a, "-netdev", "user,id=n1,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh"],
        "'guestfwd'",
    ),
    "a forward on a privileged port": (
        lambda a, d: [*a, "-netdev", "user,id=n1,hostfwd=tcp:0.0.0.0:443-:3737"],
        "must be 1024-65535",
    ),
    "a forward with no address": (lambda a, d: [*a, "-netdev", "user,id=n1,hostfwd=tcp::8443-:3737"], "-netdev"),
    "a NIC with a ROM file": (
        lambda a, d: [*a, "-device", "virtio-net-pci,netdev=net0,romfile=/etc/shadow"],
        "'romfile'",
    ),
    "a device not in the list": (lambda a, d: [*a, "-device", "vfio-pci,host=0000:00:02.0"], "-device"),
}


def _agent_link(directory: Path, target: str) -> Path:
    link = directory / "vmlinuz-link"
    link.symlink_to(target)
    os.lchown(link, NOBODY.pw_uid, NOBODY.pw_gid)
    return link


def _root_file(directory: Path) -> Path:
    path = directory / "root-owned.img"
    path.write_bytes(b"root's")
    return path


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_replay_refuses_what_vm_image_never_writes(agent_dir, case):
    edit, message = REFUSED[case]
    argv = edit(vm_image_argv(agent_dir), agent_dir)
    with pytest.raises(UnsafeCommandLine) as err:
        replay_command(argv, str(agent_dir / "disk.qcow2"), owner=NOBODY.pw_uid)
    assert message in str(err.value)
    assert "a rollback" in str(err.value) and "vm_image launch" in err.value.hint


def test_replay_refuses_the_agents_files_for_another_uid(agent_dir):
    # The same command line, checked for another user: nothing in it is that user's.
    argv = vm_image_argv(agent_dir)
    with pytest.raises(UnsafeCommandLine, match=f"belongs to uid {NOBODY.pw_uid}, not to the agent"):
        replay_command(argv, str(agent_dir / "disk.qcow2"), owner=NOBODY.pw_uid - 1)


def start_agent_qemu(agent_dir: Path, disk: Path, *extra: str) -> MonitorOnlyQemu:
    """nobody's QEMU with no guest (`-machine none`), a QMP monitor, the disk and a proxy forward, plus `extra`."""
    return start_monitor_only_qemu(agent_dir, disk, user="nobody", extra=extra)


def proxy_of(vm: MonitorOnlyQemu) -> Endpoint:
    return Endpoint("127.0.0.1", vm.proxy_port)


def test_step_1_refuses_a_vm_whose_command_line_names_a_host_device(agent_dir, tmp_path):
    # A real QEMU of nobody's whose serial port writes to a host device: the takeover stops in step 1,
    # before the checkpoint, and the VM keeps running untouched.
    disk = make_qcow2(agent_dir / "agent.qcow2")
    os.chown(disk, NOBODY.pw_uid, NOBODY.pw_gid)
    vm = start_agent_qemu(agent_dir, disk, "-serial", "/dev/null")
    host_dir = ensure_host_dir(tmp_path / "host")
    try:
        with pytest.raises(UnsafeCommandLine, match="-serial '/dev/null'"):
            find_and_check_vm(explicit_ready(vm.monitor, disk, proxy_of(vm)), host_dir)
        assert vm.alive()
        with Monitor(vm.monitor) as mon:
            assert mon.execute("query-status")["status"] == "running"
    finally:
        vm.kill()


def test_rollback_refuses_files_the_agent_swapped_after_step_1(agent_dir, tmp_path):
    # Step 1 accepted the command line; then the agent points its pidfile at root's file and forces
    # the rollback. The rollback starts nothing and says why.
    disk = make_qcow2(agent_dir / "agent.qcow2")
    os.chown(disk, NOBODY.pw_uid, NOBODY.pw_gid)
    vm = start_agent_qemu(agent_dir, disk)
    host_dir = ensure_host_dir(tmp_path / "host")
    shadow = Path("/etc/shadow").read_bytes()
    try:
        source = find_and_check_vm(explicit_ready(vm.monitor, disk, proxy_of(vm)), host_dir)
        save_checkpoint_and_stop(source)
        vm.pidfile.unlink(missing_ok=True)
        _agent_link(agent_dir, "/etc/shadow").rename(vm.pidfile)
        with pytest.raises(RollbackError, match="no longer replayable.*-pidfile.*leads to '/etc/shadow'") as err:
            start_source_vm(source, host_dir / "rollback-qemu.log")
        assert "nothing was started" in err.value.hint
        assert Path("/etc/shadow").read_bytes() == shadow
        assert not (host_dir / "rollback-qemu.log").exists()
        assert qemus_using(disk) == []
    finally:
        vm.kill()


def qemus_using(disk: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(disk) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# -- the replay itself, started from root's terminal --------------------------------------------

ROLLBACK_SNIPPET = """
import json, sys
from takeover.models import SourceVM
from takeover.agent.replay import start_source_vm
start_source_vm(SourceVM.from_dict(json.load(open(sys.argv[1]))), __import__("pathlib").Path(sys.argv[2]))
print("rollback: started")
"""

# Stands in for the host's QEMU on root's PATH: stops itself, as an agent attached with ptrace would
# hold it, so the test can look at the process the agent could control, then runs the real QEMU.
PROBE = """#!/bin/sh
kill -STOP $$
exec {qemu} "$@"
"""


def find_stopped_probe(probe: Path, uid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                if len(cmdline) > 1 and cmdline[1] == bytes(probe) and proc_stat(int(entry.name)).state == "T":
                    assert proc.read_process(int(entry.name)).uid == uid
                    return int(entry.name)
            except (FileNotFoundError, ProcessLookupError):
                continue
        time.sleep(0.05)
    raise AssertionError("the replayed QEMU never started")


def test_rollback_from_roots_terminal_gives_the_agents_qemu_no_terminal_and_no_session(agent_dir, tmp_path):
    disk = make_qcow2(agent_dir / "agent.qcow2")
    os.chown(disk, NOBODY.pw_uid, NOBODY.pw_gid)
    vm = start_agent_qemu(agent_dir, disk)
    host_dir = ensure_host_dir(tmp_path / "host")
    probe_dir = Path(tempfile.mkdtemp(prefix="takeover-probe-", dir="/tmp"))
    os.chmod(probe_dir, 0o755)
    probe = probe_dir / "qemu-system-x86_64"
    probe.write_text(PROBE.format(qemu=shutil.which("qemu-system-x86_64")))
    os.chmod(probe, 0o755)
    terminal, replayed = None, None
    try:
        source = find_and_check_vm(explicit_ready(vm.monitor, disk, proxy_of(vm)), host_dir)
        save_checkpoint_and_stop(source)
        (host_dir / "source.json").write_text(json.dumps(source.to_dict()))
        log = host_dir / "rollback-qemu.log"
        env = {
            "PATH": f"{probe_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/root",
            "ROOTS_SECRET_VARIABLE": "root-only",
        }
        terminal = RootTerminal(
            [sys.executable, "-c", ROLLBACK_SNIPPET, str(host_dir / "source.json"), str(log)], env=env
        )
        replayed = find_stopped_probe(probe, NOBODY.pw_uid)
        # The harness is real: the rollback command has the pty as its terminal and leads its session.
        assert proc_stat(terminal.process.pid).tty_nr == terminal.tty_nr
        assert proc_stat(terminal.process.pid).session == terminal.session

        # What the agent could get hold of, had it attached to its replayed QEMU: nothing of root's.
        assert_outside_roots_terminal(replayed, terminal, NOBODY.pw_uid)
        status = Path(f"/proc/{replayed}/status").read_text()
        assert "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status
        assert f"Groups:\t{NOBODY.pw_gid}" in status
        fds = process_fds(replayed)
        # (the shell's own script, then these): its output goes to a pipe of root's, never to root's log file
        assert {"pipe" if f.startswith("pipe:[") else f for f in set(fds) - {str(probe)}} == {"/dev/null", "pipe"}, fds
        environ = Path(f"/proc/{replayed}/environ").read_bytes().split(b"\0")
        assert sorted(e.split(b"=")[0] for e in environ if e) == [b"HOME", b"LANG", b"PATH"]
        assert os.readlink(f"/proc/{replayed}/cwd") == str(agent_dir)

        os.kill(replayed, signal.SIGCONT)  # the real QEMU starts and loads the checkpoint
        assert terminal.wait(120) == 0, terminal.text()
        assert "rollback: started" in terminal.text()
        with Monitor(vm.monitor) as mon:
            qemu_pid = mon.peer.pid
            assert_outside_roots_terminal(qemu_pid, terminal, NOBODY.pw_uid)
            assert mon.execute("query-status")["status"] == "running"
            mon.execute("quit")
        proc.wait_gone(qemu_pid, proc.start_ticks(qemu_pid), 20)
    finally:
        if terminal is not None and terminal.process.poll() is None:
            terminal.process.kill()
        if replayed is not None and proc_alive(replayed):
            os.kill(replayed, signal.SIGKILL)
        vm.kill()
        kill_from_pidfile(vm.pidfile)
        shutil.rmtree(probe_dir, ignore_errors=True)


def proc_alive(pid: int) -> bool:
    try:
        return proc_stat(pid).state != "Z"
    except FileNotFoundError:
        return False


def kill_from_pidfile(pidfile: Path) -> None:
    """The replayed QEMU, if a failed assertion left it running."""
    try:
        pid = int(pidfile.read_text())
        if proc.read_process(pid).uid == NOBODY.pw_uid:
            proc.terminate(pid, proc.start_ticks(pid), grace=5)
    except (OSError, ValueError):
        pass


# -- end to end: `takeover rollback` typed in root's terminal, the agent's real VM ---------------


class SessionWatcher(threading.Thread):
    """Looks through /proc, as the agent could, for any process of `uid` in root's session or on root's
    terminal while the rollback runs (QEMU's own parent waits there while the daemon loads the state)."""

    def __init__(self, terminal: RootTerminal, uid: int) -> None:
        super().__init__(daemon=True)
        self.terminal, self.uid = terminal, uid
        self.breaches: list[str] = []
        self.agent_qemus: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    st = proc_stat(int(entry.name))
                    if st.session == self.terminal.session or st.tty_nr == self.terminal.tty_nr:
                        uid = proc.read_process(st.pid).uid
                        if uid == self.uid:
                            self.breaches.append(
                                f"pid {st.pid} ({Path(entry.path, 'comm').read_text().strip()}): "
                                f"session {st.session}, tty_nr {st.tty_nr}"
                            )
                    elif entry.stat().st_uid == self.uid and Path(entry.path, "comm").read_text().startswith(
                        "qemu-system"
                    ):
                        self.agent_qemus.add(st.pid)
                except (OSError, ValueError):
                    continue
            time.sleep(0.02)


@pytest.mark.slow
def test_rollback_typed_in_roots_terminal_restarts_the_agents_vm_outside_roots_session(tmp_path):
    from .takeover_helpers import takeover_run
    from .vm_fixtures import launch_agent_vm

    agent_vm = launch_agent_vm()
    terminal, watcher = None, None
    try:
        host_dir = tmp_path / "host"
        old_pid = int((agent_vm.state / "run/qemu.pid").read_text())
        # The agent wants a rollback: it makes the takeover fail once its VM is checkpointed and stopped.
        failed = takeover_run(agent_vm.ready, host_dir, "--fail-after", "checkpoint")
        assert failed.returncode == 1 and "failing on purpose after step 'checkpoint'" in failed.stderr

        terminal = RootTerminal([sys.executable, "-m", "takeover", "rollback", "--host-dir", str(host_dir)])
        watcher = SessionWatcher(terminal, agent_vm.uid)
        watcher.start()
        assert terminal.wait(900) == 0, terminal.text()
        watcher.done.set()
        watcher.join(10)
        assert "the agent's VM is back from its checkpoint" in terminal.text()

        assert watcher.breaches == [], "the agent's processes ran in root's terminal session"
        with Monitor(agent_vm.state / "run/qmp.sock") as mon:
            qemu_pid = mon.peer.pid
        assert qemu_pid != old_pid and qemu_pid in watcher.agent_qemus  # the watcher did see the replay
        assert_outside_roots_terminal(qemu_pid, terminal, agent_vm.uid)
        assert "-loadvm" in proc.read_process(qemu_pid).cmdline
    finally:
        if watcher is not None:
            watcher.done.set()
        if terminal is not None and terminal.process.poll() is None:
            terminal.process.kill()
        agent_vm.discard()
