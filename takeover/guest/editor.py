"""The agent's filesystem, opened offline with libguestfs, with edits that cannot be redirected.

The filesystem is untrusted: libguestfs parses it inside its own small VM (the
appliance), never in the host kernel, and we never run the guest's programs.
Every path we write or delete is first checked component by component, because
a planted symlink (`/home/proxy/.ssh -> /somewhere`) would otherwise send our
write elsewhere. Every change is recorded for the report.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import guestfs

from ..errors import ScrubError
from .appliance import LAUNCH_TIMEOUT, SESSION_TIMEOUT, ApplianceLog, Watchdog

# Debian 12 merges /usr: /lib, /bin and /sbin are symlinks into /usr. Those links (and only
# with these targets) are followed; any other symlink on a path we touch is the agent's.
MERGED_USR = {
    "/bin": "usr/bin",
    "/sbin": "usr/sbin",
    "/lib": "usr/lib",
    "/lib64": "usr/lib64",
    "/lib32": "usr/lib32",
    "/libx32": "usr/libx32",
}

# The guest's whole disk as the appliance sees it (the guest itself sees it as /dev/vda).
_APPLIANCE_ROOT = "/dev/sda"


@dataclass(frozen=True)
class Change:
    path: str
    action: str  # removed, written, replaced, locked, changed, stripped
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "action": self.action, **({"detail": self.detail} if self.detail else {})}


@dataclass(frozen=True)
class Entry:
    path: str
    mode: int
    uid: int
    gid: int
    size: int


@dataclass
class Guest:
    # The libguestfs handle. Private: every read and change goes through the methods below, so the
    # path checks and the change log cannot be bypassed.
    _g: Any  # guestfs.GuestFS
    changes: list[Change] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # things seen and reported, not changed
    watchdog: Watchdog = field(default_factory=Watchdog)
    log: ApplianceLog | None = None
    session_timeout: float = SESSION_TIMEOUT

    @classmethod
    def open(
        cls,
        disk: Path,
        *,
        force_tcg: bool = True,
        mount_root: bool = True,
        launch_timeout: float = LAUNCH_TIMEOUT,
        session_timeout: float = SESSION_TIMEOUT,
    ) -> Guest:
        """The disk, mounted in a libguestfs appliance that runs with the accelerator the takeover chose.

        `force_tcg` is the takeover's choice (TCG unless the KVM probe saw a guest run): libguestfs's
        own default, `accel=kvm:tcg`, would take a KVM that opens and then runs nothing.
        """
        g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
        log = ApplianceLog(g)
        # The direct backend: no libvirtd needed, and nothing of ours shared with the appliance.
        g.set_backend("direct")
        if force_tcg:
            g.set_backend_settings(["force_tcg"])
        g.set_network(False)
        g.add_drive_opts(str(disk), format="qcow2", readonly=False, cachemode="unsafe")
        watchdog = Watchdog()
        watchdog.arm_launch(launch_timeout)
        try:
            g.launch()
        except RuntimeError as exc:
            fired = watchdog.disarm()
            g.close()
            if fired:
                raise _launch_timeout(disk, launch_timeout, force_tcg, log) from None
            raise ScrubError(
                f"libguestfs could not start its appliance for {disk}: {exc}\nlast lines of its log:\n{log.tail()}"
            ) from None
        if watchdog.disarm():
            g.close()
            raise _launch_timeout(disk, launch_timeout, force_tcg, log)
        watchdog.arm_session(session_timeout, g.get_pid())
        try:
            if mount_root:  # not when the whole filesystem is about to be replaced (scrub.rebuild_system)
                g.mount(cls._root_device(g), "/")
        except RuntimeError as exc:
            watchdog.disarm()
            g.close()
            raise ScrubError(f"libguestfs could not open {disk}: {exc}") from None
        except BaseException:
            watchdog.disarm()
            g.close()
            raise
        return cls(g, watchdog=watchdog, log=log, session_timeout=session_timeout)

    @staticmethod
    def _root_device(g: Any) -> str:
        # The contract: one filesystem on the whole disk (root=/dev/vda). Anything else is
        # not an image vm_image builds, and guessing which partition is root would be unsafe.
        filesystems = {dev: kind for dev, kind in g.list_filesystems().items() if kind not in ("", "unknown", "swap")}
        if list(filesystems) != [_APPLIANCE_ROOT]:
            raise ScrubError(
                f"expected one filesystem on the whole disk, found {filesystems or 'none'}",
                hint="the host takes over only images built by `vm_image build`; a cloud image's "
                "disk (`--base-image`) only without --keep-agent-system",
            )
        return _APPLIANCE_ROOT

    def close(self) -> None:
        try:
            self._g.sync()
            self._g.umount_all()
            self._g.shutdown()  # reports write errors the appliance saw while flushing
        except RuntimeError as exc:
            if self.watchdog.fired:
                raise ScrubError(
                    f"the libguestfs session was stopped after {self.session_timeout:.0f} s: {exc}"
                ) from None
            raise ScrubError(f"libguestfs failed while flushing the scrubbed disk: {exc}") from None
        finally:
            self.watchdog.disarm()
            self._g.close()

    def discard(self) -> None:
        """Stop the appliance without flushing: after a failure, the half-scrubbed copy is not to be trusted."""
        self.watchdog.disarm()
        self._g.close()

    # -- reading ---------------------------------------------------------------------------

    def canonical(self, path: str) -> str:
        """`path` with a merged-/usr top directory resolved (/lib/modules -> /usr/lib/modules)."""
        top, sep, rest = path[1:].partition("/")
        top = "/" + top
        if top not in MERGED_USR or not sep:
            return path
        try:
            st = self._g.lstatns(top)
        except RuntimeError:
            return path
        if not stat.S_ISLNK(st["st_mode"]):
            return path
        target = self._g.readlink(top)
        if target.strip("/") != MERGED_USR[top]:
            raise ScrubError(
                f"{top} in the guest is a symlink to {target!r}, not to /{MERGED_USR[top]}; the image was tampered with"
            )
        return "/" + MERGED_USR[top] + "/" + rest

    def lstat(self, path: str) -> Entry | None:
        path = self.canonical(path)
        try:
            st = self._g.lstatns(path)
        except RuntimeError:
            return None
        return Entry(path, st["st_mode"], st["st_uid"], st["st_gid"], st["st_size"])

    def lexists(self, path: str) -> bool:
        return self.lstat(path) is not None

    def is_file(self, path: str) -> bool:
        entry = self.lstat(path)
        return entry is not None and stat.S_ISREG(entry.mode)

    def is_dir(self, path: str) -> bool:
        entry = self.lstat(path)
        return entry is not None and stat.S_ISDIR(entry.mode)

    def read(self, path: str, limit: int = 4 << 20) -> bytes:
        """A regular file's content; refuses links (we decide what a file is, not the agent)."""
        path = self.canonical(path)
        self._check_ancestors(path)
        entry = self.lstat(path)
        if entry is None or not stat.S_ISREG(entry.mode):
            raise ScrubError(f"{path} in the guest is missing or not a regular file")
        if entry.size > limit:
            raise ScrubError(f"{path} in the guest is {entry.size} bytes, more than we read ({limit})")
        data: bytes = self._g.read_file(path)  # guestfs is untyped
        return data

    def readlink(self, path: str) -> str:
        """Where the symlink at `path` points, as written (never followed)."""
        path = self.canonical(path)
        self._check_ancestors(path)
        target: str = self._g.readlink(path)  # guestfs is untyped
        return target

    def root_filesystem_type(self) -> str:
        """The kind of the one filesystem on the whole disk (ext4 for an image vm_image builds)."""
        kind: str = self._g.vfs_type(_APPLIANCE_ROOT)
        return kind

    def files_with_xattr(self, directory: str, names: list[str], attribute: str) -> list[str]:
        """The paths of those files in `directory` that carry the extended attribute `attribute`."""
        found: list[str] = []
        for start in range(0, len(names), 500):
            pending = list(names[start : start + 500])
            batch = list(pending)
            current = None
            # lxattrlist answers in one flat list: per file, a record with an empty name, then its xattrs.
            for attr in self._g.lxattrlist(directory, batch):
                if attr["attrname"] == "":
                    current = pending.pop(0) if pending else None
                elif current is not None and attr["attrname"] == attribute:
                    found.append(f"{directory.rstrip('/')}/{current}")
        return found

    def listdir(self, path: str) -> list[str]:
        path = self.canonical(path)
        if not self.is_dir(path) or not self._ancestors_real(path):
            return []
        return sorted(self._g.ls(path))

    def walk(self) -> Iterator[Entry]:
        """Every file, directory and link on the filesystem, with mode and owner."""
        with tempfile.TemporaryDirectory(prefix="takeover-find-") as tmp:
            listing = Path(tmp) / "find0"
            self._g.find0("/", str(listing))
            names = [n for n in listing.read_bytes().split(b"\0") if n]
        by_dir: dict[str, list[str]] = defaultdict(list)
        for raw in names:
            rel = os.fsdecode(raw)
            parent, _, base = ("/" + rel).rpartition("/")
            by_dir[parent or "/"].append(base)
        for parent, bases in by_dir.items():
            for start in range(0, len(bases), 500):
                batch = bases[start : start + 500]
                for base, st in zip(batch, self._g.lstatnslist(parent, batch), strict=True):
                    path = parent.rstrip("/") + "/" + base
                    yield Entry(path, st["st_mode"], st["st_uid"], st["st_gid"], st["st_size"])

    # -- changing --------------------------------------------------------------------------

    def remove(self, path: str, why: str) -> bool:
        """Delete `path` (recursively). If a parent is a planted symlink, delete that link instead."""
        path = self.canonical(path)
        link = self._first_link_ancestor(path)
        if link is not None:
            self._g.rm(link)
            self.changes.append(Change(link, "removed", f"symlink on the way to {path}; {why}"))
            return True
        if not self.lexists(path):
            return False
        self._g.rm_rf(path)
        self.changes.append(Change(path, "removed", why))
        return True

    def empty_dir(self, path: str, why: str, keep: tuple[str, ...] = ()) -> None:
        for name in self.listdir(path):
            if name not in keep:
                self.remove(f"{path.rstrip('/')}/{name}", why)

    def mkdir(self, path: str, mode: int, uid: int = 0, gid: int = 0) -> None:
        """A real directory at `path` with this owner and mode; links or files in the way are removed."""
        path = self.canonical(path)
        parts = PurePosixPath(path).parts
        current = ""
        for part in parts[1:]:
            current += "/" + part
            entry = self.lstat(current)
            if entry is not None and not stat.S_ISDIR(entry.mode):
                self._g.rm_rf(current)
                self.changes.append(Change(current, "removed", "was in the way of a directory we create"))
                entry = None
            if entry is None:
                self._g.mkdir(current)
                self._g.chmod(0o755, current)
        self._g.chmod(mode, path)
        self._g.lchown(uid, gid, path)

    def write(self, path: str, data: bytes, mode: int, uid: int = 0, gid: int = 0, why: str = "") -> None:
        path = self.canonical(path)
        parent = str(PurePosixPath(path).parent)
        if not self._ancestors_real(path) or not self.is_dir(parent):
            entry = self.lstat(parent)
            self.mkdir(parent, stat.S_IMODE(entry.mode) if entry and stat.S_ISDIR(entry.mode) else 0o755)
        existed = self.lexists(path)
        entry = self.lstat(path)
        if entry is not None and not stat.S_ISREG(entry.mode):
            self._g.rm_rf(path)  # a link or directory where we write a file: never write through it
        self._g.write(path, data)
        self._g.chmod(mode, path)
        self._g.lchown(uid, gid, path)
        self.changes.append(Change(path, "replaced" if existed else "written", why))

    def chmod(self, path: str, mode: int, why: str) -> None:
        path = self.canonical(path)
        self._g.chmod(mode, path)
        self.changes.append(Change(path, "changed", why))

    def remove_xattr(self, path: str, name: str, why: str) -> None:
        self._g.lremovexattr(name, path)
        self.changes.append(Change(path, "stripped", f"{name}: {why}"))

    def symlink(self, path: str, target: str, why: str) -> None:
        """A symlink at `path` pointing at `target`; whatever was at `path` is removed, never written through."""
        path = self.canonical(path)
        self._check_ancestors(path)
        existed = self.lexists(path)
        if existed:
            self._g.rm_rf(path)
        self._g.ln_s(target, path)
        self.changes.append(Change(path, "replaced" if existed else "written", why))

    def record(self, path: str, action: str, detail: str) -> None:
        """A change made to a file's content before it is written back (a line of /etc/passwd removed)."""
        self.changes.append(Change(path, action, detail))

    def replace_filesystem(self, tarballs: list[Path], why: str) -> None:
        """A fresh filesystem on the whole disk, filled from these tarballs in order; nothing of the old is read.

        A cloud image's partition table goes too: the host boots one filesystem, root=/dev/vda.
        """
        self._g.umount_all()
        self._g.wipefs(_APPLIANCE_ROOT)
        self._g.mkfs("ext4", _APPLIANCE_ROOT, label="secret-proxy")
        self._g.mount(_APPLIANCE_ROOT, "/")
        for tarball in tarballs:
            self._g.tar_in(str(tarball), "/")
        self.changes.append(Change("/", "replaced", why))

    def tar_in(self, tarball: Path, directory: str, why: str) -> None:
        directory = self.canonical(directory)
        self.mkdir(directory, 0o755)
        self._g.tar_in(str(tarball), directory)
        self.changes.append(Change(directory, "replaced", why))

    # -- path checks -----------------------------------------------------------------------

    def _first_link_ancestor(self, path: str) -> str | None:
        current = ""
        for part in PurePosixPath(path).parts[1:-1]:
            current += "/" + part
            entry = self.lstat(current)
            if entry is None:
                return None
            if stat.S_ISLNK(entry.mode):
                return current
        return None

    def _ancestors_real(self, path: str) -> bool:
        return self._first_link_ancestor(path) is None

    def _check_ancestors(self, path: str) -> None:
        link = self._first_link_ancestor(path)
        if link is not None:
            raise ScrubError(f"{link} in the guest is a symlink, on the way to {path}; the image was tampered with")


def _launch_timeout(disk: Path, seconds: float, force_tcg: bool, log: ApplianceLog) -> ScrubError:
    accel = "TCG (software emulation)" if force_tcg else "KVM, else TCG"
    hint = (
        "rerun `python -m takeover run --accel tcg`: a KVM that opens but runs no guest (dmesg: kvm-pvm) "
        "hangs the appliance"
        if not force_tcg
        else "the host may be overloaded, or QEMU/libguestfs broken: run `libguestfs-test-tool` and read its "
        "output, then rerun `python -m takeover run` (it resumes at the scrub)"
    )
    return ScrubError(
        f"libguestfs's appliance for {disk} did not start within {seconds:.0f} s under {accel}; "
        f"it was stopped. Last lines of its log (LIBGUESTFS_DEBUG=1 shows everything):\n{log.tail()}",
        hint=hint,
    )
