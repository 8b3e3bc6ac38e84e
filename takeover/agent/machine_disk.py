"""Bring a nested VM's disk out of the agent machine as bytes, into a file no root tool will parse.

The disk arrives over the SSH connection (a `head -c` in the machine, bounded by what this host
can hold), written by root into a file that belongs, from its creation, to an unprivileged system
user of this host (`--copy-user`, created if missing) in a directory of that user's. From there
step 3 is the local path's, unchanged (steps/relocate.py): that user's sandboxed `qemu-img` reads
the qcow2 and sends raw bytes to root, who makes its own qcow2. A disk from a machine must be
self-contained: a backing file would name a path on *this* host.

The host directory becomes 0711 for this (as for the libvirt runner): the copy user may traverse
it to its own directory, and list or read nothing else (every other file in it is root's, 0600).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import CopyError, NotEnoughSpace
from ..host.users import ensure_system_user
from ..models import SourceVM
from .machine import AgentMachineFlood, Connection

STAGING_NAME = "from-machine"
STAGED_DISK = "disk.qcow2"
SPACE_MARGIN = 256 * 2**20
MAX_DISK_BYTES = 2**40
COPY_TIMEOUT = 3600.0


def staging_dir(host_dir: Path) -> Path:
    return host_dir / STAGING_NAME


def fetch_disk(
    conn: Connection,
    source: SourceVM,
    host_dir: Path,
    copy_user: str,
    progress: Callable[[str], None] = lambda _: None,
) -> Path:
    """The nested disk's bytes in `HOST_DIR/from-machine/disk.qcow2`, a file of `copy_user`'s; its path."""
    ensure_system_user(copy_user, "secret-proxy-vm reader of agent machine disks", host_dir=host_dir)
    user = pwd.getpwnam(copy_user)
    if user.pw_uid == 0 or user.pw_gid == 0:
        raise CopyError(f"--copy-user {copy_user} is root's uid or group; it must be an unprivileged user")
    _check_reachable(host_dir, copy_user)
    staging = staging_dir(host_dir)
    discard_staging(host_dir)  # a leftover is the copy user's and never trusted
    os.mkdir(staging, 0o700)
    os.chown(staging, user.pw_uid, user.pw_gid, follow_symlinks=False)
    os.chmod(host_dir, 0o711)
    budget = _budget(host_dir)
    progress(f"copying {source.disk} out of {source.machine} (at most {budget / 2**30:.1f} GiB)")
    dir_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(
            STAGED_DISK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
        )
    finally:
        os.close(dir_fd)
    started, written = time.monotonic(), [0]

    def sink(chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
        before, written[0] = written[0], written[0] + len(chunk)
        if written[0] // 2**30 != before // 2**30:
            progress(f"{written[0] / 2**30:.0f} GiB copied")

    try:
        os.fchown(fd, user.pw_uid, user.pw_gid)
        try:
            size = conn.copy_file(source.disk, sink, budget, timeout=COPY_TIMEOUT)
        except AgentMachineFlood:
            raise NotEnoughSpace(
                f"the agent machine's disk {source.disk} is larger than the {budget / 2**20:.0f} MiB this host "
                f"directory can take for it; nothing was kept"
            ) from None
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        discard_staging(host_dir)
        raise
    os.close(fd)
    seconds = time.monotonic() - started
    progress(f"{size / 2**20:.0f} MiB in {seconds:.0f} s; reading it as {copy_user}, never as root")
    return staging / STAGED_DISK


def discard_staging(host_dir: Path) -> None:
    staging = staging_dir(host_dir)
    try:
        st = os.lstat(staging)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(staging)  # fd-based on Linux: a link planted inside is removed, never followed
    else:
        staging.unlink()


def _check_reachable(host_dir: Path, copy_user: str) -> None:
    """Every directory above the host directory must let others pass (not list), or the copy user cannot."""
    for parent in Path(os.path.abspath(host_dir)).parents:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            raise CopyError(
                f"{copy_user} cannot reach {host_dir}: {parent} is closed to other users (mode "
                f"{stat.S_IMODE(os.stat(parent).st_mode):o}), and a disk from an agent machine is read as {copy_user}",
                hint="put --host-dir under directories others may traverse, like the default /var/lib/secret-proxy-vm",
            )


def _budget(host_dir: Path) -> int:
    """Bytes the disk may take: a third of what is free (the raw image and root's qcow2 follow it)."""
    vfs = os.statvfs(host_dir)
    free = vfs.f_bavail * vfs.f_frsize - SPACE_MARGIN
    if free < 3 * 2**20:
        raise NotEnoughSpace(f"{host_dir} has no room for a disk from the agent machine")
    return min(MAX_DISK_BYTES, free // 3)
