"""Step 3: bring the agent's disk into the host directory as a qcow2 root made, private from its first byte.

Root never parses what the agent wrote. The agent's disk and its backing files
(a cloud image's overlay sits on the user's base image) are read only by
`qemu-img` running as the agent, sandboxed (takeover/agent/sandbox.py): first
`qemu-img info` on each file of the chain (diskimage.inspect_agent_disk: qcow2
on top, qcow2 or raw below, at most two backing files, each readable by the
agent), then `qemu-img convert` of exactly that chain into raw bytes. Those
bytes travel over a socketpair to a small NBD server in this process
(takeover/agent/nbd_sink.py), which writes them into `HOST_DIR/.disk.raw.partial`,
created here O_EXCL, 0600, root:root, within a byte budget that leaves the
filesystem room. Root's own `qemu-img convert -f raw` then makes the qcow2:
every qcow2 structure in the host's copy is root's, and a raw source has none
to parse. The result is checked to be a self-contained qcow2, 0600, root's,
and only then linked into place as `disk.qcow2`.

The agent can ptrace its sandboxed qemu-img and send any bytes: that only
changes the disk's content, which was the agent's anyway and which the scrub
treats as hostile (by default it replaces the whole filesystem). The agent has
no descriptor for, and no path to, any file root writes here.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..agent.diskimage import QEMU_IMG, ImageInfo, check_virtual_size, inspect_agent_disk, inspect_image
from ..agent.machine_disk import discard_staging, fetch_disk
from ..agent.nbd_sink import SinkError, SinkResult, serve_writes
from ..agent.sandbox import AgentUser, SandboxError, run_as_agent
from ..errors import CopyError, DestinationTaken, DiskFormatError, NotEnoughSpace
from ..host.files import fsync_dir, fsync_file
from .context import DISK_NAME, Context

# The cut-over keeps the agent's disk beside the host's, for the record; the host never boots it.
AGENT_DISK_NAME = "agent-disk.qcow2"
PARTIAL_NAME = ".disk.qcow2.partial"
RAW_NAME = ".disk.raw.partial"
CHUNK = 1 << 20
SPACE_MARGIN = 256 * 2**20
FLATTEN_TIMEOUT = 3600.0
IDLE_TIMEOUT = 300.0
CONVERT_TIMEOUT = 3600.0


@dataclass(frozen=True)
class RelocateResult:
    path: str
    size: int
    sha256: str  # of the host's qcow2, as written
    allocated: int  # bytes on disk of the copy (st_blocks * 512)
    source_allocated: int  # the agent's disk and its backing files, as qemu-img (run as the agent) reports
    seconds: float
    virtual_size: int = 0
    backing_files: list[str] = field(default_factory=list)
    agent_uid: int = -1


def relocate_disk(
    source_disk: Path,
    host_dir: Path,
    *,
    expect_inode: tuple[int, int] | None = None,
    progress: Callable[[str], None] = lambda _: None,
    self_contained: bool = False,
    name: str = DISK_NAME,
) -> RelocateResult:
    """Flatten `source_disk` (and its backing files) into `host_dir/disk.qcow2`; see the module docstring.

    `self_contained`: refuse any backing file (a disk brought out of an agent machine, whose backing
    file names would be read on this host). `name`: the copy's name in `host_dir`.
    """
    started = time.monotonic()
    final, partial, raw = host_dir / name, host_dir / PARTIAL_NAME, host_dir / RAW_NAME
    if os.path.lexists(final):
        raise DestinationTaken(f"{final} already exists")
    for leftover in (partial, raw):  # from an interrupted run; never trusted, never resumed
        leftover.unlink(missing_ok=True)

    src_st = _agent_disk_stat(source_disk, expect_inode)
    agent = AgentUser.owner_of(src_st, f"the agent's disk {source_disk}")
    image = inspect_agent_disk(source_disk, agent)
    check_virtual_size(image.virtual_size, source_disk)
    if self_contained and image.backing:
        raise DiskFormatError(
            f"the disk from the agent machine has backing files ({', '.join(b.path for b in image.backing)}); "
            f"their names would be read on this host",
            hint="flatten it in the agent machine first (qemu-img convert -O qcow2) and launch the VM from that",
        )
    budget = _space_budget(host_dir, image)
    chain = ", ".join(b.path for b in image.backing) or "none"
    progress(
        f"flattening the agent's disk as uid {agent.uid} (backing files: {chain}; "
        f"{image.virtual_size / 2**30:.1f} GiB virtual)"
    )
    try:
        sink = _flatten(source_disk, image, agent, raw, budget)
        progress(f"{sink.allocated / 2**20:.0f} MiB of data; converting to the host's own qcow2")
        _convert_raw(raw, partial, image.virtual_size)
        raw.unlink(missing_ok=True)
        _check_private(partial)
        inspect_image(partial)  # root's own file now: a self-contained qcow2, or refused
        digest = _sha256_file(partial)
        # link() fails if the final name exists, where rename() would silently replace it.
        os.link(partial, final)
        os.unlink(partial)
        fsync_dir(host_dir)
    except BaseException:
        raw.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        raise
    copy_st = os.stat(final)
    return RelocateResult(
        str(final),
        copy_st.st_size,
        digest,
        copy_st.st_blocks * 512,
        image.chain_allocated,
        round(time.monotonic() - started, 3),
        image.virtual_size,
        [b.path for b in image.backing],
        agent.uid,
    )


def _agent_disk_stat(source_disk: Path, expect_inode: tuple[int, int] | None) -> os.stat_result:
    # lstat, not open: root does not even open a path the agent controls (it could be a device).
    try:
        st = os.lstat(source_disk)
    except OSError as exc:
        raise CopyError(f"cannot stat the agent's disk {source_disk}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CopyError(
            f"the agent's disk {source_disk} is now a symlink; the takeover does not read the agent's "
            f"disk without following links through its names",
            hint="pass the disk's real path",
        )
    if not stat.S_ISREG(st.st_mode):
        raise CopyError(f"{source_disk} is not a regular file")
    if expect_inode is not None and (st.st_dev, st.st_ino) != tuple(expect_inode):
        raise CopyError(
            f"{source_disk} is not the file QEMU had open in step 1; it was replaced",
            hint="rerun `python -m takeover rollback` and find out who replaced it",
        )
    return st


def _space_budget(host_dir: Path, image: ImageInfo) -> int:
    """Bytes the raw file may take: half of what is free (the qcow2 made from it needs as much again)."""
    vfs = os.statvfs(host_dir)
    free = vfs.f_bavail * vfs.f_frsize
    data = min(image.chain_allocated, image.virtual_size)
    needed = 2 * data + SPACE_MARGIN
    if free < needed:
        raise NotEnoughSpace(
            f"{host_dir} has {free / 2**30:.2f} GiB free; flattening the agent's disk needs "
            f"about {needed / 2**30:.2f} GiB"
        )
    return min(image.virtual_size, (free - SPACE_MARGIN) // 2)


def _flatten(source_disk: Path, image: ImageInfo, agent: AgentUser, raw: Path, budget: int) -> SinkResult:
    """The agent's `qemu-img convert` (sandboxed) writes raw bytes over NBD into `raw` (root's file)."""
    fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    outcome: dict[str, SinkResult] = {}  # what the server thread got
    failed: list[SinkError] = []
    try:
        os.fchmod(fd, 0o600)
        os.fchown(fd, 0, 0)
        os.ftruncate(fd, image.virtual_size)
        target = f"driver=raw,file.driver=nbd,file.server.type=fd,file.server.str={theirs.fileno()}"
        argv = [
            QEMU_IMG,
            "convert",
            "-n",
            "--target-is-zero",
            "--target-image-opts",
            image.chain_spec(source_disk),
            target,
        ]

        def serve(_child: subprocess.Popen[bytes]) -> None:
            theirs.close()  # the sandbox holds its end; ours sees EOF when it exits
            try:
                outcome["sink"] = serve_writes(
                    ours,
                    fd,
                    image.virtual_size,
                    budget=budget,
                    idle_timeout=IDLE_TIMEOUT,
                    deadline=time.monotonic() + FLATTEN_TIMEOUT,
                )
            except SinkError as exc:
                failed.append(exc)
            finally:
                ours.close()  # a qemu-img still writing gets EPIPE and exits

        result = run_as_agent(argv, agent, timeout=FLATTEN_TIMEOUT, pass_fds=(theirs.fileno(),), while_running=serve)
        error = failed[0] if failed else None
        if error is not None and error.over_budget:
            raise NotEnoughSpace(
                f"the agent's disk did not fit in {budget / 2**20:.0f} MiB of the host "
                f"directory ({error}); the partial copy was removed"
            )
        if result.returncode != 0:
            raise CopyError(
                f"qemu-img convert, run as the agent, failed: {result.error_text()}"
                + (f" (the host's side: {error})" if error else ""),
                hint="make sure the agent's VM has stopped (nothing else may hold its disk), "
                "then rerun `python -m takeover run`",
            )
        if error is not None or "sink" not in outcome:
            raise CopyError(f"the agent's qemu-img ended without a clean NBD session: {error}")
        os.fsync(fd)
        return outcome["sink"]
    except SandboxError as exc:
        raise CopyError(str(exc), hint=exc.hint) from None
    finally:
        theirs.close()
        ours.close()
        os.close(fd)


def _convert_raw(raw: Path, partial: Path, virtual_size: int) -> None:
    """Root's qemu-img makes the qcow2 from raw bytes (format forced: nothing in them is parsed)."""
    if os.stat(raw).st_size != virtual_size:
        raise CopyError(f"{raw} changed size while it was written")
    proc = subprocess.run(
        [QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", "--", str(raw), str(partial)],
        capture_output=True,
        text=True,
        timeout=CONVERT_TIMEOUT,
        umask=0o077,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        if "No space left" in proc.stderr:
            raise NotEnoughSpace(f"the host directory filled up while making the qcow2: {proc.stderr.strip()[-300:]}")
        raise CopyError(f"qemu-img could not make the host's qcow2: {proc.stderr.strip()[-300:]}")
    fsync_file(partial)


def _check_private(path: Path) -> None:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o600:
        raise CopyError(
            f"{path} is not a regular 0600 file of root's (mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid}); refused"
        )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def step_relocate(ctx: Context) -> RelocateResult:
    source = ctx.source
    # In the cut-over the host's disk is built already, and this copy is the agent's, kept for the record.
    name = AGENT_DISK_NAME if ctx.cut_over else DISK_NAME
    # A copy from an attempt whose scrub did not finish is not trusted: start from the source again.
    for leftover in (name, PARTIAL_NAME):
        path = ctx.host_dir / leftover
        if path.exists():
            ctx.note(f"discarding {path} from an unfinished earlier attempt")
            path.unlink()
    if source.machine is not None:
        result = _relocate_from_machine(ctx)
    else:
        result = relocate_disk(
            Path(source.disk),
            ctx.host_dir,
            expect_inode=(source.disk_dev, source.disk_ino),
            progress=ctx.note,
            name=name,
        )
    ctx.note(
        f"{result.size / 2**20:.0f} MiB, sha256 {result.sha256[:16]}..., {result.allocated / 2**20:.0f} MiB "
        f"allocated (source {result.source_allocated / 2**20:.0f} MiB)"
    )
    return result


def _relocate_from_machine(ctx: Context) -> RelocateResult:
    """The nested disk copied out as bytes (agent/machine_disk.py), then flattened by the local path's rules."""
    staged = fetch_disk(ctx.machine(), ctx.source, ctx.host_dir, ctx.cfg.copy_user, ctx.note)
    try:
        st = os.lstat(staged)
        return relocate_disk(
            staged, ctx.host_dir, expect_inode=(st.st_dev, st.st_ino), progress=ctx.note, self_contained=True
        )
    finally:
        discard_staging(ctx.host_dir)
