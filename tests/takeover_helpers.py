"""Support for the takeover tests (no tests here): tiny qcow2 images, QEMU with only a monitor, fake sockets,
and for the end-to-end tests `python -m takeover` itself, the host's login and stopping the host's VM.

The agent's VM for the end-to-end tests comes from tests/vm_fixtures.py (vm_image, run as the agent).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.demo import free_port  # noqa: F401 (the tests import it from here)
from takeover.host.files import ensure_host_dir
from takeover.host.monitor import Monitor
from takeover.host.runners import HostVMSpec
from takeover.models import CHECKPOINT_TAG, Endpoint
from vm_image import proc


def host_vm_spec(tmp_path: Path, proxy: Endpoint) -> HostVMSpec:
    """The host's VM as the runners describe it, its files in a new host directory under `tmp_path` (none made)."""
    d = ensure_host_dir(tmp_path / "h")
    return HostVMSpec(
        name="secret-proxy-vm",
        disk=d / "disk.qcow2",
        kernel=d / "boot/vmlinuz",
        initrd=d / "boot/initrd.img",
        append="root=/dev/vda rw console=ttyS0",
        memory_mb=256,
        cpus=1,
        accel="tcg",
        proxy_listen=proxy,
        ssh_listen=Endpoint("127.0.0.1", 2223),
        monitor=d / "qmp.sock",
        pidfile=d / "qemu.pid",
        serial_log=d / "serial.log",
        qemu_log=d / "qemu.log",
    )


def make_qcow2(path: Path, size: str = "64M", *extra: str, owner: str | None = None) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size], check=True)
    if owner:
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def ensure_user(name: str, *groups: str) -> pwd.struct_passwd:
    """An unprivileged Unix user (no home, no login shell), created if missing, in exactly `groups`."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True
        )
    subprocess.run(["usermod", "--groups", ",".join(groups), name], check=True, capture_output=True)
    return pwd.getpwnam(name)


def agent_workdir(user: str) -> Path:
    """A directory of `user`'s own under /tmp (pytest's tmp_path is root's, 0700: no other user gets in)."""
    entry = pwd.getpwnam(user)
    path = Path(tempfile.mkdtemp(prefix=f"takeover-{user}-", dir="/tmp"))
    os.chmod(path, 0o755)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class MonitorOnlyQemu:
    """A QEMU with `-machine none`: no guest, but a real QMP monitor and a real open qcow2."""

    pid: int
    ticks: int
    monitor: Path
    disk: Path
    pidfile: Path
    proxy_port: int = 0  # forwarded to the guest's proxy port like vm_image's VM (127.0.0.1:PORT -> :3737); 0: none

    def alive(self) -> bool:
        return proc.alive(self.pid, self.ticks)

    def kill(self) -> None:
        proc.terminate(self.pid, self.ticks, grace=5)


def start_monitor_only_qemu(
    workdir: Path,
    disk: Path,
    *,
    user: str | None = None,
    proxy: str = "127.0.0.1",
    proxy_port: int | None = None,
    wrap: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> MonitorOnlyQemu:
    """`user` runs it (runuser: the account's groups); or `wrap` is the command that starts it (setpriv, unshare)."""
    monitor, pidfile = workdir / "qmp.sock", workdir / "qemu.pid"
    proxy_port = proxy_port or free_port()
    argv = [
        "qemu-system-x86_64",
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-drive",
        f"file={disk},if=none,id=d0,format=qcow2",
        "-netdev",
        f"user,id=net0,hostfwd=tcp:{proxy}:{proxy_port}-:3737",
        "-qmp",
        f"unix:{monitor},server=on,wait=off",
        *extra,
        "-daemonize",
        "-pidfile",
        str(pidfile),
    ]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    argv = [*wrap, *argv]
    subprocess.run(
        argv, check=True, timeout=60, capture_output=True, env=None if env is None else {**os.environ, **env}
    )
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip() and monitor.exists()):
        if time.monotonic() > deadline:
            raise RuntimeError("QEMU did not write its pidfile")
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    return MonitorOnlyQemu(pid, proc.start_ticks(pid), monitor, disk, pidfile, proxy_port)


@contextmanager
def fake_socket_server(path: Path, greeting: bytes | None) -> Iterator[Path]:
    """A unix socket that answers every connection with `greeting` (or stays silent), then hangs up."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                if greeting is not None:
                    try:
                        conn.sendall(greeting)
                    except BrokenPipeError:
                        continue  # the client hung up first (refused on its credentials)
                stop.wait(3)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(5)
        server.close()
        os.unlink(path)


def open_appliance(disk: Path, *, readonly: bool = False) -> Any:
    """A launched libguestfs handle on the qcow2 `disk`: the direct backend, TCG (the tests' look inside an image)."""
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    g.set_backend_settings(["force_tcg"])
    g.add_drive_opts(str(disk), format="qcow2", readonly=readonly)
    g.launch()
    return g


def assert_replayed_and_quit(monitor: Path, uid: int) -> None:
    """After a rollback: the QEMU behind `monitor` runs as `uid` (never root), from the checkpoint; then it quits."""
    with Monitor(monitor) as mon:
        assert mon.peer.uid == uid
        info = proc.read_process(mon.peer.pid)
        assert info.cmdline[-2:] == ("-loadvm", CHECKPOINT_TAG)
        assert mon.execute("query-status")["status"] == "running"
        mon.execute("quit")
    proc.wait_gone(info.pid, info.start_ticks, 20)


def write_ready(path: Path, **fields: object) -> Path:
    import json

    data = {"version": 1, **fields}
    path.write_text("READY_FOR_TAKEOVER\n" + json.dumps(data) + "\n")
    return path


class Listener:
    """A TCP server on 127.0.0.1 that counts connections and answers each with a tiny HTTP response."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.seen += 1
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@contextmanager
def listeners(n: int) -> Iterator[list[Listener]]:
    made = [Listener() for _ in range(n)]
    try:
        yield made
    finally:
        for listener in made:
            listener.close()


# -- the end-to-end tests: `python -m takeover` as root, and the host's VM it leaves --------------

ROOT = Path(__file__).resolve().parent.parent
# The host VM's QEMU user in the takeover tests: the egress rules match it, so not the one a running
# `make demo` VM uses.
E2E_QEMU_USER = "spvm-e2e-qemu"


def takeover(*args: str) -> subprocess.CompletedProcess:
    """`python -m takeover ARGS`, its stderr passed on to the test's."""
    result = subprocess.run(
        [sys.executable, "-m", "takeover", *args], capture_output=True, text=True, cwd=ROOT, timeout=1800
    )
    sys.stderr.write(result.stderr)
    return result


def takeover_run(ready: Path, host_dir: Path, *more: str, ssh_port: int | None = None) -> subprocess.CompletedProcess:
    """`takeover run` of the VM `ready` names into `host_dir`, its SSH on 127.0.0.1:`ssh_port` (or a free port)."""
    listen = f"127.0.0.1:{ssh_port or free_port()}"
    return takeover("run", "--ready-file", str(ready), "--host-dir", str(host_dir), "--ssh-listen", listen, *more)


# -- the systemd unit (takeover/service.py), its commands run the way systemd runs them ---------------


def unit_fields(text: str) -> dict[str, str]:
    """`Key=value` of the unit, as systemd reads them (the last one wins; comments and sections skipped)."""
    fields = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            fields[key.strip()] = value.strip()
    return fields


def as_systemd_runs(command: str, host_dir: Path) -> list[str]:
    """An Exec line's argv: its words split as systemd splits them, `%f` the instance's path."""
    assert "%" not in command.replace("%f", ""), "a specifier the test does not expand"
    return [word.replace("%f", str(host_dir)) for word in shlex.split(command)]


def run_unit_command(fields: dict[str, str], key: str, host_dir: Path) -> subprocess.CompletedProcess:
    """The unit's `key` line run as systemd runs it: argv without a shell, from its WorkingDirectory,
    with only its Environment and its UMask, stdin /dev/null, in a session of its own."""
    env = dict(word.split("=", 1) for word in fields["Environment"].split())
    result = subprocess.run(
        as_systemd_runs(fields[key], host_dir),
        cwd=fields["WorkingDirectory"],
        env=env,
        umask=int(fields["UMask"], 8),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    sys.stderr.write(result.stderr)
    return result


def host_ssh(host_dir: Path, port: int, *remote: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The host's login, as the takeover's own checks make it: its key, the pinned host key, strict checking."""
    from takeover.host.ssh import SSHTarget
    from takeover.models import Endpoint

    target = SSHTarget(Endpoint("127.0.0.1", port), host_dir / "host_key", host_dir / "known_hosts")
    return subprocess.run(target.argv(*remote), input=stdin, capture_output=True, text=True, timeout=120)


def stop_host_vm(host_dir: Path, runner: object | None = None) -> list[int]:
    """Stop the VM a takeover into `host_dir` started, if it got that far (`runner`: the qemu runner
    with the run's own --qemu-user, which is how it knows its QEMU). Any QEMU still running on the
    host directory's disk afterwards is killed and named (and returned): a test must not leave VMs behind."""
    try:
        from takeover.config import TakeoverConfig
        from takeover.host import egress
        from takeover.host.runners import QemuRunner
        from takeover.journal import Journal
        from takeover.progress import Progress
        from takeover.steps.context import Context, vm_spec

        journal = Journal.load(host_dir)
        if journal is None or not journal.entry("scrub").get("result"):
            return []
        spec = vm_spec(Context(TakeoverConfig(host_dir=host_dir), host_dir, journal, Progress()))
        (runner or QemuRunner(journal.data.get("options", {}).get("qemu_user"))).stop(spec)
        egress.release(host_dir, drop_rules=True)
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the test's own failure
        print(f"cleanup: {exc}", file=sys.stderr)
    leftover = qemus_using(host_dir / "disk.qcow2")
    for pid in leftover:
        print(f"cleanup: QEMU pid {pid} still ran on {host_dir}; killed", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftover


def listen_backlog(port: int) -> int | None:
    """The listen backlog of the TCP socket listening on 127.0.0.1:`port`, as `ss` shows it (Send-Q), or None."""
    out = subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields[3] == f"127.0.0.1:{port}":
            return int(fields[2])
    return None


def qemus_using(disk: Path) -> list[int]:
    """QEMU processes whose command line names `disk`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"qemu-system-x86_64") and any(str(disk).encode() in a for a in cmdline):
            found.append(int(entry.name))
    return found


# The host's own system build, cached between runs (the scrub and cloud tests rebuild from it).
HOST_SYSTEM_CACHE = Path("/var/tmp/secret-proxy-vm-tests/host-system")
AGENT = "spvm-ct-1"  # the relocation and cloud tests' agent user (conftest's `agent_user`)


def as_agent(agent_user, *argv: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={agent_user.pw_uid}", f"--regid={agent_user.pw_gid}", "--clear-groups", "--", *argv],
        check=True,
        capture_output=True,
        cwd="/",
    )


def agent_image(agent_user, path: Path, size: str = "64M", *extra: str, fill: str | None = None) -> Path:
    """A qcow2 the agent makes itself (qemu-img as the agent), optionally with `write -P` data in it."""
    as_agent(agent_user, "qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size)
    if fill:
        as_agent(agent_user, "qemu-io", "-f", "qcow2", "-c", fill, str(path))
    return path
