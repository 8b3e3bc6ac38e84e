"""Step 1: find the agent's VM and check it is what the ready file says, before anything changes.

The ready file is the agent's and may lie; so may the socket it names. What we
believe instead: the kernel (the socket's peer pid and uid, the owners of the
files, the binary the process runs, the files it has open, the addresses it
listens on) and QEMU's own answer to `query-block` where the kernel confirms it.
Whose VM it is and who the agent is: `agent/owner.py`; whether the process is the
host's QEMU: `agent/trusted_qemu.py`; where the proxy will listen: `agent/proxy_address.py`.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

from vm_image import proc

from ..agent.diskimage import inspect_image
from ..agent.nested_vm import find_nested_vm
from ..agent.owner import (
    HostBoundary,
    agent_file,
    check_groups,
    check_not_host_account,
    check_outside_host_dirs,
    check_process_ids,
    one_owner,
)
from ..agent.proxy_address import Forward, choose_proxy_address, confirmed_forwards
from ..agent.qemu_answers import disk_nodes, vm_size
from ..agent.ready_file import ReadyInfo, explicit_ready, read_ready_file
from ..agent.replay import replay_command
from ..agent.trusted_qemu import check_host_qemu
from ..errors import (
    DiskMismatch,
    InvalidInput,
    MonitorNotQMP,
    MonitorUnreachable,
    NotEnoughSpace,
    NotTheAgentsVM,
)
from ..host import serve_back
from ..host.monitor import Monitor, Peer
from ..host.ports import bind_refusal
from ..host.regular_file import read_regular
from ..models import Endpoint, SourceVM
from .context import Context

QEMU_EXE = re.compile(r"^qemu-system-[a-z0-9_]+$")


def find_and_check_vm(
    ready: ReadyInfo, host_dir: Path, boundary: HostBoundary | None = None, proxy_listen: Endpoint | None = None
) -> SourceVM:
    """Prove the monitor, the disk and the process are one unprivileged user's own VM, and that we can take it.

    `proxy_listen` is the operator's --proxy-listen; without it the proxy keeps the agent's address, checked.
    """
    boundary = boundary or HostBoundary.for_takeover(host_dir)
    disk, disk_st = _the_disk(ready)
    owner = whose_vm(ready, disk_st, boundary)  # from the files, before anything is sent to the monitor
    seen = _ask_the_monitor(ready, disk, disk_st, owner, boundary)
    info = seen.process
    proxy = choose_proxy_address(ready.proxy, seen.forwards, proxy_listen)
    image = inspect_image(disk, force_share=True, owner=info.uid)
    replay_command(list(info.cmdline), str(disk), ready.disk, owner=info.uid)  # refuses now, not at rollback
    check_free_space(host_dir, disk_st, seen.memory_mb)
    return SourceVM(
        monitor=str(ready.monitor),
        disk=str(disk),
        disk_dev=disk_st.st_dev,
        disk_ino=disk_st.st_ino,
        disk_uid=disk_st.st_uid,
        pid=seen.pid,
        pid_start_ticks=info.start_ticks,
        uid=info.uid,
        gid=info.gid,
        groups=list(info.groups),
        cwd=info.cwd,
        cmdline=list(info.cmdline),
        proxy=proxy,
        memory_mb=seen.memory_mb,
        cpus=seen.cpus,
        block_nodes=seen.nodes,
        vmstate_node=seen.vmstate_node,
        ready_file=str(ready.path) if ready.path else None,
        pidfile=str(ready.pidfile) if ready.pidfile else None,
        setup_key_pub=str(ready.setup_key_pub) if ready.setup_key_pub else None,
        notes=_notes(seen, proxy_listen, image.snapshots),
    )


@dataclass(frozen=True)
class _MonitorAnswers:
    """What the agent's QEMU said over its monitor, each answer checked against the kernel's view."""

    pid: int
    process: proc.ProcessInfo
    nodes: list[str]
    vmstate_node: str
    commands: set[str]
    status: str | None
    forwards: list[Forward]  # the forwards the kernel confirms its QEMU listens on
    memory_mb: int
    cpus: int


def _the_disk(ready: ReadyInfo) -> tuple[Path, os.stat_result]:
    """The disk the ready file names, with symlinks resolved; a regular file."""
    disk = Path(os.path.realpath(ready.disk))
    try:
        disk_st = os.stat(disk)
    except FileNotFoundError:
        raise DiskMismatch(f"disk {ready.disk} does not exist") from None
    if not stat.S_ISREG(disk_st.st_mode):
        raise DiskMismatch(f"disk {disk} is not a regular file")
    return disk, disk_st


def _ask_the_monitor(
    ready: ReadyInfo, disk: Path, disk_st: os.stat_result, owner: int, boundary: HostBoundary
) -> _MonitorAnswers:
    """The monitor's peer checked as the owner's QEMU, then asked which disk it has open, its state and size."""

    def check_peer(peer: Peer) -> None:
        check_the_process(ready, peer, proc.read_process(peer.pid), owner, boundary)

    with Monitor(ready.monitor, check_peer=check_peer) as mon:
        peer = mon.peer
        info = proc.read_process(peer.pid)
        check_the_process(ready, peer, info, owner, boundary)  # again: the greeting took time
        nodes, vmstate_node = disk_nodes(mon.execute("query-block"), disk)
        # QEMU's answer names a path; the kernel's view of the process's open files names inodes.
        # Both must agree, or the path was swapped between QEMU opening it and now.
        if (disk_st.st_dev, disk_st.st_ino) not in proc.open_files(peer.pid):
            raise DiskMismatch(f"QEMU pid {peer.pid} reports {disk} open, but does not hold that file open")
        commands = {c["name"] for c in mon.execute("query-commands")}
        status = mon.execute("query-status")
        usernet = mon.hmp("info usernet", timeout=30) if "human-monitor-command" in commands else ""
        forwards = confirmed_forwards(usernet, proc.listening_tcp(peer.pid))
        memory_mb, cpus = vm_size(mon)
    return _MonitorAnswers(
        peer.pid, info, nodes, vmstate_node, commands, status.get("status"), forwards, memory_mb, cpus
    )


def _notes(seen: _MonitorAnswers, proxy_listen: Endpoint | None, snapshots: tuple[str, ...]) -> list[str]:
    """What the report should mention about the agent's VM as it was found."""
    notes = []
    if "snapshot-save" not in seen.commands:
        notes.append("QEMU has no snapshot-save job; the checkpoint uses HMP savevm")
    if seen.status != "running":
        notes.append(f"the agent's VM was {seen.status!r}, not running")
    if proxy_listen is not None:
        notes.append(f"the proxy listens at {proxy_listen} (--proxy-listen), not where the agent's VM had it")
    if snapshots:
        notes.append(f"the agent's disk already had snapshots: {', '.join(snapshots)}")
    return notes


def whose_vm(ready: ReadyInfo, disk_st: os.stat_result, boundary: HostBoundary) -> int:
    """The one unprivileged owner of the ready file, socket, disk and pidfile, none in a host directory."""
    check_outside_host_dirs(
        [
            ("ready file", ready.path),
            ("monitor socket", ready.monitor),
            ("disk", ready.disk),
            ("pidfile", ready.pidfile),
            ("setup key", ready.setup_key_pub),
        ],
        boundary,
    )
    socket_st = agent_file(
        ready.monitor, "monitor socket", "socket", missing=MonitorUnreachable, wrong_kind=MonitorNotQMP
    )
    owners = [("monitor socket", socket_st.st_uid), ("disk", disk_st.st_uid)]
    if ready.path is not None and ready.owner is not None:
        owners.insert(0, ("ready file", ready.owner))
    if ready.pidfile is not None:
        owners.append(("pidfile", agent_file(ready.pidfile, "pidfile", "file").st_uid))
    owner = one_owner(owners)
    check_not_host_account(owner, boundary)
    check_groups(owner, (), boundary)
    return owner


def check_the_process(ready: ReadyInfo, peer: Peer, info: proc.ProcessInfo, owner: int, boundary: HostBoundary) -> None:
    """The socket's peer is the owner's, in no privileged group, runs the host's QEMU, and is the pid named."""
    if peer.uid != owner:
        raise NotTheAgentsVM(
            f"the monitor {str(ready.monitor)!r} is served by pid {peer.pid} of uid {peer.uid}, "
            f"but the VM's files are uid {owner}'s"
        )
    check_process_ids(info.uids, info.gids, owner, peer.pid)
    check_groups(owner, (*info.gids, *info.groups), boundary)
    if not QEMU_EXE.match(os.path.basename(info.exe)):
        raise DiskMismatch(f"the process behind {ready.monitor} (pid {peer.pid}, {info.exe!r}) is not QEMU")
    check_host_qemu(peer.pid)
    if ready.pid is not None and ready.pid != peer.pid:
        raise DiskMismatch(f"the ready file says QEMU is pid {ready.pid}, but the monitor belongs to pid {peer.pid}")
    if ready.pidfile is not None:
        check_pidfile(ready.pidfile, peer.pid)


def check_pidfile(path: Path, pid: int) -> None:
    """The pidfile (already checked to be the owner's regular file) names the monitor's pid."""
    try:
        raw, _ = read_regular(path, 64)
    except OSError as exc:
        raise NotTheAgentsVM(
            f"cannot open the pidfile {str(path)!r} as a regular file without following links: {exc.strerror or exc}"
        ) from None
    text = raw.decode("ascii", "replace").strip()
    if text != str(pid):
        raise NotTheAgentsVM(f"the pidfile {str(path)!r} names {text[:20]!r}, but the monitor belongs to pid {pid}")


def check_free_space(host_dir: Path, disk_st: os.stat_result, memory_mb: int) -> None:
    # The copy takes the disk's allocated blocks, plus the RAM state the checkpoint adds to it,
    # plus a margin for the scrub's writes and the journal.
    needed = disk_st.st_blocks * 512 + memory_mb * 2**20 + 256 * 2**20
    vfs = os.statvfs(host_dir)
    free = vfs.f_bavail * vfs.f_frsize
    if free < needed:
        raise NotEnoughSpace(
            f"{host_dir} has {free / 2**30:.2f} GiB free; the copy needs about {needed / 2**30:.2f} GiB"
        )


def step_find_vm(ctx: Context) -> SourceVM:
    cfg = ctx.cfg
    if cfg.agent_machine is not None:
        return find_vm_in_machine(ctx)
    if cfg.monitor or cfg.disk:
        if not (cfg.monitor and cfg.disk):
            raise InvalidInput("--monitor and --disk go together")
        ready = explicit_ready(cfg.monitor, cfg.disk)  # the proxy: where the agent's QEMU forwards it
    elif cfg.ready_file is not None:
        ready = read_ready_file(cfg.ready_file)
    else:
        raise_no_vm_named()
    # The VM must be one unprivileged user's, outside every host directory (agent/owner.py's docstring).
    boundary = HostBoundary.for_takeover(ctx.host_dir, cfg.qemu_user, extra_dirs=(cfg.cache_dir,))
    source = find_and_check_vm(ready, ctx.host_dir, boundary, proxy_listen=cfg.proxy_listen)
    if cfg.ssh_listen.port == source.proxy.port and cfg.ssh_listen.host == source.proxy.host:
        raise InvalidInput(f"--ssh-listen {cfg.ssh_listen} is the proxy's address")
    check_ssh_listen_free(cfg.ssh_listen)
    ctx.note(f"QEMU pid {source.pid} (uid {source.uid}) has {source.disk} open; proxy at {source.proxy}")
    for note in source.notes:
        ctx.note(f"note: {note}")
    return source


def find_vm_in_machine(ctx: Context) -> SourceVM:
    """Step 1 when the agent's VM is nested in an agent machine (agent/nested_vm.py says what is believed)."""
    cfg = ctx.cfg
    if cfg.monitor or cfg.disk:
        raise InvalidInput("--monitor and --disk name this host's files; with --agent-machine pass --ready-file")
    if cfg.ready_file is None:
        raise InvalidInput("--agent-machine needs --ready-file: the ready file's path inside that machine")
    conn = ctx.machine()
    machine_ip = conn.machine.address.ssh_host
    source = find_nested_vm(conn, str(cfg.ready_file), ctx.host_dir)
    assert source.machine_proxy is not None  # find_nested_vm always finds where the nested proxy was
    serve_on = cfg.serve_on or Endpoint(serve_back.route_source(machine_ip), source.machine_proxy.port)
    serve_back.check_serve_on(serve_on, machine_ip)
    check_ssh_listen_free(cfg.ssh_listen)
    source = replace(source, proxy=serve_on)
    ctx.note(
        f"in {source.machine}: QEMU pid {source.pid} (uid {source.uid}) has {source.disk} open, proxy at "
        f"{source.machine_proxy}; the host will serve it at {serve_on}"
    )
    for note in source.notes:
        ctx.note(f"note: {note}")
    return source


def raise_no_vm_named() -> NoReturn:
    """There is no default ready file: the host never guesses which user's VM to take."""
    raise InvalidInput("no --ready-file given; pass the agent's ready file (STATE/run/ready) or --monitor and --disk")


def check_ssh_listen_free(endpoint: Endpoint) -> None:
    """Step 1 refuses a taken --ssh-listen before anything changes (step 5 checks again, naming the holder)."""
    reason = bind_refusal(endpoint, reuse_addr=False)
    if reason is not None:
        raise InvalidInput(
            f"{endpoint} (the host's SSH forward) is in use: {reason}", hint="choose another --ssh-listen"
        )
