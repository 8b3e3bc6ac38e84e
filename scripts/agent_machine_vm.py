"""A real agent machine: a Debian 12 VM with QEMU, Python and this checkout in it, root reached by SSH key.

What an agent's own VM is elsewhere (Multipass, libvirt), made here offline from vm_image's own
pieces rather than by a second image builder: vm_image's base root filesystem with QEMU added
(`base_rootfs(extra_packages=...)`), this machine's files laid over it and made into a qcow2 by
`assemble_disk`, booted with vm_image's kernel and initrd (`boot_files`) and its QEMU command line
(`qemu_argv`, with a translation cache big enough for a guest that runs QEMU itself). Inside it,
`python3 -m vm_image launch --accel tcg` starts the proxy VM nested in it: TCG inside TCG.

vm_image needs one package beyond the standard library, qemu.qmp (pure Python); Debian 12 does not
package it, so the machine gets the host's installed copy where Debian's python3 looks
(/usr/local/lib/python3.11/dist-packages), as `pip install` would put it.

root logs in with a key made for each machine and pins the host key made with it. The machine's
own port 3737 is forwarded too (vm_image's command line forwards two ports); nothing listens there.

bench/bench_nested_tcg.py measures this path once; tests/test_nested_tcg.py plays it when asked
(SPVM_NESTED_TCG=1). CI does not: on 2 cores without KVM the nested guest did not answer /health
within 40 minutes (docs/benchmarks.md, "TCG inside TCG").
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.demo import free_port
from vm_image import guest_files as gf
from vm_image import proc
from vm_image.boot_files import KERNEL_APPEND, boot_files
from vm_image.control import stop
from vm_image.disk import TarWriter, assemble_disk
from vm_image.keys import new_host_key, ssh_keygen
from vm_image.launch import serial_tail, start_qemu
from vm_image.layout import Layout
from vm_image.qemu_command import VmConfig, qemu_argv, qemu_binary
from vm_image.rootfs import base_rootfs
from vm_image.ssh_command import ssh_argv

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path("/var/tmp/secret-proxy-vm-tests/agent-machine-cache")
PACKAGES = ("qemu-system-x86", "qemu-utils")  # beside vm_image's base: systemd, openssh-server, python3
DISK_SIZE = "4G"  # the system (~700 MB), the proxy's image and its nested VM's writes
CHECKOUT = "/opt/secret-proxy-vm"
SITE_PACKAGES = "/usr/local/lib/python3.11/dist-packages"
NESTED_STATE = "/root/spvm"  # the nested proxy VM's state directory in the machine
NESTED_PROXY = "http://127.0.0.1:3737"  # `vm_image launch`'s default, on the machine's loopback
TCG_CACHE_MB = 512  # the nested QEMU's translated code changes all the time: vm_image's 64 MB would thrash
HOSTNAME = "agent-machine"
SSHD_DROPIN = """\
# The agent machine of bench_nested_tcg: root by key, nothing else.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
"""
SSH_OPTIONS = (
    "BatchMode=yes",
    "IdentitiesOnly=yes",
    "StrictHostKeyChecking=yes",
    "LogLevel=ERROR",
    "ConnectTimeout=30",
    "ServerAliveInterval=30",
    "ServerAliveCountMax=20",  # a guest under TCG can be slow to answer for minutes
)

Note = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class MachineImage:
    layout: Layout  # disk, kernel and initrd in layout.image; QEMU's pid, monitor and console in layout.run
    root_key: Path
    host_key_pub: bytes
    build_seconds: float


@dataclass(frozen=True)
class AgentMachineVM:
    image: MachineImage
    ssh_port: int
    known_hosts: Path
    boot_seconds: float  # QEMU started → root's first SSH command answered

    def argv(self, command: str) -> list[str]:
        options = (*SSH_OPTIONS, f"UserKnownHostsFile={self.known_hosts}")
        return ssh_argv("127.0.0.1", self.ssh_port, "root", [command], options=options, key=self.image.root_key)

    def run(self, command: str, *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )

    def python(self, code: str, *, timeout: float = 300) -> str:
        """Debian's python3 in the machine, in the checkout (so vm_image imports), its output."""
        done = self.run(f"cd {CHECKOUT} && python3 -c {shlex.quote(code)}", timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"python3 in the agent machine failed: {done.stderr.strip()[-1000:]}")
        return done.stdout

    def stop(self) -> str:
        return stop(self.image.layout, timeout=60)


@dataclass(frozen=True)
class NestedLaunch:
    """How far `vm_image launch` inside the machine got."""

    healthy: bool
    wall_seconds: float  # the launch command, seen from the host
    boot_seconds: float | None  # the nested guest's boot to /health, from its ready file
    output: list[str]  # the launch's progress lines
    serial_tail: str  # the nested guest's console when it did not come up


def build_machine_image(state: Path, note: Note = _quiet) -> MachineImage:
    """The machine's disk, kernel and initrd in `state`/image, and root's key; the root filesystem is cached."""
    started = time.monotonic()
    layout = Layout(state, CACHE)
    layout.make_dirs()
    boot = boot_files(CACHE / "boot", note)
    rootfs = base_rootfs(CACHE, progress=note, extra_packages=PACKAGES)
    root_key = layout.image / "root_key"
    ssh_keygen(root_key, "root@host for the agent machine")
    work = state / "work"
    work.mkdir(mode=0o700)
    host_key, host_pub = new_host_key(work)
    root_pub = root_key.with_name("root_key.pub").read_bytes()
    overlay = write_machine_overlay(work / "overlay.tar", root_pub, host_key, host_pub)
    note(f"assembling the agent machine's {DISK_SIZE} disk (system with QEMU, this checkout, qemu.qmp)")
    assemble_disk(rootfs, overlay, work, layout.disk, DISK_SIZE)
    for src, dst in ((boot.kernel, layout.kernel), (boot.initrd, layout.initrd)):
        dst.write_bytes(src.read_bytes())
    for leftover in work.iterdir():
        leftover.unlink()
    work.rmdir()
    return MachineImage(layout, root_key, host_pub, time.monotonic() - started)


def write_machine_overlay(out: Path, root_pub: bytes, host_key: bytes, host_pub: bytes) -> Path:
    """What the machine has over vm_image's base: identity, network, root's key, sshd, the checkout, qemu.qmp."""
    with tarfile.open(out, "w") as tar:
        w = TarWriter(tar)
        w.add("/etc/hostname", 0o644, f"{HOSTNAME}\n".encode())
        w.add("/etc/hosts", 0o644, f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n".encode())
        w.add("/etc/fstab", 0o644, gf.FSTAB.encode())
        w.add("/etc/systemd/network/10-virtio.network", 0o644, gf.NETWORK.encode())
        w.add("/etc/ssh/sshd_config.d/10-agent-machine.conf", 0o644, SSHD_DROPIN.encode())
        w.add("/etc/ssh/ssh_host_ed25519_key", 0o600, host_key)
        w.add("/etc/ssh/ssh_host_ed25519_key.pub", 0o644, host_pub)
        w.add("/root/.ssh", 0o700)
        w.add("/root/.ssh/authorized_keys", 0o600, root_pub)
        for relative, mode, data in checkout_files():
            w.add(f"{CHECKOUT}/{relative}", mode, data)
        for relative, data in qmp_package_files():
            w.add(f"{SITE_PACKAGES}/{relative}", 0o644, data)
    return out


def checkout_files() -> list[tuple[str, int, bytes]]:
    """This checkout's tracked files as they are in the work tree (path, mode, bytes)."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True, timeout=60
    ).stdout
    files = []
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and not path.is_symlink():
            files.append((name, 0o755 if os.access(path, os.X_OK) else 0o644, path.read_bytes()))
    return files


def qmp_package_files() -> list[tuple[str, bytes]]:
    """qemu.qmp as the host has it installed: vm_image's one import outside the standard library."""
    import qemu.qmp

    package = Path(qemu.qmp.__file__).parent
    return [(f"qemu/qmp/{p.name}", p.read_bytes()) for p in sorted(package.iterdir()) if p.suffix in (".py", ".typed")]


def boot_machine(
    image: MachineImage, *, memory_mb: int = 2560, cpus: int = 2, timeout: float = 900, note: Note = _quiet
) -> AgentMachineVM:
    """Start the machine under TCG and wait until root's SSH runs a command in it (or `timeout`)."""
    layout = image.layout
    ssh_port = free_port()
    known_hosts = layout.run / "known_hosts"
    known_hosts.write_bytes(b"[127.0.0.1]:%d " % ssh_port + b" ".join(image.host_key_pub.split()[:2]) + b"\n")
    cfg = VmConfig(
        layout.disk,
        layout.kernel,
        layout.initrd,
        KERNEL_APPEND,
        layout.monitor,
        layout.pidfile,
        layout.serial_log,
        proxy_port=free_port(),
        ssh_port=ssh_port,
        memory_mb=memory_mb,
        cpus=cpus,
        accel="tcg",
        tcg_cache_mb=TCG_CACHE_MB,
    )
    started = time.monotonic()
    start_qemu(qemu_argv(cfg, qemu_binary()), layout.pidfile)
    pid = proc.read_pid(layout.pidfile)
    machine = AgentMachineVM(image, ssh_port, known_hosts, 0.0)
    last_note = started
    while True:
        try:
            if machine.run("true", timeout=60).returncode == 0:
                break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if pid is None or not proc.is_qemu(pid):
            raise RuntimeError(f"the agent machine's QEMU exited while booting.\n{serial_tail(layout.serial_log)}")
        if now - started > timeout:
            stop(layout, timeout=10)
            raise RuntimeError(
                f"the agent machine did not answer SSH within {timeout:.0f} s.\n{serial_tail(layout.serial_log)}"
            )
        if now - last_note >= 30:
            last_note = now
            note(f"agent machine booting ({now - started:.0f} s)")
        time.sleep(2)
    return AgentMachineVM(image, ssh_port, known_hosts, time.monotonic() - started)


def copy_proxy_image(machine: AgentMachineVM, image_state: Path, timeout: float = 900) -> float:
    """`image_state`/image (what `vm_image build` made) into the machine's NESTED_STATE, over SSH; seconds."""
    started = time.monotonic()
    remote = f"mkdir -p {NESTED_STATE} && tar -C {NESTED_STATE} --no-same-owner -xf -"
    with subprocess.Popen(["tar", "-C", str(image_state), "-cf", "-", "image"], stdout=subprocess.PIPE) as tar:
        done = subprocess.run(machine.argv(remote), stdin=tar.stdout, capture_output=True, text=True, timeout=timeout)
    if tar.returncode != 0 or done.returncode != 0:
        raise RuntimeError(f"copying the proxy's image into the agent machine failed: {done.stderr.strip()}")
    return time.monotonic() - started


def launch_nested(
    machine: AgentMachineVM, timeout: float, on_line: Callable[[float, str], None] = lambda _s, _l: None
) -> NestedLaunch:
    """`python3 -m vm_image launch --accel tcg` in the machine, bounded by `timeout` (its own --timeout too)."""
    command = (
        f"cd {CHECKOUT} && exec python3 -m vm_image launch --state-dir {NESTED_STATE} "
        f"--accel tcg --timeout {int(timeout)} 2>&1"
    )
    started = time.monotonic()
    output: list[str] = []
    launch = subprocess.Popen(machine.argv(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)

    def read() -> None:
        assert launch.stdout is not None
        for line in launch.stdout:
            output.append(line.rstrip("\n"))
            on_line(time.monotonic() - started, output[-1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        launch.wait(timeout=timeout + 300)  # its own deadline, the stop of a guest that did not come up, SSH
    except subprocess.TimeoutExpired:
        launch.kill()
        launch.wait()
        output.append(f"(the launch was still running after {timeout + 300:.0f} s: SSH to it closed)")
    reader.join(timeout=10)
    wall = time.monotonic() - started
    healthy = launch.returncode == 0 and nested_health(machine)
    boot = nested_boot_seconds(machine) if healthy else None
    tail = "" if healthy else nested_serial_tail(machine)
    return NestedLaunch(healthy, wall, boot, output, tail)


def nested_health(machine: AgentMachineVM) -> bool:
    """The nested proxy's /health answers on the machine's loopback (vm_image's own check, in the machine)."""
    code = f"from vm_image.health import answers; print(answers({NESTED_PROXY!r}, timeout=30))"
    return machine.python(code, timeout=120).strip() == "True"


def nested_boot_seconds(machine: AgentMachineVM) -> float | None:
    """The nested guest's boot to /health, as `vm_image launch` wrote it in its ready file."""
    code = (
        "from pathlib import Path; from vm_image.control import read_ready; "
        f"print(read_ready(Path({NESTED_STATE + '/run/ready'!r})).get('boot_seconds', ''))"
    )
    text = machine.python(code, timeout=120).strip()
    return float(text) if text else None


def nested_serial_tail(machine: AgentMachineVM) -> str:
    """The nested guest's last console lines, for a launch that did not come up."""
    done = machine.run(f"tail -n 15 {NESTED_STATE}/run/serial.log", timeout=120)
    return done.stdout if done.returncode == 0 else f"(no console: {done.stderr.strip()})"
