"""The proxy's data directory, carried from the old disk to the new one in one libguestfs session (`takeover upgrade`).

The old disk was once the agent's, and whatever ran in the old VM since (the proxy's user, or
anything that became root there) may have left in the data directory what it liked: links to
other files, devices, FIFOs, hard links to root's files, a file of many gigabytes, a million
names. So its content is data and nothing more:

* the old filesystem is mounted read-only in the appliance (libguestfs's own kernel parses it,
  never the host's), the new one beside it; nothing of the old is ever executed;
* only regular files with one link and directories are copied, each by a name checked on its
  own (`check_name`: no `/`, no `.` or `..`, no control character), walked from the data directory
  down without following a link; anything else is skipped and named in the result;
* the count of entries, their total size and the depth are bounded before the first byte is
  written (`CarryLimits`); a store too large is refused whole, never half copied;
* every file is 0600 and every directory 0700, owned by the `proxy` user of the NEW image (its
  /etc/passwd is the host's own build): no mode, owner or xattr of the old disk survives.
"""

from __future__ import annotations

import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import guestfs

from vm_image.guest_files import DATA_DIR, PROXY_USER

from ..errors import CarryError
from ..host.files import fsync_file
from .appliance import LAUNCH_TIMEOUT, SESSION_TIMEOUT, ApplianceLog, Watchdog

OLD, NEW = "/old", "/new"  # where the two filesystems are mounted in the appliance
# The appliance's names for the two disks, in the order they are added.
_OLD_DEVICE, _NEW_DEVICE = "/dev/sda", "/dev/sdb"
FILE_MODE, DIR_MODE = 0o600, 0o700
# What the proxy names its files (proxy.db, proxy.db-wal, master.key, config.toml, commit.mark): a
# name outside this set is not one of its own, and it is never a path we build.
NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True)
class CarryLimits:
    """How much of the old data directory is carried at most; beyond any bound the carry is refused."""

    entries: int = 10_000  # files, directories and skipped names together
    total_bytes: int = 16 << 30  # the regular files' sizes added up
    depth: int = 8  # directories below the data directory


@dataclass(frozen=True)
class Found:
    """What `survey` found under the old data directory: relative names, parents before children."""

    directories: list[str] = field(default_factory=list)
    files: list[tuple[str, int]] = field(default_factory=list)  # (name, size)
    skipped: list[str] = field(default_factory=list)  # "name: why", as printable text

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


@dataclass(frozen=True)
class CarryResult:
    """What was carried (counts, bytes), what was not and why, whose it is now, and how long it took."""

    files: int
    directories: int
    bytes: int
    skipped: list[str]
    owner: str  # "uid:gid" of the new image's proxy user
    seconds: float


def check_name(name: str) -> str | None:
    """Why `name` (one directory entry of the old disk) is not carried, or None to carry it."""
    if name in (".", ".."):
        return "names its own or the parent directory"
    if not NAME.match(name):
        return "is not a name the proxy writes (letters, digits, . _ - only, at most 128)"
    return None


def carry_data(
    old_disk: Path,
    new_disk: Path,
    *,
    force_tcg: bool = True,
    limits: CarryLimits = CarryLimits(),
    progress: Callable[[str], None] = lambda _: None,
) -> CarryResult:
    """Replace the new disk's (empty) data directory with the old disk's, by the rules above."""
    started = time.monotonic()
    progress("starting libguestfs with both disks, the old one read-only")
    session = Session.open(old_disk, new_disk, force_tcg=force_tcg)
    try:
        found = survey(session.g, limits)
        uid, gid = proxy_ids(session.g)
        check_room(session.g, found.total_bytes)
        progress(
            f"carrying {len(found.files)} files ({found.total_bytes / 2**20:.1f} MiB) and "
            f"{len(found.directories)} directories; skipped: {len(found.skipped)}"
        )
        copy(session.g, found, uid, gid)
    except RuntimeError as exc:  # libguestfs reports failures as RuntimeError
        session.discard()
        raise CarryError(f"libguestfs failed while carrying the data directory: {exc}") from None
    except BaseException:
        session.discard()
        raise
    session.close()
    fsync_file(new_disk)  # the swap comes next: the carried store must be on disk first
    return CarryResult(
        len(found.files),
        len(found.directories),
        found.total_bytes,
        found.skipped,
        f"{uid}:{gid}",
        round(time.monotonic() - started, 3),
    )


def survey(g: Any, limits: CarryLimits) -> Found:
    """Every entry under the old data directory, checked and bounded; nothing is written yet."""
    top = OLD + DATA_DIR
    _check_real_directories(g, top)
    found = Found()
    seen = 0
    pending: list[tuple[str, int]] = [("", 0)]  # (relative directory, depth)
    while pending:
        rel, depth = pending.pop(0)
        directory = f"{top}/{rel}" if rel else top
        names = sorted(g.ls(directory))
        seen += len(names)
        if seen > limits.entries:
            raise CarryError(f"the old data directory holds more than {limits.entries} entries")
        for start in range(0, len(names), 500):
            batch = names[start : start + 500]
            for name, st in zip(batch, g.lstatnslist(directory, batch), strict=True):
                path = f"{rel}/{name}" if rel else name
                why = check_name(name) or _why_not_carried(st)
                if why is not None:
                    found.skipped.append(f"{_printable(path)}: {why}")
                elif stat.S_ISDIR(st["st_mode"]):
                    if depth + 1 > limits.depth:
                        raise CarryError(f"the old data directory nests deeper than {limits.depth} directories")
                    found.directories.append(path)
                    pending.append((path, depth + 1))
                else:
                    found.files.append((path, int(st["st_size"])))
        if found.total_bytes > limits.total_bytes:
            raise CarryError(
                f"the old data directory's files add up to more than {limits.total_bytes} bytes "
                f"({found.total_bytes} so far)"
            )
    return found


def proxy_ids(g: Any) -> tuple[int, int]:
    """The `proxy` user's uid and gid in the NEW image: its /etc/passwd is the host's own build."""
    for line in g.read_file(f"{NEW}/etc/passwd").decode("utf-8", "replace").splitlines():
        fields = line.split(":")
        if len(fields) == 7 and fields[0] == PROXY_USER and fields[2].isdigit() and fields[3].isdigit():
            uid, gid = int(fields[2]), int(fields[3])
            if uid == 0 or gid == 0:
                raise CarryError("the new image's proxy user has uid or gid 0; refusing to give it the store")
            return uid, gid
    raise CarryError(f"the new image has no {PROXY_USER} user in /etc/passwd; it is not a build of ours")


def check_room(g: Any, needed: int) -> None:
    vfs = g.statvfs(NEW)
    free = int(vfs["bavail"]) * int(vfs["bsize"])
    if free < needed + (64 << 20):  # and some room for the proxy to write after its start
        raise CarryError(f"the new disk has {free} bytes free, not enough for the {needed} bytes of the store")


def copy(g: Any, found: Found, uid: int, gid: int) -> None:
    """The new data directory, emptied and filled with `found`, every mode and owner the host's."""
    top = NEW + DATA_DIR
    _check_real_directories(g, str(Path(top).parent))
    g.rm_rf(top)
    g.mkdir(top)
    _own(g, top, DIR_MODE, uid, gid)
    for rel in found.directories:  # parents come before their children
        g.mkdir(f"{top}/{rel}")
        _own(g, f"{top}/{rel}", DIR_MODE, uid, gid)
    for rel, _ in found.files:
        # cp inside the appliance: the bytes never pass through the host. The source was lstat'ed as a
        # regular file on a read-only mount, so nothing can have turned it into a link since.
        g.cp(f"{OLD}{DATA_DIR}/{rel}", f"{top}/{rel}")
        _own(g, f"{top}/{rel}", FILE_MODE, uid, gid)


def _own(g: Any, path: str, mode: int, uid: int, gid: int) -> None:
    g.lchown(uid, gid, path)
    g.chmod(mode, path)


def _why_not_carried(st: dict[str, int]) -> str | None:
    mode = st["st_mode"]
    if stat.S_ISDIR(mode):
        return None
    if stat.S_ISREG(mode):
        return "a hard link (more than one name for the file)" if st["st_nlink"] > 1 else None
    kinds = {stat.S_IFLNK: "a symlink", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
    return kinds.get(stat.S_IFMT(mode), "a device or another special file")


def _check_real_directories(g: Any, path: str) -> None:
    """Every component of `path` below the mount point is a directory, not a link: nothing is followed."""
    mount, *parts = path.strip("/").split("/")
    current = "/" + mount
    for part in parts:
        current += "/" + part
        try:
            mode = g.lstatns(current)["st_mode"]
        except RuntimeError:
            raise CarryError(f"{current.removeprefix(OLD).removeprefix(NEW)} is missing on the disk") from None
        if not stat.S_ISDIR(mode):
            raise CarryError(f"{current} in the appliance is not a directory (a link, or a file); nothing was carried")


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


@dataclass
class Session:
    """One appliance with the old disk read-only at /old and the new one at /new, under the watchdog."""

    g: Any
    watchdog: Watchdog
    log: ApplianceLog

    @classmethod
    def open(cls, old_disk: Path, new_disk: Path, *, force_tcg: bool = True) -> Session:
        g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
        log = ApplianceLog(g)
        g.set_backend("direct")
        if force_tcg:
            g.set_backend_settings(["force_tcg"])
        g.set_network(False)
        # readonly: libguestfs puts a throwaway overlay over the old disk, so not one byte of it changes.
        g.add_drive_opts(str(old_disk), format="qcow2", readonly=True)
        g.add_drive_opts(str(new_disk), format="qcow2", readonly=False, cachemode="unsafe")
        watchdog = Watchdog()
        watchdog.arm_launch(LAUNCH_TIMEOUT)
        try:
            g.launch()
        except RuntimeError as exc:
            watchdog.disarm()
            g.close()
            raise CarryError(f"libguestfs could not start: {exc}\nlast lines of its log:\n{log.tail()}") from None
        if watchdog.disarm():
            g.close()
            raise CarryError(f"libguestfs did not start within {LAUNCH_TIMEOUT:.0f} s:\n{log.tail()}")
        watchdog.arm_session(SESSION_TIMEOUT, g.get_pid())
        session = cls(g, watchdog, log)
        try:
            filesystems = g.list_filesystems()
            for device, which in ((_OLD_DEVICE, old_disk), (_NEW_DEVICE, new_disk)):
                if filesystems.get(device) != "ext4":
                    raise CarryError(f"{which} is not one ext4 filesystem on the whole disk ({filesystems})")
            g.mkmountpoint(OLD)
            g.mkmountpoint(NEW)
            g.mount_ro(_OLD_DEVICE, OLD)
            g.mount(_NEW_DEVICE, NEW)
        except RuntimeError as exc:
            session.discard()
            raise CarryError(f"libguestfs could not mount the disks: {exc}") from None
        except BaseException:
            session.discard()
            raise
        return session

    def close(self) -> None:
        """Flush the new disk: the swap that follows must find the carried store on it."""
        try:
            self.g.sync()
            self.g.umount_all()
            self.g.shutdown()
        except RuntimeError as exc:
            raise CarryError(f"libguestfs failed while flushing the new disk: {exc}") from None
        finally:
            self.watchdog.disarm()
            self.g.close()

    def discard(self) -> None:
        self.watchdog.disarm()
        self.g.close()
