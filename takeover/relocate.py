"""Step 3: copy the agent's disk into the host directory, private from its first byte.

The copy is created 0600 (O_CREAT|O_EXCL, so nothing prepared at that name is
reused), written under a temporary name, kept sparse, fsynced, compared with
the source (size and sha256), checked to be a self-contained qcow2, and only
then linked into place. The source is opened once, without following links,
and must be the very inode QEMU had open in step 1.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .diskimage import inspect_image
from .errors import CopyError, DestinationTaken, DiskFormatError, NotEnoughSpace
from .files import create_private, fsync_dir

DISK_NAME = "disk.qcow2"
PARTIAL_NAME = ".disk.qcow2.partial"
CHUNK = 1 << 20
ZERO_CHUNK = bytes(CHUNK)
SPACE_MARGIN = 256 * 2**20


@dataclass(frozen=True)
class RelocateResult:
    path: str
    size: int
    sha256: str
    allocated: int  # bytes on disk of the copy (st_blocks * 512)
    source_allocated: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def relocate_disk(source_disk: Path, host_dir: Path, *, expect_inode: tuple[int, int] | None = None,
                  progress: Callable[[str], None] = lambda _: None) -> RelocateResult:
    """Copy `source_disk` to `host_dir/disk.qcow2`; see the module docstring for the guarantees."""
    started = time.monotonic()
    final = host_dir / DISK_NAME
    partial = host_dir / PARTIAL_NAME
    if os.path.lexists(final):
        raise DestinationTaken(f"{final} already exists")
    try:
        os.unlink(partial)  # a copy an interrupted run left behind; never trusted, never resumed
    except FileNotFoundError:
        pass

    try:
        src = os.open(source_disk, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CopyError(f"cannot open the agent's disk {source_disk} without following links: {exc.strerror}") from None
    try:
        src_st = os.fstat(src)
        if not stat.S_ISREG(src_st.st_mode):
            raise CopyError(f"{source_disk} is not a regular file")
        if expect_inode is not None and (src_st.st_dev, src_st.st_ino) != tuple(expect_inode):
            raise CopyError(f"{source_disk} is not the file QEMU had open in step 1; it was replaced",
                            hint="rerun `python -m takeover rollback` and find out who replaced it")
        _check_space(host_dir, src_st)
        dst = create_private(partial)
        try:
            if os.geteuid() == 0:
                os.fchown(dst, 0, 0)
            copied_hash = _copy_sparse(src, dst, src_st.st_size, progress)
            os.fsync(dst)
        finally:
            os.close(dst)
        progress("verifying the copy against the source")
        copy_hash = _sha256_file(partial)
        source_hash = _sha256_fd(src)
    except BaseException:
        _remove(partial)
        raise
    finally:
        os.close(src)

    size = os.stat(partial).st_size
    if size != src_st.st_size or copy_hash != copied_hash:
        _remove(partial)
        raise CopyError(f"the copy of {source_disk} does not match what was read "
                        f"(size {size} vs {src_st.st_size}); the host filesystem may be failing")
    if source_hash != copied_hash:
        _remove(partial)
        raise CopyError(f"{source_disk} changed while it was being copied; something still writes it")
    try:
        inspect_image(partial)  # authoritative: the copy is what the host will boot
    except DiskFormatError:
        _remove(partial)
        raise
    # link() fails if the final name exists, where rename() would silently replace it.
    os.link(partial, final)
    os.unlink(partial)
    fsync_dir(host_dir)
    copy_st = os.stat(final)
    return RelocateResult(str(final), size, copy_hash, copy_st.st_blocks * 512, src_st.st_blocks * 512,
                          round(time.monotonic() - started, 3))


def _check_space(host_dir: Path, src_st: os.stat_result) -> None:
    needed = src_st.st_blocks * 512 + SPACE_MARGIN
    vfs = os.statvfs(host_dir)
    free = vfs.f_bavail * vfs.f_frsize
    if free < needed:
        raise NotEnoughSpace(f"{host_dir} has {free / 2**30:.2f} GiB free; copying the disk needs "
                             f"{needed / 2**30:.2f} GiB")


def _copy_sparse(src: int, dst: int, size: int, progress: Callable[[str], None]) -> str:
    """Copy the data extents of `src`, leaving holes (and all-zero chunks) unwritten; hash every byte.

    Returns the sha256 of the logical content read, zeros of the holes included.
    """
    digest = hashlib.sha256()
    offset = 0
    last_report = time.monotonic()
    while offset < size:
        data_start = _seek(src, offset, os.SEEK_DATA, size)
        _hash_zeros(digest, data_start - offset)
        if data_start >= size:
            break
        data_end = min(_seek(src, data_start, os.SEEK_HOLE, size), size)
        pos = data_start
        while pos < data_end:
            chunk = os.pread(src, min(CHUNK, data_end - pos), pos)
            if not chunk:
                raise CopyError("the agent's disk shrank while it was being copied")
            digest.update(chunk)
            if chunk.count(0) != len(chunk):  # an all-zero chunk stays a hole in the copy
                _pwrite_all(dst, chunk, pos)
            pos += len(chunk)
            if time.monotonic() - last_report > 5:
                progress(f"copied {pos / 2**20:.0f} of {size / 2**20:.0f} MiB")
                last_report = time.monotonic()
        offset = data_end
    os.ftruncate(dst, size)  # keeps a trailing hole, and the exact size
    return digest.hexdigest()


def _seek(fd: int, offset: int, whence: int, size: int) -> int:
    try:
        return os.lseek(fd, offset, whence)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no more data after offset
            return size
        raise


def _hash_zeros(digest: Any, count: int) -> None:
    while count > 0:
        n = min(count, CHUNK)
        digest.update(ZERO_CHUNK[:n])
        count -= n


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _sha256_file(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _sha256_fd(fd)
    finally:
        os.close(fd)


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, CHUNK, offset)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        offset += len(chunk)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
