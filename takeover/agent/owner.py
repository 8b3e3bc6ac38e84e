"""Step 1: the VM root stops and deletes must be the agent's, and the agent must be nobody special.

Whatever step 1 accepts, root checkpoints and stops (step 2) and deletes (step 7).
The ready file is only the agent's word: it can name another user's VM, or the
host's own VM from an earlier takeover (`/var/lib/secret-proxy-vm/qmp.sock` and
its disk). So step 1 requires, from the kernel rather than from the ready file:

- one owner for the ready file, the monitor socket, the disk, the pidfile and
  the QEMU process (every one of its uids and gids);
- that owner is not root, nor a user the host runs QEMU as (`libvirt-qemu`,
  `qemu`, the takeover's `--qemu-user`);
- no path lies in a host directory (`--host-dir`, /var/lib/secret-proxy-vm,
  /var/lib/libvirt, the host's cache, or any directory holding a takeover journal);
- the owner's account (its full group list, not only the running process's) is
  in no group that reads the host's disks or VMs' memory, or is root already.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_CACHE_DIR, DEFAULT_HOST_DIR, DEFAULT_QEMU_USER
from ..errors import NotTheAgentsVM, PrivilegedAgent, TakeoverError
from ..journal import JOURNAL_NAME

HOST_DIRS = (DEFAULT_HOST_DIR, DEFAULT_CACHE_DIR, Path("/var/lib/libvirt"))
HOST_QEMU_USERS = ("libvirt-qemu", "qemu", "libvirt-dnsmasq")
# What membership gives an agent; printed in the refusal so the operator knows why.
PRIVILEGED_GROUPS = {
    "root": "root's own group",
    "disk": "reads and writes every block device, so the host's disks",
    "kvm": "libvirt QEMU's group on Debian, which owns its VMs' disks; and /dev/kvm",
    "libvirt": "drives libvirtd, which runs VMs as root's choice of user: every VM's disk and memory",
    "libvirt-qemu": "libvirt QEMU's own group: its VMs' disks and memory",
    "docker": "starts containers as root: root on the host",
    "lxd": "starts privileged containers: root on the host",
    "incus-admin": "starts privileged containers: root on the host",
    "admin": "becomes root (sudo's group on older Ubuntu)",
    "sudo": "becomes root",
    "wheel": "becomes root where su or sudo allow wheel",
    "adm": "reads every system log",
    "shadow": "reads every password hash",
}


@dataclass(frozen=True)
class HostBoundary:
    """What belongs to the host: the accounts the agent must not be, the directories its files must not be in."""

    host_dirs: tuple[Path, ...]
    host_users: tuple[str, ...]

    @classmethod
    def for_takeover(
        cls, host_dir: Path, qemu_user: str | None = DEFAULT_QEMU_USER, extra_dirs: tuple[Path, ...] = ()
    ) -> HostBoundary:
        users = HOST_QEMU_USERS + ((qemu_user,) if qemu_user else ())
        return cls(host_dirs=(host_dir, *HOST_DIRS, *extra_dirs), host_users=users)

    def host_uids(self) -> dict[int, str]:
        uids = {0: "root"}
        for name in self.host_users:
            try:
                uids[pwd.getpwnam(name).pw_uid] = name
            except KeyError:
                continue
        return uids

    def host_groups(self) -> set[str]:
        """Groups named like the host's QEMU users or their primary groups (secret-proxy-vm, kvm, ...)."""
        names = set(self.host_users)
        for name in self.host_users:
            try:
                names.add(grp.getgrgid(pwd.getpwnam(name).pw_gid).gr_name)
            except KeyError:
                continue
        return names


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def one_owner(owners: list[tuple[str, int]]) -> int:
    """The single uid owning every item (what, uid); refuses when two differ."""
    uids = {uid for _, uid in owners}
    if len(uids) != 1:
        listed = ", ".join(f"the {what} is {user_name(uid)}'s" for what, uid in owners)
        raise NotTheAgentsVM(f"the VM the ready file names is not one user's: {listed}")
    return uids.pop()


def check_not_host_account(uid: int, boundary: HostBoundary) -> None:
    host = boundary.host_uids()
    if uid in host:
        raise NotTheAgentsVM(
            f"the VM the ready file names belongs to {host[uid]}, not to an unprivileged agent; "
            f"the takeover only takes a VM that an unprivileged user runs as itself"
        )


def check_process_ids(uids: tuple[int, ...], gids: tuple[int, ...], owner: int, pid: int) -> None:
    """Every uid of the QEMU (real, effective, saved, filesystem) is the owner's; its gids are all one."""
    if set(uids) != {owner}:
        raise NotTheAgentsVM(
            f"QEMU pid {pid} runs as uids {sorted(set(uids))}, but its files are {user_name(owner)}'s (uid {owner})"
        )
    if len(set(gids)) != 1:
        raise NotTheAgentsVM(f"QEMU pid {pid} runs with several group ids {sorted(set(gids))} (setgid)")


def check_groups(uid: int, process_gids: tuple[int, ...], boundary: HostBoundary) -> None:
    """The account's full group list (getgrouplist) and the running process's groups: none privileged."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise NotTheAgentsVM(
            f"uid {uid} has no entry in the host's user database, so its groups cannot be checked"
        ) from None
    gids = set(os.getgrouplist(entry.pw_name, entry.pw_gid)) | set(process_gids)
    host_groups = boundary.host_groups()
    found = {}
    for gid in sorted(gids):
        try:
            name = grp.getgrgid(gid).gr_name
        except KeyError:
            name = str(gid)
        if gid == 0 or name in PRIVILEGED_GROUPS:
            found[name] = PRIVILEGED_GROUPS.get(name, "root's own group")
        elif name in host_groups:
            found[name] = "the group of a user the host runs QEMU as"
    if found:
        reasons = "; ".join(f"{name}: {why}" for name, why in found.items())
        commands = " && ".join(f"gpasswd -d {entry.pw_name} {name}" for name in found)
        raise PrivilegedAgent(
            f"the agent's user {entry.pw_name} is in the group(s) {', '.join(found)} ({reasons}); "
            f"such an agent can read the host's disks or the VM's memory, or is root already, "
            f"so no takeover can contain it",
            hint=f"`{commands}`, then the agent logs in again and restarts its VM (a running "
            f"process keeps the groups it started with); then rerun",
        )


def check_outside_host_dirs(paths: list[tuple[str, Path | None]], boundary: HostBoundary) -> None:
    """No path, as named or resolved, lies under a host directory or a directory holding a takeover journal."""
    protected = {}
    for directory in boundary.host_dirs:
        try:
            st = os.stat(directory)
        except OSError:
            continue
        protected[(st.st_dev, st.st_ino)] = directory
    for what, path in paths:
        if path is None:
            continue
        for candidate in dict.fromkeys((Path(path), Path(os.path.realpath(path)))):
            for ancestor in candidate.parents:
                try:
                    st = os.stat(ancestor)
                except OSError:
                    continue
                hit = protected.get((st.st_dev, st.st_ino))
                if hit is None and _holds_journal(ancestor):
                    hit = ancestor
                if hit is not None:
                    raise NotTheAgentsVM(
                        f"the {what} {str(path)!r} is inside the host directory {str(hit)!r}; "
                        f"the takeover never takes (or deletes) the host's own files"
                    )


def _holds_journal(directory: Path) -> bool:
    try:
        st = os.lstat(directory / JOURNAL_NAME)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == 0


def agent_file(
    path: Path,
    what: str,
    kind: str,
    *,
    missing: type[TakeoverError] = NotTheAgentsVM,
    wrong_kind: type[TakeoverError] = NotTheAgentsVM,
) -> os.stat_result:
    """lstat of one of the agent's files: never through a symlink, and of the expected kind."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise missing(f"the {what} {str(path)!r} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise NotTheAgentsVM(f"the {what} {str(path)!r} is a symlink; name the file itself")
    expected = stat.S_ISSOCK if kind == "socket" else stat.S_ISREG
    if not expected(st.st_mode):
        raise wrong_kind(f"the {what} {str(path)!r} is not a {'unix socket' if kind == 'socket' else 'regular file'}")
    return st
