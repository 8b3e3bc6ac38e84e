"""Support for the takeover tests (no tests here): tiny qcow2 images, QEMU with only a monitor, fake sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from takeover import proc


def make_qcow2(path: Path, size: str = "64M", *extra: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size], check=True)
    return path


@dataclass
class MonitorOnlyQemu:
    """A QEMU with `-machine none`: no guest, but a real QMP monitor and a real open qcow2."""

    pid: int
    ticks: int
    monitor: Path
    disk: Path
    pidfile: Path

    def alive(self) -> bool:
        return proc.alive(self.pid, self.ticks)

    def kill(self) -> None:
        proc.terminate(self.pid, self.ticks, grace=5)


def start_monitor_only_qemu(workdir: Path, disk: Path, *, user: str | None = None) -> MonitorOnlyQemu:
    monitor, pidfile = workdir / "qmp.sock", workdir / "qemu.pid"
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
            "-drive", f"file={disk},if=none,id=d0,format=qcow2",
            "-qmp", f"unix:{monitor},server=on,wait=off", "-daemonize", "-pidfile", str(pidfile)]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    subprocess.run(argv, check=True, timeout=60)
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip() and monitor.exists()):
        if time.monotonic() > deadline:
            raise RuntimeError("QEMU did not write its pidfile")
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    return MonitorOnlyQemu(pid, proc.start_ticks(pid), monitor, disk, pidfile)


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
                    conn.sendall(greeting)
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


def write_ready(path: Path, **fields: object) -> Path:
    import json

    data = {"version": 1, **fields}
    path.write_text("READY_FOR_TAKEOVER\n" + json.dumps(data) + "\n")
    return path


# -- an agent-built VM, for the end-to-end tests ------------------------------------------------
#
# Until tests/vm_fixtures.py (vm_image's fixtures) exists, the end-to-end tests build a minimal
# image the way the agent's `vm_image build` is specified to (docs/architecture.md): Debian 12 with
# systemd and openssh-server, a `proxy` user, the proxy in /opt/secret-proxy/venv run by
# secret-proxy.service, the agent's setup key in /home/proxy/.ssh/authorized_keys. It is cached.

E2E_CACHE = Path("/var/tmp/takeover-e2e")
AGENT_USER = "agent"
PACKAGES = ["systemd", "systemd-sysv", "udev", "openssh-server", "python3", "iproute2", "linux-image-amd64",
            "initramfs-tools", "kmod", "ca-certificates"]
NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def ensure_agent_user() -> tuple[int, int, Path]:
    import pwd

    try:
        entry = pwd.getpwnam(AGENT_USER)
    except KeyError:
        _run(["useradd", "--create-home", "--shell", "/bin/bash", AGENT_USER])
        entry = pwd.getpwnam(AGENT_USER)
    return entry.pw_uid, entry.pw_gid, Path(entry.pw_dir)


def agent_base_image() -> tuple[Path, Path, Path]:
    """(disk, kernel, initrd) of a cached agent-style image; built once (a few minutes)."""
    import hashlib

    from takeover.guest_files import UNIT, WRAPPER
    from takeover.venv import build_proxy_venv

    E2E_CACHE.mkdir(mode=0o755, exist_ok=True)
    key = hashlib.sha256(repr((PACKAGES, NETWORK, UNIT, WRAPPER, 2)).encode()).hexdigest()[:12]
    base = E2E_CACHE / f"image-{key}"
    disk, kernel, initrd = base / "disk.qcow2", base / "vmlinuz", base / "initrd.img"
    if disk.exists():
        return disk, kernel, initrd
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    rootfs = base / "rootfs.tar"
    if not rootfs.exists():
        _run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), "bookworm",
              str(rootfs) + ".partial"], timeout=1800)
        os.replace(str(rootfs) + ".partial", rootfs)
    venv = build_proxy_venv(base / "venv")
    partial = base / "disk.qcow2.partial"
    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(partial), "4G"])
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    g.set_backend_settings(["force_tcg"])
    g.add_drive_opts(str(partial), format="qcow2")
    g.launch()
    g.mkfs("ext4", "/dev/sda")
    g.mount("/dev/sda", "/")
    g.tar_in(str(rootfs), "/")
    passwd = g.read_file("/etc/passwd").decode().replace("proxy:x:13:13:proxy:/bin:/usr/sbin/nologin",
                                                          "proxy:x:13:13:proxy:/home/proxy:/bin/bash")
    g.write("/etc/passwd", passwd.encode())
    g.write("/etc/hostname", b"secret-proxy-vm\n")
    g.write("/etc/fstab", b"/dev/vda / ext4 rw 0 1\n")
    g.write("/etc/systemd/network/10-virtio.network", NETWORK.encode())
    for link, target in (("multi-user.target.wants/systemd-networkd.service", "systemd-networkd.service"),
                         ("sockets.target.wants/systemd-networkd.socket", "systemd-networkd.socket"),
                         ("dbus-org.freedesktop.network1.service", "systemd-networkd.service")):
        if "/" in link:
            g.mkdir_p("/etc/systemd/system/" + link.rpartition("/")[0])
        g.ln_sf("/lib/systemd/system/" + target, "/etc/systemd/system/" + link)
    g.mkdir_p("/opt/secret-proxy/venv")
    g.tar_in(str(venv), "/opt/secret-proxy/venv")
    g.write("/etc/systemd/system/secret-proxy.service", UNIT.encode())
    g.ln_sf("/etc/systemd/system/secret-proxy.service",
            "/etc/systemd/system/multi-user.target.wants/secret-proxy.service")
    g.write("/usr/local/bin/secret-proxy", WRAPPER.encode())
    g.chmod(0o755, "/usr/local/bin/secret-proxy")
    for path, mode in (("/home/proxy", 0o750), ("/home/proxy/.ssh", 0o700), ("/var/lib/secret-proxy", 0o700)):
        g.mkdir_p(path)
        g.chmod(mode, path)
        g.chown(13, 13, path)
    boot = sorted(n for n in g.ls("/boot") if n.startswith("vmlinuz-"))[-1]
    g.download("/boot/" + boot, str(kernel))
    g.download("/boot/" + boot.replace("vmlinuz-", "initrd.img-"), str(initrd))
    g.shutdown()
    g.close()
    os.chmod(partial, 0o644)
    os.replace(partial, disk)
    for path in (kernel, initrd):
        os.chmod(path, 0o644)
    return disk, kernel, initrd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AgentVM:
    """The agent's VM as `vm_image up` leaves it: running as the agent, with a ready file."""

    state: Path
    ready: Path
    proxy_port: int
    ssh_port: int
    uid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def ssh_as_agent(self, *remote: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        """What the agent can do with its setup key (run as the agent user)."""
        return subprocess.run(
            ["runuser", "-u", AGENT_USER, "--", "ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
             "-o", "IdentitiesOnly=yes", "-i", str(self.state / "image/setup_key"), "-p", str(self.ssh_port),
             "proxy@127.0.0.1", "--", *remote], input=stdin, capture_output=True, text=True, timeout=120)


def launch_agent_vm(state: Path, memory_mb: int = 512) -> AgentVM:
    """Copy the cached image into the agent's state dir and start it as the agent (TCG)."""
    import json
    import shutil

    uid, gid, _ = ensure_agent_user()
    disk, kernel, initrd = agent_base_image()
    image, run = state / "image", state / "run"
    for d in (state, image, run):
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    _run(["cp", "--sparse=always", str(disk), str(image / "disk.qcow2")])
    shutil.copyfile(kernel, image / "vmlinuz")
    shutil.copyfile(initrd, image / "initrd.img")
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "agent setup key", "-f", str(image / "setup_key")])
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    g.set_backend_settings(["force_tcg"])
    g.add_drive_opts(str(image / "disk.qcow2"), format="qcow2")
    g.launch()
    g.mount("/dev/sda", "/")
    g.write("/home/proxy/.ssh/authorized_keys", (image / "setup_key.pub").read_bytes())
    g.chown(13, 13, "/home/proxy/.ssh/authorized_keys")
    g.chmod(0o600, "/home/proxy/.ssh/authorized_keys")
    g.shutdown()
    g.close()
    for root, dirs, files in os.walk(state):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), uid, gid)
    os.chown(state, uid, gid)
    proxy_port, ssh_port = free_port(), free_port()
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", str(memory_mb), "-smp", "1",
            "-nodefaults", "-display", "none", "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0",
            "-drive", f"file={image / 'disk.qcow2'},if=virtio,format=qcow2",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{proxy_port}-:3737,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-rng-pci",
            "-serial", f"file:{run / 'serial.log'}", "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
            "-pidfile", str(run / "qemu.pid"), "-daemonize"]
    _run(["runuser", "-u", AGENT_USER, "--", *argv], timeout=120)
    pid = int((run / "qemu.pid").read_text())
    ready = run / "ready"
    ready.write_text("READY_FOR_TAKEOVER\n" + json.dumps({
        "version": 1, "monitor": str(run / "qmp.sock"), "disk": str(image / "disk.qcow2"), "pid": pid,
        "pidfile": str(run / "qemu.pid"), "serial_log": str(run / "serial.log"), "kernel": str(image / "vmlinuz"),
        "initrd": str(image / "initrd.img"), "setup_key_pub": str(image / "setup_key.pub"),
        "proxy": {"host": "127.0.0.1", "port": proxy_port}, "ssh": {"host": "127.0.0.1", "port": ssh_port,
                                                                    "user": "proxy"},
        "memory_mb": memory_mb, "cpus": 1, "accel": "tcg"}) + "\n")
    os.chown(ready, uid, gid)
    return AgentVM(state, ready, proxy_port, ssh_port, uid)


def wait_health(url: str, timeout: float = 600) -> float:
    import urllib.request

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"{url}/health did not answer within {timeout} s")
