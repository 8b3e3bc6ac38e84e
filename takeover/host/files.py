"""Files the host owns: created private from their first byte, written atomically.

Nothing here ever follows a symlink at the last component (O_NOFOLLOW) or
widens a mode after creation, because the agent shares this machine and may
have prepared paths in advance. The operator's own files (`--proxy-config`,
`--token-file`) are reached by walking the path one directory at a time from
`/` without following any link, each directory root's and closed to others, so
nothing the agent can write stands anywhere on the way.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path

# The atomic write and the syncs are vm_image's (durable.py), one implementation for both packages;
# named here too, because the takeover takes every file primitive from this module.
from vm_image.durable import fsync_dir as fsync_dir
from vm_image.durable import fsync_file as fsync_file
from vm_image.durable import write_all as write_all
from vm_image.durable import write_atomic as write_atomic

from ..errors import InvalidInput

# Paths that reach a QEMU or ssh command line. QEMU option values treat ',' specially and
# ssh options treat spaces and '%' specially, so the host's own paths are kept to this set.
SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*$")


def check_safe_path(path: Path | str, what: str) -> Path:
    text = str(path)
    if not SAFE_PATH.match(text) or "/../" in text + "/" or text.endswith("/.."):
        raise InvalidInput(f"{what} {text!r} must be an absolute path of letters, digits and ._/+- only")
    return Path(text)


def create_private(path: Path) -> int:
    """Open a new file for writing, 0600 from its first byte; fails if anything is at `path`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # the umask can only narrow the mode; make it exact
    return fd


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON so a reader sees the old or the new file, never half of one; 0600 from the start."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def ensure_host_dir(path: Path) -> Path:
    """Create or check the host directory: a real directory, owned by us, 0700, under trusted parents.

    An agent on the same machine could have created the directory (or a parent it can
    write) beforehand to keep a way in, so an existing one must be ours and closed.
    """
    path = check_safe_path(path, "host directory")
    _refuse_parents_others_could_swap(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    reason = prepared_by_others(path)
    if reason is not None:
        raise InvalidInput(
            f"host directory {path} {reason}; someone else may have prepared it, and what is in it cannot be trusted",
            hint="remove it or choose another --host-dir",
        )
    os.chmod(path, 0o700, follow_symlinks=False)
    return path


def prepared_by_others(path: Path) -> str | None:
    """Why the directory at `path` may be of someone else's making, or None when it is a real directory of
    ours that nobody else can write.

    For a directory we create and then fill (the host directory, tinyproxy's config): a user who made it
    first, as a symlink to theirs, a file, or a directory they own or may write, would keep a way in.
    """
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return "exists and is not a directory (a symlink or a file)"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by us"
    if st.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def open_trusted_dir(path: Path, what: str) -> int:
    """A descriptor of directory `path`, reached from / without following any symlink.

    Every directory on the way must be root's and writable by no one else (a sticky
    directory such as /tmp is accepted: others cannot rename or remove root's entries
    in it). The walk holds each directory open while it opens the next, so no one can
    swap a component between the check and the use.
    """
    absolute = Path(os.path.abspath(path))  # lexical; with no symlinks allowed, the kernel agrees
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = Path("/")
    try:
        _refuse_unless_only_root_can_change(fd, walked, what)
        for name in absolute.parts[1:]:
            walked = walked / name
            try:
                nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                kind = (
                    "is a symlink or not a directory"
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR)
                    else f"cannot be opened ({exc.strerror})"
                )
                raise InvalidInput(
                    f"{what}: {walked} {kind}; the path must be real directories, no links",
                    hint=f"give {what} a path of plain root-owned directories",
                ) from None
            os.close(fd)
            fd = nxt
            _refuse_unless_only_root_can_change(fd, walked, what)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _refuse_unless_only_root_can_change(fd: int, path: Path, what: str) -> None:
    # For the operator's secret files: root's directory, writable by no one else (a sticky one such as
    # /tmp is accepted: others cannot rename or remove root's entries in it).
    st = os.fstat(fd)
    writable_by_others = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
    if st.st_uid != 0 or writable_by_others:
        raise InvalidInput(
            f"{what}: the directory {path} is owned by uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}; someone other than root can change what is in it",
            hint=f"put {what} in a directory that only root can write (e.g. /root)",
        )


def read_root_only_file(path: Path, what: str, limit: int, *, secret: bool = True) -> bytes:
    """Read an operator's secret file: one open without following links, checked on that descriptor.

    It must be a regular file owned by root, mode 0600 or narrower, in directories only
    root can change (see `open_trusted_dir`); the bytes come from the descriptor checked.
    A file that is not secret but must not change under root (a pinned host key) may be
    readable by others (`secret=False`), never writable by them.
    """
    absolute = Path(os.path.abspath(path))
    dir_fd = open_trusted_dir(absolute.parent, what)
    try:
        try:
            fd = os.open(absolute.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            kind = "a symlink" if exc.errno == errno.ELOOP else exc.strerror
            raise InvalidInput(f"{what} {path}: cannot open it without following links ({kind})") from None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{what} {path} is not a regular file")
        if st.st_uid != 0:
            raise InvalidInput(
                f"{what} {path} is owned by uid {st.st_uid}, not root",
                hint=f"chown root:root {path} (and check who wrote it)",
            )
        if st.st_mode & (0o077 if secret else 0o022):
            raise InvalidInput(
                f"{what} {path} is readable by others or writable by them (mode "
                f"{stat.S_IMODE(st.st_mode):o}), and it holds a secret"
                if secret
                else f"{what} {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})",
                hint=f"chmod {600 if secret else 644} {path}",
            )
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InvalidInput(f"{what} {path} is larger than {limit} bytes")
    return data


def check_trusted_parent(path: Path, what: str) -> None:
    """Refuse early a file path whose directories are not all root's (see `open_trusted_dir`)."""
    os.close(open_trusted_dir(Path(os.path.abspath(path)).parent, what))


def create_private_under_trusted_dirs(path: Path, what: str) -> int:
    """Create a new 0600 file at `path`, every directory above it root's and no link on the way."""
    absolute = Path(os.path.abspath(path))
    dir_fd = open_trusted_dir(absolute.parent, what)
    try:
        fd = os.open(
            absolute.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
        )
    except FileExistsError:
        raise InvalidInput(
            f"{what} {path} already exists (a file or a link); it is never overwritten",
            hint="remove it or name a new file",
        ) from None
    finally:
        os.close(dir_fd)
    os.fchmod(fd, 0o600)
    return fd


def _refuse_parents_others_could_swap(path: Path) -> None:
    # For the host directory's parents, wider than `_refuse_unless_only_root_can_change`: a parent may be
    # ours as well as root's, and group-writable by root's group, because the host directory itself
    # is then checked to be ours and closed; what is refused is a parent where someone else could
    # rename the host directory away and put theirs in its place.
    for parent in [path, *path.parents]:
        st = os.stat(parent)
        writable_by_others = st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0)
        sticky = st.st_mode & stat.S_ISVTX
        if st.st_uid not in (0, os.geteuid()) or (writable_by_others and not sticky):
            raise InvalidInput(
                f"{parent}, a parent of the host directory, can be changed by others "
                f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); choose another --host-dir"
            )


def only_root_can_change(path: Path) -> bool:
    """The file and every directory above it are root-owned and writable by no one else.

    For the host's QEMU binary, whose answers root believes: stricter than `open_trusted_dir`, no
    sticky directory is accepted on the way (anyone may create a name in one), and the path given is
    the binary's real one, symlinks already resolved.
    """
    for part in (path, *path.parents):
        try:
            st = os.stat(part)
        except OSError:
            return False
        if not only_root_can_write(st):
            return False
    return True


def only_root_can_write(st: os.stat_result) -> bool:
    """Root's, and writable by no one else: what root may run or believe (no sticky-directory exception)."""
    return st.st_uid == 0 and not st.st_mode & 0o022
