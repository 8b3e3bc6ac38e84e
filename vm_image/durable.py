"""Writes that survive a crash and are never seen half done: one atomic write, and the syncs it needs.

A reader of the file sees the old content or the new, never part of one, and after a crash
the file is one of the two as well: the new content goes to a fresh file beside it (O_EXCL,
O_NOFOLLOW, so nothing prepared at that name is written through), which is synced, renamed
over the old one, and then the directory is synced, so the rename itself is on disk. The
file has its mode from its first byte (0600 by default, what a key needs): it is never
readable by others, not even for the moment between creating and chmod.

Shared by vm_image (manifest, ready file, KVM probe cache) and the takeover (takeover/host/files.py).
The proxy may import nothing of ours and keeps its own `fsync_dir` (proxy/key_files.py), pinned
equal to this one by tests/test_vm_image_durable.py.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(
    path: Path | str, data: bytes, *, mode: int = 0o600, gid: int | None = None, dir_fd: int | None = None
) -> None:
    """Replace `path` with `data`, atomically and durably; the new file `mode` (exactly: the umask does
    not apply) and, with `gid`, that group, both before a byte is written.

    With `dir_fd`, `path` is a name in that directory (one the caller has opened and checked), and
    the directory is not looked up again by path.
    """
    path = Path(path)
    temp = f".{path.name}.{secrets.token_hex(6)}.tmp"
    parent = dir_fd if dir_fd is not None else os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            try:
                if gid is not None:
                    os.fchown(fd, -1, gid)  # before the mode: a chown may clear set-id bits
                os.fchmod(fd, mode)  # exact: os.open's mode went through the umask, fchmod's does not
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path.name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=parent)
            except OSError:
                pass
            raise
        os.fsync(parent)
    finally:
        if dir_fd is None:
            os.close(parent)


def write_all(fd: int, data: bytes) -> None:
    """All of `data`: os.write may write less than it is given."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
