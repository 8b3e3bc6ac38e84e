"""Step 5: start the VM again as the host's, from the host's disk, with the host's kernel.

Two runners share one description of the VM (`HostVMSpec`):

* `qemu` (default): a plain QEMU process, detached, run as an unprivileged
  user (`-runas`) under QEMU's seccomp sandbox; its monitor socket, pidfile and
  logs live in the host directory (0700), created under umask 077.
* `libvirt`: a persistent libvirt domain with autostart, so the VM comes back
  when the host reboots. User-mode networking with host forwards is passed
  through `<qemu:commandline>`, which Debian 12's libvirt 9.0 supports without passt.

Only two ports are forwarded: the proxy, at the address the agent used, and
SSH, at a host-only address.

The qemu runner knows its QEMU by more than a pid, which the next boot hands to
anyone: at start it records, root-owned in the host directory, the boot id, the
pid and its start time, the uid and the inode of the QEMU binary; a process is
the host's VM only if all of them still match and its command line names the
host's disk. Before starting, both forwarded ports must be free: a process
holding one (an agent posing as the proxy while the VM was down) is named and
refused, never talked to.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol
from xml.sax.saxutils import escape, quoteattr

from vm_image import health, proc
from vm_image.guest_files import PROXY_PORT as GUEST_PROXY_PORT
from vm_image.guest_files import SSH_PORT as GUEST_SSH_PORT
from vm_image.qemu_binary import QEMU, find_qemu
from vm_image.qemu_command import q35_args
from vm_image.shutdown import stop_qemu

from ..errors import RestartError, from_vm_image
from ..models import Endpoint
from . import forward_backlog
from .detached import start_detached
from .files import check_safe_path, write_json_atomic
from .monitor import Monitor
from .ports import check_port_free, listener_pids
from .regular_file import read_regular
from .terminal import log_tail
from .users import ensure_system_user

START_TIMEOUT = 60.0
DISK_NODE = "disk0"  # the host's disk's block node: snapshots are saved and deleted through it
# -runas needs setuid, and the process must not fork or exec afterwards; seccomp enforces the latter.
SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class HostVMSpec:
    name: str
    disk: Path
    kernel: Path
    initrd: Path
    append: str
    memory_mb: int
    cpus: int
    accel: str
    proxy_listen: Endpoint
    ssh_listen: Endpoint
    monitor: Path
    pidfile: Path
    serial_log: Path
    qemu_log: Path
    # An internal snapshot to resume from (`-loadvm`) instead of booting: the cut-over's prepared VM
    # (steps/first_boot.py). Never for `takeover start`, which would roll the disk back to it.
    loadvm: str | None = None

    def __post_init__(self) -> None:
        for path in (self.disk, self.kernel, self.initrd, self.monitor, self.pidfile, self.serial_log, self.qemu_log):
            check_safe_path(path, "VM file")
        if self.accel not in ("tcg", "kvm"):
            raise ValueError(f"accel must be tcg or kvm, not {self.accel!r}")
        if not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"VM name {self.name!r} must be letters, digits, - and _")
        if self.loadvm is not None and not (self.loadvm and all(c.isalnum() or c in "-_" for c in self.loadvm)):
            raise ValueError(f"snapshot name {self.loadvm!r} must be letters, digits, - and _")

    def hostfwd(self) -> str:
        return (
            f"hostfwd=tcp:{self.proxy_listen.host}:{self.proxy_listen.port}-:{GUEST_PROXY_PORT},"
            f"hostfwd=tcp:{self.ssh_listen.host}:{self.ssh_listen.port}-:{GUEST_SSH_PORT}"
        )


def machine_args(spec: HostVMSpec) -> list[str]:
    """The guest's hardware, shared by both runners: what the guest sees is the same either way."""
    disk_file = {"driver": "file", "filename": str(spec.disk), "node-name": "disk0-file"}
    # "backing": null: QEMU opens no backing file whatever the qcow2 header says (checked anyway).
    disk_fmt = {"driver": "qcow2", "file": "disk0-file", "node-name": DISK_NODE, "backing": None}
    return [
        *q35_args(spec.accel, spec.memory_mb, spec.cpus),  # the agent's VM's machine (vm_image), unchanged
        "-vga",
        "none",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        spec.append,
        "-blockdev",
        json.dumps(disk_file),
        "-blockdev",
        json.dumps(disk_fmt),
        "-device",
        f"virtio-blk-pci,drive={DISK_NODE}",
        "-device",
        "virtio-rng-pci",  # entropy: sshd and Python block on it early in a TCG boot
    ]


def qemu_command(spec: HostVMSpec, qemu_user: str | None) -> list[str]:
    qemu = find_qemu()
    if qemu is None:
        raise RestartError(f"{QEMU} is not installed")
    return [
        qemu,
        "-name",
        spec.name,
        *machine_args(spec),
        "-netdev",
        f"user,id=net0,{spec.hostfwd()}",
        "-device",
        "virtio-net-pci,netdev=net0",
        "-chardev",
        f"file,id=serial0,path={spec.serial_log}",
        "-serial",
        "chardev:serial0",
        "-qmp",
        f"unix:{spec.monitor},server=on,wait=off",
        "-pidfile",
        str(spec.pidfile),
        *(["-loadvm", spec.loadvm] if spec.loadvm else []),
        "-sandbox",
        SANDBOX,
        *(["-runas", qemu_user] if qemu_user else []),
    ]


IDENTITY_NAME = "qemu.identity.json"


@dataclass(frozen=True)
class QemuIdentity:
    """Who the host's QEMU is, recorded when the qemu runner started it."""

    boot_id: str  # /proc/sys/kernel/random/boot_id: a pid from an earlier boot names nothing now
    pid: int
    start_ticks: int
    uid: int
    exe: str
    exe_dev: int
    exe_ino: int

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def identity_path(spec: HostVMSpec) -> Path:
    return spec.pidfile.with_name(IDENTITY_NAME)


def read_identity(path: Path) -> QemuIdentity | None:
    """The recorded identity, if the file is root's own and 0600 (it lives in the 0700 host directory)."""
    try:
        raw, st = read_regular(path, 65536, owner=0)
        if st.st_mode & 0o077:
            return None
        data = json.loads(raw)
        return QemuIdentity(**{f.name: data[f.name] for f in fields(QemuIdentity)})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def exe_inode(pid: int) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/exe")  # the running binary's inode, even if its file was replaced since
    return st.st_dev, st.st_ino


def check_ports_free(spec: HostVMSpec) -> None:
    check_port_free(spec.proxy_listen, "the proxy's port")
    check_port_free(spec.ssh_listen, "the host's SSH forward")


def wait_until_serving(spec: HostVMSpec, pid: int, timeout: float) -> dict[str, Any]:
    """/health answers through the proxy's port, and the only process listening there is the host's QEMU."""
    ticks = proc.start_ticks(pid)
    with from_vm_image(
        RestartError,
        f"the host's VM (pid {pid}) is not serving: ",
        hint=f"read the serial log {spec.serial_log}; then `python -m takeover stop` and `start` again",
    ):
        seconds = health.wait_for_health(spec.proxy_listen.url, timeout, lambda: proc.alive(pid, ticks))
    holders = listener_pids(spec.proxy_listen)
    if holders != {pid}:
        raise RestartError(
            f"{spec.proxy_listen} is answered by pid(s) {sorted(holders) or 'unknown'}, not only by "
            f"the host's QEMU (pid {pid})",
            hint="stop the other process, then `python -m takeover stop` and `start` again",
        )
    return {"health_seconds": round(seconds, 3), "listener_pids": sorted(holders)}


@dataclass(frozen=True)
class VMDescription:
    """What a runner says about the VM it started, for the journal and the report."""

    runner: str
    qemu_user: str | None = None  # the qemu runner's
    monitor: str | None = None
    pidfile: str | None = None
    qemu_log: str | None = None
    command: list[str] | None = None
    uri: str | None = None  # the libvirt runner's
    domain: str | None = None
    persistent: bool | None = None
    autostart: bool | None = None
    active: bool | None = None
    error: str | None = None


class Runner(Protocol):
    name: str

    def start(self, spec: HostVMSpec) -> int: ...

    def stop(self, spec: HostVMSpec, undefine: bool = True) -> bool: ...

    def pid(self, spec: HostVMSpec) -> int | None: ...

    def describe(self, spec: HostVMSpec) -> VMDescription: ...


class QemuRunner:
    name = "qemu"

    def __init__(self, qemu_user: str | None) -> None:
        self.qemu_user = qemu_user

    def start(self, spec: HostVMSpec) -> int:
        if self.pid(spec) is not None:
            raise RestartError(
                f"a QEMU with {spec.disk} is already running (pidfile {spec.pidfile})",
                hint="stop it first (`python -m takeover stop`) or let the run use it",
            )
        for stale in (spec.monitor, spec.pidfile, identity_path(spec)):
            stale.unlink(missing_ok=True)
        if self.qemu_user:
            ensure_system_user(self.qemu_user, host_dir=spec.pidfile.parent)  # the pidfile is in the host dir
        argv = qemu_command(spec, self.qemu_user)
        # Not -daemonize: the sandbox forbids fork. A new session detaches QEMU from us instead.
        child = start_detached(argv, spec.qemu_log, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, umask=0o077)
        pid = self._wait_running(spec, child)
        try:
            self._record_identity(spec, pid, argv[0])
        except BaseException:
            child.kill()
            raise
        return pid

    def _wait_running(self, spec: HostVMSpec, child: subprocess.Popen[bytes]) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise RestartError(f"QEMU exited at start (exit {child.returncode}): {log_tail(spec.qemu_log)}")
            if spec.monitor.exists():
                try:
                    with Monitor(spec.monitor, timeout=5) as mon:
                        status = mon.execute("query-status")
                        if status.get("status") == "running":
                            return mon.peer.pid
                except Exception:  # noqa: BLE001 - not ready yet; the loop's deadline bounds this
                    pass
            time.sleep(0.2)
        child.kill()
        raise RestartError(f"QEMU did not come up within {START_TIMEOUT:.0f} s: {log_tail(spec.qemu_log)}")

    def _record_identity(self, spec: HostVMSpec, pid: int, binary: str) -> None:
        info = proc.read_process(pid)
        dev, ino = exe_inode(pid)
        binary_st = os.stat(binary)
        if (dev, ino) != (binary_st.st_dev, binary_st.st_ino) or info.uid not in self.allowed_uids():
            raise RestartError(
                f"the QEMU answering at {spec.monitor} (pid {pid}, uid {info.uid}, {info.exe}) "
                f"is not the one just started from {binary}"
            )
        identity = QemuIdentity(proc.current_boot_id(), pid, info.start_ticks, info.uid, info.exe, dev, ino)
        write_json_atomic(identity_path(spec), identity.to_dict())

    def allowed_uids(self) -> set[int]:
        """Root, and the unprivileged user QEMU switches to: the agent can run neither."""
        uids = {0}
        if self.qemu_user:
            try:
                uids.add(pwd.getpwnam(self.qemu_user).pw_uid)
            except KeyError:
                pass
        return uids

    def pid(self, spec: HostVMSpec) -> int | None:
        """The pid of the host's running QEMU for this disk, or None.

        Identified by the record made at start (boot id, pid, start time, uid, binary inode),
        checked against /proc; a pid alone is anyone's after a reboot. A host directory from
        before the record existed falls back to its pidfile, with the uid and the binary checked.
        """
        identity = read_identity(identity_path(spec))
        if identity is not None:
            if identity.boot_id != proc.current_boot_id() or not proc.alive(identity.pid, identity.start_ticks):
                return None
            pid, exe = identity.pid, (identity.exe_dev, identity.exe_ino)
        else:
            try:
                pid = int(spec.pidfile.read_text().strip())
                binary = find_qemu()
                binary_st = os.stat(binary) if binary else None
            except (OSError, ValueError):
                return None
            if binary_st is None:
                return None
            exe = (binary_st.st_dev, binary_st.st_ino)
        try:
            info = proc.read_process(pid)
            running = exe_inode(pid)
        except (OSError, ValueError):
            return None
        if info.uid not in self.allowed_uids() or running != exe:
            return None
        if not any(str(spec.disk) in a for a in info.cmdline):
            return None
        return pid

    def stop(self, spec: HostVMSpec, undefine: bool = True, *, powerdown: float | None = None) -> bool:
        """`powerdown`: seconds the guest gets to shut down by itself first (`takeover upgrade`, which reads
        the disk next and wants its filesystem clean); None quits at once."""
        pid = self.pid(spec)
        if pid is None:
            return False
        # No power-down asked of the guest by default, unlike `vm_image stop`: a stop here comes before a retried
        # start from the same disk, before a rollback deletes that disk, or from `takeover stop`, and the proxy in
        # the guest syncs every commit, so `quit` loses nothing it acknowledged.
        stop_qemu(spec.monitor, pid, powerdown=powerdown, quit_wait=30)
        for stale in (spec.monitor, spec.pidfile, identity_path(spec)):
            stale.unlink(missing_ok=True)
        return True

    def describe(self, spec: HostVMSpec) -> VMDescription:
        return VMDescription(
            runner=self.name,
            qemu_user=self.qemu_user,
            monitor=str(spec.monitor),
            pidfile=str(spec.pidfile),
            qemu_log=str(spec.qemu_log),
            command=qemu_command(spec, self.qemu_user),
        )


class LibvirtRunner:
    name = "libvirt"

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def _connect(self) -> Any:
        import libvirt

        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise RestartError(
                f"cannot connect to libvirt at {self.uri}: {exc}",
                hint="start libvirtd (and virtlogd), or use --runner qemu",
            ) from None

    def domain_xml(self, spec: HostVMSpec) -> str:
        return libvirt_domain_xml(spec)

    def start(self, spec: HostVMSpec) -> int:
        import libvirt

        conn = self._connect()
        try:
            try:
                old = conn.lookupByName(spec.name)
            except libvirt.libvirtError:
                old = None
            if old is not None:
                if old.isActive():
                    raise RestartError(
                        f"libvirt domain {spec.name} is already running",
                        hint="stop it first (`virsh destroy`) or rerun `python -m takeover run`",
                    )
                old.undefine()
            dom = conn.defineXML(self.domain_xml(spec))
            dom.setAutostart(1)
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                raise RestartError(f"libvirt could not start {spec.name}: {exc}") from None
            pid = self.pid(spec)
            if pid is None:
                raise RestartError(f"libvirt started {spec.name} but its QEMU pid is unknown")
            return pid
        finally:
            conn.close()

    def pid(self, spec: HostVMSpec) -> int | None:
        for run_dir in ("/run/libvirt/qemu", "/var/run/libvirt/qemu"):
            try:
                pid = int(Path(run_dir, f"{spec.name}.pid").read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                info = proc.read_process(pid)
            except OSError:
                return None
            if any(str(spec.disk) in a for a in info.cmdline):
                return pid
        return None

    def stop(self, spec: HostVMSpec, undefine: bool = True) -> bool:
        """Destroy the domain if running; with `undefine`, forget it too (a run replaces it)."""
        import libvirt

        conn = self._connect()
        try:
            try:
                dom = conn.lookupByName(spec.name)
            except libvirt.libvirtError:
                return False
            active = bool(dom.isActive())
            if active:
                # libvirt owns this QEMU (its monitor, its pid): destroy is libvirt's own SIGTERM-then-SIGKILL,
                # where vm_image's stop_qemu would act behind libvirt's back.
                dom.destroy()
            if undefine:
                dom.undefine()
            return active or undefine
        finally:
            conn.close()

    def describe(self, spec: HostVMSpec) -> VMDescription:
        import libvirt

        conn = self._connect()
        try:
            dom = conn.lookupByName(spec.name)
            return VMDescription(
                runner=self.name,
                uri=self.uri,
                domain=spec.name,
                persistent=bool(dom.isPersistent()),
                autostart=bool(dom.autostart()),
                active=bool(dom.isActive()),
            )
        except libvirt.libvirtError as exc:
            return VMDescription(runner=self.name, uri=self.uri, domain=spec.name, error=str(exc))
        finally:
            conn.close()


def libvirt_domain_xml(spec: HostVMSpec) -> str:
    """A persistent domain of type 'qemu' (TCG) or 'kvm', user networking through qemu:commandline."""
    domain_type = "kvm" if spec.accel == "kvm" else "qemu"
    extra = ["-netdev", f"user,id=net0,{spec.hostfwd()}", "-device", "virtio-net-pci,netdev=net0,addr=0x10"]
    args = "\n".join(f"    <qemu:arg value={quoteattr(a)}/>" for a in extra)
    return f"""<domain type='{domain_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(spec.name)}</name>
  <memory unit='MiB'>{spec.memory_mb}</memory>
  <vcpu>{spec.cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(spec.kernel))}</kernel>
    <initrd>{escape(str(spec.initrd))}</initrd>
    <cmdline>{escape(spec.append)}</cmdline>
  </os>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>restart</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(str(spec.disk))}/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path={quoteattr(str(spec.serial_log))}/>
      <target port='0'/>
    </serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
{args}
  </qemu:commandline>
</domain>
"""


def make_runner(name: str, *, qemu_user: str | None, libvirt_uri: str) -> Runner:
    if name == "qemu":
        return QemuRunner(qemu_user)
    if name == "libvirt":
        return LibvirtRunner(libvirt_uri)
    raise ValueError(f"unknown runner {name!r}")


def widen_forwards(spec: HostVMSpec, pid: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Give QEMU's two forwarded ports a real listen backlog (`forward_backlog`); a failure is reported, not fatal."""
    try:
        return {"backlog": forward_backlog.widen(pid, (spec.proxy_listen, spec.ssh_listen))}
    except forward_backlog.BacklogError as exc:
        progress(
            f"warning: {exc}; the forwarded ports keep QEMU's backlog of 1, "
            "so agents connecting at once may wait seconds for their handshakes"
        )
        return {"backlog": exc.widened or None, "error": str(exc)}
