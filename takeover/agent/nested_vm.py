"""The agent's VM nested in an agent machine: found, stopped, started again and cleared away over SSH.

Root in the agent machine is the agent (it has sudo there, or is root): its kernel, its /proc, its
QEMU and its files are all the agent's word. So nothing read here is a proof the way the local
path's kernel checks are (steps/find_vm.py); each answer is a claim, bounded in size and time
(agent/machine.py), parsed as data, and used only where a lie costs the agent its own VM:

- the ready file, the QEMU process and QMP's answers must agree with each other, or the takeover
  stops before anything changes (a consistency check: it catches a stale or mistyped ready file);
- what the host takes from the machine is the disk's bytes, which are read only as an unprivileged
  host user in the sandbox and then replaced by the host's own build (agent/machine_disk.py);
- what the host does in the machine is bounded to the files step 1 saw: a ready file naming the
  machine's /etc/shadow as its pidfile does not make the takeover delete it.

Nothing the machine says ever reaches a command line on the host: remote commands are argv
lists, quoted once for the remote shell (Connection.run), and every remote path is checked plain.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from vm_image import proc
from vm_image.guest_files import PROXY_PORT as GUEST_PROXY_PORT

from ..errors import CheckpointError, DiskMismatch, MonitorNotQMP, NotTheAgentsVM, ReadyFileError, RollbackError
from ..host.monitor import Monitor
from ..models import CHECKPOINT_TAG, Endpoint, SourceVM
from .machine import AgentMachineError, AgentMachineFlood, Connection, check_remote_path
from .proxy_address import parse_usernet
from .qemu_answers import disk_nodes, vm_size
from .ready_file import READY_MAX_BYTES, ReadyInfo, parse_ready

QEMU_EXE = re.compile(r"^qemu-system-[a-z0-9_]+$")
MONITOR_NAME = "agent-qmp.sock"  # the nested monitor, forwarded into the host directory
HEALTH_NAME = "agent-proxy.sock"  # the nested proxy, forwarded for a rollback's /health
MAX_BLOCKS = 64  # QMP query-block entries a VM vm_image made could have; more is a flood
START_TIMEOUT = 300.0
# Where the agent's tools in the machine read the proxy's address and token when SECRET_PROXY_URL and
# SECRET_PROXY_TOKEN(_FILE) are unset (proxy/agent/config.py): the takeover writes them there.
AGENT_CONFIG_DIR = "/etc/secret-proxy"
AGENT_URL_FILE = f"{AGENT_CONFIG_DIR}/url"
AGENT_TOKEN_FILE = f"{AGENT_CONFIG_DIR}/token"


@dataclass(frozen=True)
class MachineProcess:
    """A process of the agent machine, as its /proc describes it (the machine's claim)."""

    pid: int
    start_ticks: int
    uid: int
    gid: int
    exe: str
    cwd: str
    cmdline: list[str]


def read_ready(conn: Connection, path: str) -> ReadyInfo:
    """The ready file in the agent machine: at most READY_MAX_BYTES, fetched over the connection."""
    check_remote_path(path)
    try:
        raw = conn.read_file(path, READY_MAX_BYTES)
    except AgentMachineFlood:
        raise ReadyFileError(
            f"the ready file {path} in the agent machine is larger than {READY_MAX_BYTES} bytes"
        ) from None
    except AgentMachineError as exc:
        raise ReadyFileError(f"cannot read the ready file {path} in the agent machine: {exc}") from None
    return parse_ready(raw, Path(path), None)


def machine_process(conn: Connection, pid: int) -> MachineProcess:
    """/proc/PID of the agent machine: its start time, owner, binary, working directory and command line."""
    where = f"/proc/{pid}"
    try:
        stat = proc.parse_stat(conn.read_file(f"{where}/stat", 4096).decode("ascii", "replace"), pid)
        status = conn.read_file(f"{where}/status", 16384).decode("ascii", "replace")
        cmdline = conn.read_file(f"{where}/cmdline", 65536)
    except AgentMachineError:
        raise NotTheAgentsVM(f"the agent machine has no process {pid} (the ready file's QEMU)") from None
    except ValueError as exc:
        raise NotTheAgentsVM(f"the agent machine's /proc/{pid}/stat: {exc}") from None
    ids = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("Uid", "Gid") and value.split():
            ids[name] = int(value.split()[0]) if value.split()[0].isdigit() else -1
    exe, cwd = _readlink(conn, f"{where}/exe"), _readlink(conn, f"{where}/cwd")
    argv = [a.decode("utf-8", "replace") for a in cmdline.split(b"\0")[:-1]]
    if len(ids) != 2 or min(ids.values()) < 0 or not argv:
        raise NotTheAgentsVM(f"the agent machine's /proc/{pid} does not describe a process the kernel's way")
    return MachineProcess(pid, stat.start_ticks, ids["Uid"], ids["Gid"], exe, cwd, argv)


def _readlink(conn: Connection, path: str) -> str:
    got = conn.run(["readlink", "--", path], max_output=4096)
    return got.stdout.decode("utf-8", "replace").strip() if got.returncode == 0 else ""


def real_path(conn: Connection, path: str) -> str:
    """The agent machine's realpath of `path` (it need not exist), checked plain."""
    got = conn.run(["realpath", "-m", "--", check_remote_path(path)], max_output=8192)
    text = got.stdout.decode("utf-8", "replace").strip()
    if got.returncode != 0 or not text:
        raise DiskMismatch(f"the agent machine cannot resolve {path}")
    return check_remote_path(text)


@dataclass(frozen=True)
class FileClaim:
    kind: str  # stat's %F: "regular file", "socket", ...
    dev: int
    ino: int
    uid: int
    size: int


def stat_file(conn: Connection, path: str) -> FileClaim | None:
    """What the agent machine says `path` is (not following a final link); None if it is not there."""
    got = conn.run(["stat", "-c", "%F|%d|%i|%u|%s", "--", check_remote_path(path)], max_output=4096)
    if got.returncode != 0:
        return None
    kind, *numbers = got.stdout.decode("utf-8", "replace").strip().split("|")
    if len(numbers) != 4 or not all(n.isdigit() for n in numbers):
        raise NotTheAgentsVM(f"the agent machine's stat of {path} is not stat's format")
    dev, ino, uid, size = (int(n) for n in numbers)
    return FileClaim(kind, dev, ino, uid, size)


def forward_monitor(conn: Connection, monitor: str, host_dir: Path) -> Path:
    """The nested QEMU's QMP socket, reachable as a socket of root's in the host directory."""
    local = host_dir / MONITOR_NAME
    conn.forward_unix(monitor, local)
    return local


def find_nested_vm(conn: Connection, ready_path: str, host_dir: Path) -> SourceVM:
    """Step 1 for a nested VM: the ready file, the QEMU it names and that QEMU's answers, all agreeing.

    Its `proxy` is the nested proxy's address until the caller says where the host will serve it.
    """
    ready = read_ready(conn, ready_path)
    pid = _the_pid(conn, ready)
    qemu = machine_process(conn, pid)
    if not QEMU_EXE.match(os.path.basename(qemu.exe)):
        raise DiskMismatch(f"pid {pid} in the agent machine runs {qemu.exe!r}, not QEMU")
    notes = ["the nested QEMU runs as root in the agent machine"] if qemu.uid == 0 else []
    disk = real_path(conn, str(ready.disk))
    disk_claim = stat_file(conn, disk)
    if disk_claim is None or disk_claim.kind != "regular file":
        raise DiskMismatch(f"the disk {ready.disk} is not a regular file in the agent machine")
    monitor = check_remote_path(str(ready.monitor))
    local = forward_monitor(conn, monitor, host_dir)
    resolved: dict[str, str] = {}

    def resolve(name: str) -> str:
        if name not in resolved:
            if len(resolved) >= MAX_BLOCKS:
                raise MonitorNotQMP(f"the nested QEMU reports more than {MAX_BLOCKS} disks")
            resolved[name] = real_path(conn, name)
        return resolved[name]

    with Monitor(local) as mon:  # the peer is root's ssh: the machine's own credentials are not ours to check
        blocks = mon.execute("query-block")
        if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS:
            raise MonitorNotQMP("the nested QEMU's query-block answer is not a list of at most 64 disks")
        nodes, vmstate_node = disk_nodes(blocks, Path(disk), resolve)
        commands = {c["name"] for c in mon.execute("query-commands")}
        status = mon.execute("query-status").get("status")
        usernet = mon.hmp("info usernet", timeout=30) if "human-monitor-command" in commands else ""
        memory_mb, cpus = vm_size(mon)
    machine_proxy = _nested_proxy(ready.proxy, usernet)
    if "snapshot-save" not in commands:
        notes.append("the nested QEMU has no snapshot-save job; the checkpoint uses HMP savevm")
    if status != "running":
        notes.append(f"the nested VM was {status!r}, not running")
    return SourceVM(
        monitor=monitor,
        disk=disk,
        disk_dev=disk_claim.dev,
        disk_ino=disk_claim.ino,
        disk_uid=disk_claim.uid,
        pid=pid,
        pid_start_ticks=qemu.start_ticks,
        uid=qemu.uid,
        gid=qemu.gid,
        groups=[],
        cwd=qemu.cwd if qemu.cwd.startswith("/") else "/",
        cmdline=qemu.cmdline,
        proxy=machine_proxy,
        memory_mb=memory_mb,
        cpus=cpus,
        block_nodes=nodes,
        vmstate_node=vmstate_node,
        ready_file=ready_path,
        pidfile=str(ready.pidfile) if ready.pidfile else None,
        setup_key_pub=str(ready.setup_key_pub) if ready.setup_key_pub else None,
        notes=notes,
        machine=str(conn.machine.address),
        machine_proxy=machine_proxy,
    )


def _the_pid(conn: Connection, ready: ReadyInfo) -> int:
    """The nested QEMU's pid: the ready file's, and its pidfile's, which must agree."""
    from_file = None
    if ready.pidfile is not None:
        try:
            text = conn.read_file(check_remote_path(str(ready.pidfile)), 64).decode("ascii", "replace").strip()
        except AgentMachineError as exc:
            raise NotTheAgentsVM(f"cannot read the pidfile {ready.pidfile} in the agent machine: {exc}") from None
        if not text.isdigit() or not 0 < int(text) < 2**22:
            raise NotTheAgentsVM(f"the pidfile {ready.pidfile} names {text[:20]!r}, not a pid")
        from_file = int(text)
    if ready.pid is not None and from_file is not None and ready.pid != from_file:
        raise NotTheAgentsVM(f"the ready file says QEMU is pid {ready.pid}, its pidfile {from_file}")
    pid = ready.pid or from_file
    if pid is None:
        raise ReadyFileError("a ready file in an agent machine must name QEMU's pid or pidfile (vm_image's does)")
    return pid


def _nested_proxy(claimed: Endpoint | None, usernet: str) -> Endpoint:
    """Where the nested VM serves the proxy inside the machine: the ready file's claim, if QEMU forwards it."""
    to_proxy = [f for f in parse_usernet(usernet) if f.guest_port == GUEST_PROXY_PORT]
    if claimed is not None:
        if usernet and not any((f.host, f.port) == (claimed.host, claimed.port) for f in to_proxy):
            raise DiskMismatch(f"the ready file puts the nested proxy at {claimed}, but its QEMU does not forward it")
        return claimed
    if len(to_proxy) != 1:
        raise DiskMismatch(f"cannot tell where the nested VM serves the proxy: {len(to_proxy)} forwards to it")
    host = "127.0.0.1" if to_proxy[0].host == "0.0.0.0" else to_proxy[0].host
    return Endpoint(host, to_proxy[0].port)


def nested_alive(conn: Connection, pid: int, ticks: int) -> bool:
    """Whether the machine says process `pid`, started at `ticks`, is still there (and not a zombie)."""
    try:
        stat = proc.parse_stat(conn.read_file(f"/proc/{pid}/stat", 4096).decode("ascii", "replace"), pid)
    except (AgentMachineError, ValueError):
        return False
    return stat.start_ticks == ticks and stat.state != "Z"


def wait_nested_gone(conn: Connection, source: SourceVM, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while nested_alive(conn, source.pid, source.pid_start_ticks):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def nested_snapshots(conn: Connection, disk: str) -> set[str]:
    """The internal snapshots the machine's qemu-img lists in the (closed) nested disk."""
    got = conn.run(["qemu-img", "info", "-U", "--output=json", "--", check_remote_path(disk)], max_output=1 << 20)
    if got.returncode != 0:
        said = got.stderr.decode("utf-8", "replace").strip()[-200:]
        raise CheckpointError(f"the agent machine's qemu-img cannot read {disk}: {said}")
    try:
        info = json.loads(got.stdout)
        return {str(s.get("name")) for s in info.get("snapshots") or [] if isinstance(s, dict)}
    except (ValueError, AttributeError):
        raise CheckpointError(f"the agent machine's qemu-img info of {disk} is not JSON") from None


def remove_nested_file(conn: Connection, path: str, kind: str, source: SourceVM, *, disk: bool = False) -> str:
    """Remove one of the nested VM's files if the machine says it is still what step 1 saw; says what happened."""
    claim = stat_file(conn, path)
    if claim is None:
        return "already gone"
    if claim.kind != kind:
        return f"not removed: not a {kind}"
    if disk and (claim.dev, claim.ino) != (source.disk_dev, source.disk_ino):
        return "not removed: not the file checked in step 1"
    if not disk and claim.uid != source.uid:
        return f"not removed: owned by uid {claim.uid}, not the nested QEMU's ({source.uid})"
    got = conn.run(["rm", "-f", "--", path])
    return "removed" if got.returncode == 0 else f"not removed: {got.stderr.decode(errors='replace').strip()[-100:]}"


def tell_agent(conn: Connection, url: str, token: bytes | None, uid: int, gid: int) -> list[str]:
    """Write the served address (and the agent's new token) where the agent's tools in the machine read
    them (proxy/agent/config.py); the token 0600, the nested QEMU's user's. Returns the paths written."""
    conn.run(["mkdir", "-p", "-m", "0755", "--", AGENT_CONFIG_DIR])
    written = [_install(conn, AGENT_URL_FILE, f"{url}\n".encode(), "0644", 0, 0)]
    if token is not None:
        written.append(_install(conn, AGENT_TOKEN_FILE, token, "0600", uid, gid))
    return written


def _install(conn: Connection, path: str, data: bytes, mode: str, uid: int, gid: int) -> str:
    got = conn.run(["install", "-m", mode, "-o", str(uid), "-g", str(gid), "/dev/stdin", path], input=data)
    if got.returncode != 0:
        said = got.stderr.decode(errors="replace").strip()[-200:]
        raise AgentMachineError(f"cannot write {path} in the agent machine: {said}")
    return path


def replay_nested(source: SourceVM, load_checkpoint: bool) -> list[str]:
    """The nested QEMU's own command line, to run again in the machine as its user, from the checkpoint.

    It runs in the agent's machine only, as the argv it was (the agent could run it itself): the host
    checks it only for what would keep it from coming back (an old -loadvm, -incoming, -S).
    """
    cmdline = list(source.cmdline)
    if not cmdline or not QEMU_EXE.match(os.path.basename(cmdline[0])):
        raise RollbackError("the nested QEMU's command line does not start with QEMU; it cannot be replayed")
    args: list[str] = []
    skip = False
    for arg in cmdline[1:]:
        if skip:
            skip = False
            continue
        option = "-" + arg.lstrip("-") if arg.startswith("-") else arg
        if option in ("-loadvm", "-incoming"):
            skip = True
        elif option != "-S":
            args.append(arg)
    if load_checkpoint:
        args += ["-loadvm", CHECKPOINT_TAG]
    as_user = ["setpriv", f"--reuid={source.uid}", f"--regid={source.gid}", "--clear-groups", "--"]
    foreground = "-daemonize" not in args and "--daemonize" not in args
    return ["env", "-C", source.cwd, *(["setsid", "-f"] if foreground else []), *as_user, cmdline[0], *args]


def restart_nested(conn: Connection, source: SourceVM, *, load_checkpoint: bool) -> None:
    got = conn.run(replay_nested(source, load_checkpoint), timeout=START_TIMEOUT)
    if got.returncode != 0:
        said = got.stderr.decode("utf-8", "replace").strip()[-400:]
        raise RollbackError(f"the nested QEMU did not start again in the agent machine: {said}")


def wait_nested_health(conn: Connection, source: SourceVM, host_dir: Path, timeout: float) -> float:
    """Seconds until the nested proxy answers /health inside the machine (through a forwarded socket)."""
    if source.machine_proxy is None:
        raise RollbackError("the journal has no address for the nested proxy")
    local = host_dir / HEALTH_NAME
    conn.forward_tcp(source.machine_proxy.host, source.machine_proxy.port, local)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _healthy(local):
            return time.monotonic() - started
        time.sleep(1)
    raise RollbackError(f"the nested proxy did not answer /health within {timeout:.0f} s")


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(self._path))
        self.sock = sock


def _healthy(path: Path) -> bool:
    conn = _UnixHTTP(path)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read(4096)
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
