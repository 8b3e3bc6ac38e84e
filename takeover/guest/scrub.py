"""Step 4: scrub the host's copy of the disk offline and re-key it.

Assume the agent planted something wherever it could, and remove or overwrite
every place we know that gives it a way back in or a way to run code later:
logins (SSH keys, passwords, sudo, extra root accounts), the SSH server's
configuration and host keys, boot-time hooks (systemd units and drop-ins,
generators, rc.local, udev, modprobe, sysctl, tmpfiles, cron, linger,
ld.so.preload, fstab), login scripts, setuid and capability bits, cloud-init,
and the proxy's data (the agent may have read the master key). Every change
is recorded; what this cannot catch is listed in `NOT_BLOCKED`.
"""

from __future__ import annotations

import os
import posixpath
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vm_image.guest_files import DATA_DIR as PROXY_DATA
from vm_image.guest_files import PROXY_HOME, PROXY_USER, ROOT_DEVICE
from vm_image.guest_files import VENV as PROXY_VENV

from ..agent.diskimage import QEMU_IMG, inspect_image
from ..errors import ScrubError
from ..host.files import fsync_dir, fsync_file
from ..host.keys import HostKeys
from . import files as guest_files
from .editor import Guest

# What the scrub leaves in place, for docs/threat-model.md. Each line: what, and why it is open.
# The first four hold only when the agent's system is kept (--keep-agent-system); by default the
# filesystem is rebuilt from the host's own build of the same Debian system, and they do not apply.
AGENT_SYSTEM_KEPT = [
    "Programs and libraries outside the proxy's venv (/usr: sshd, systemd, python3, libc, PAM modules) are the "
    "agent's build; a replaced binary keeps its privileges. They are not compared with Debian's packages.",
    "Unit files, generators, udev rules and tmpfiles under /usr/lib and /lib are the agent's build; only /etc "
    "(where local configuration lives) and the enable links are scrubbed.",
    "PAM configuration (/etc/pam.d) is the agent's; sshd no longer uses PAM (UsePAM no), but other services do.",
    "System CA certificates (/etc/ssl, /usr/share/ca-certificates) are the agent's; code that trusts the system "
    "store could be intercepted.",
]
NOT_BLOCKED = [
    "QEMU runs the scrubbed guest; a QEMU escape would land as the QEMU process's user on the host.",
]


@dataclass(frozen=True)
class ScrubPlan:
    keys: HostKeys
    proxy_config: bytes | None  # the host's config.toml for the proxy, already validated
    modules_tar: Path | None = None  # trusted /lib/modules tree for the host's kernel
    venv_tar: Path | None = None  # proxy venv built on the host from locked wheels
    system_tar: Path | None = None  # the host's own build of the base system (vm_image.rootfs); None keeps the agent's
    system_overlay: Path | None = None  # our guest's files over it (vm_image.disk.write_system_overlay)
    force_tcg: bool = True


@dataclass
class ScrubResult:
    changes: list[dict[str, str]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    not_blocked: list[str] = field(default_factory=list)
    snapshots_removed: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ProxyIds:
    uid: int
    gid: int
    homes: tuple[str, ...] = ()  # every home directory /etc/passwd named before the scrub


def scrub_and_rekey(disk: Path, plan: ScrubPlan, progress: Callable[[str], None] = lambda _: None) -> ScrubResult:
    timings: dict[str, float] = {}
    started = time.monotonic()
    if plan.system_tar is not None:
        snapshots = blank_disk(disk)
        timings["blank"] = round(time.monotonic() - started, 3)
    else:
        snapshots = remove_internal_snapshots(disk)
        timings["snapshots"] = round(time.monotonic() - started, 3)
    progress("starting libguestfs (about 40 s under TCG)")
    started = time.monotonic()
    guest = Guest.open(disk, force_tcg=plan.force_tcg, mount_root=plan.system_tar is None)
    timings["launch"] = round(time.monotonic() - started, 3)

    def timed(name: str, step: Callable[[], Any]) -> Any:
        progress(f"scrub: {name.replace('_', ' ')}")
        t = time.monotonic()
        out = step()
        timings[name] = round(time.monotonic() - t, 3)
        return out

    try:
        if plan.system_tar is not None:
            system_tar, overlay = plan.system_tar, plan.system_overlay
            if overlay is None:
                raise ScrubError("a system rebuild was planned without its overlay of our files")
            timed("system", lambda: rebuild_system(guest, system_tar, overlay))
        ids = timed("accounts", lambda: scrub_accounts(guest))
        timed("sudo", lambda: scrub_privilege_grants(guest))
        timed("ssh", lambda: rekey_ssh(guest, plan.keys, ids))
        timed("login_scripts", lambda: scrub_login_scripts(guest))
        timed("cloud_init", lambda: disable_cloud_init(guest))
        timed("boot_hooks", lambda: scrub_boot_hooks(guest, plan))
        timed("privileges", lambda: strip_privilege_bits(guest))
        timed("proxy", lambda: reset_proxy(guest, plan, ids))
        timed("modules", lambda: replace_kernel_modules(guest, plan.modules_tar))
        timed("venv", lambda: replace_proxy_venv(guest, plan.venv_tar))
    except RuntimeError as exc:  # libguestfs reports failures as RuntimeError
        guest.discard()
        raise ScrubError(f"libguestfs failed during the scrub: {exc}") from None
    except BaseException:
        guest.discard()
        raise
    t = time.monotonic()
    guest.close()
    # The appliance wrote through the host's page cache; the journal will say "scrubbed", so
    # the scrubbed bytes must be on disk first, or a crash could leave a half-scrubbed disk behind.
    fsync_file(disk)
    timings["flush"] = round(time.monotonic() - t, 3)
    not_blocked = (AGENT_SYSTEM_KEPT if plan.system_tar is None else []) + list(NOT_BLOCKED)
    if plan.venv_tar is None:
        not_blocked.insert(
            0,
            f"The proxy's venv ({PROXY_VENV}) is the agent's build and was not reinstalled "
            f"from the host's wheels: its code runs as the proxy user and can read the new "
            f"master key.",
        )
    if plan.modules_tar is None:
        not_blocked.insert(0, "Kernel modules under /lib/modules are the agent's; the guest kernel may load them.")
    return ScrubResult([c.to_dict() for c in guest.changes], guest.findings, not_blocked, snapshots, timings)


def rebuild_system(guest: Guest, system_tar: Path, overlay_tar: Path | None) -> None:
    """Replace the agent's whole filesystem with the host's own build of the same Debian system.

    Checking every file the agent's build left against Debian's archive would be a long,
    leaky list; a filesystem the host made itself from Debian's signed packages has nothing
    of the agent's in it. The steps after this one still run: they find nothing to remove,
    and write the host's keys, configuration, venv and modules as before.
    """
    guest.replace_filesystem(
        [system_tar] + ([overlay_tar] if overlay_tar is not None else []),
        "the agent's whole filesystem, by the host's own build of Debian 12 from Debian's signed packages",
    )


def blank_disk(disk: Path) -> list[str]:
    """With the system rebuild nothing of the agent's disk is kept, so the appliance never reads it.

    The host's copy is replaced by an empty qcow2 of the same size before libguestfs starts:
    the appliance's kernel then never scans a partition table, nor any byte, the agent wrote.
    Returns the snapshots the copy carried (the report lists them as removed).
    """
    info = inspect_image(disk)
    create_blank_disk(disk, info.virtual_size)
    return list(info.snapshots)


def create_blank_disk(disk: Path, size: int) -> None:
    """An empty qcow2 of `size` bytes at `disk` (replacing what is there), root's and 0600 from the start."""
    fresh = disk.with_name(f".{disk.name}.blank")
    fresh.unlink(missing_ok=True)
    made = subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "--", str(fresh), str(size)],
        capture_output=True,
        text=True,
        timeout=120,
        umask=0o077,  # 0600 from the start: the disk will hold the host's keys
    )
    if made.returncode != 0:
        raise ScrubError(f"qemu-img could not create the host's blank disk: {made.stderr.strip()}")
    fsync_file(fresh)
    os.replace(fresh, disk)
    fsync_dir(disk.parent)


def remove_internal_snapshots(disk: Path) -> list[str]:
    """The copy carries `takeover-checkpoint` (the agent's RAM) and any snapshot the agent planted; drop all."""
    names = list(inspect_image(disk).snapshots)
    for name in names:
        proc = subprocess.run(
            [QEMU_IMG, "snapshot", "-d", name, "--", str(disk)], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise ScrubError(f"qemu-img could not delete snapshot {name!r} from the host copy: {proc.stderr.strip()}")
    return names


# -- accounts ------------------------------------------------------------------------------------


LOCKED_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false", "/bin/sync")


def scrub_accounts(guest: Guest) -> ProxyIds:
    """One root, a proxy user that is not root, and no usable password anywhere."""
    lines = guest.read("/etc/passwd").decode("utf-8", "replace").splitlines()
    homes = _passwd_homes(lines)
    kept, proxy = [], None
    for line in lines:
        fields = _scrubbed_passwd_entry(guest, line)
        if fields is None:
            continue
        if fields[0] == PROXY_USER:
            if proxy is not None:
                raise ScrubError("/etc/passwd defines the proxy user twice")
            proxy = _normalise_proxy_entry(guest, fields)
        elif fields[0] != "root" and fields[6] not in LOCKED_SHELLS:
            guest.findings.append(
                f"account {fields[0]!r} (uid {int(fields[2])}) has login shell {fields[6]}; it cannot log in "
                f"(password locked, SSH allows only {PROXY_USER})"
            )
        kept.append(":".join(fields))
    if proxy is None:
        raise ScrubError(
            "the guest has no proxy user", hint="the host takes over only images built by `vm_image build`"
        )
    if kept != lines:
        guest.write("/etc/passwd", _text(kept), 0o644, why="accounts scrubbed (see details)")
    _lock_passwords(guest, "/etc/shadow", name_field=0, password_field=1, proxy_password="*")
    if guest.is_file("/etc/gshadow"):
        _lock_passwords(guest, "/etc/gshadow", name_field=0, password_field=1, proxy_password="!")
    _drop_supplementary_groups(guest, proxy)
    return ProxyIds(proxy.uid, proxy.gid, homes)


def _passwd_homes(lines: list[str]) -> tuple[str, ...]:
    """Every home directory /etc/passwd names, read before the scrub changes it."""
    entries = (line.split(":") for line in lines)
    return tuple(sorted({f[5].rstrip("/") for f in entries if len(f) == 7 and f[5].startswith("/")}))


def _scrubbed_passwd_entry(guest: Guest, line: str) -> list[str] | None:
    """The line's fields with any password hash moved out; None for a line to drop (malformed, a second root)."""
    fields = line.split(":")
    if len(fields) != 7 or not fields[2].isdigit() or not fields[3].isdigit():
        guest.record("/etc/passwd", "changed", f"removed malformed line {line[:40]!r}")
        return None
    name, password, uid = fields[0], fields[1], int(fields[2])
    if uid == 0 and name != "root":
        guest.record("/etc/passwd", "changed", f"removed {name!r}, a second account with uid 0")
        return None
    if password not in ("x", "*", "!", "!*"):
        fields[1] = "x"
        guest.record("/etc/passwd", "changed", f"password hash of {name!r} moved out (set to x)")
    return fields


def _normalise_proxy_entry(guest: Guest, fields: list[str]) -> ProxyIds:
    """The proxy user's entry (changed in place): not root, with its own home and bash."""
    uid, gid = int(fields[2]), int(fields[3])
    if uid == 0 or gid == 0:
        raise ScrubError("the proxy user has uid or gid 0 in the guest; refusing to run the proxy as root")
    if fields[5] != PROXY_HOME or fields[6] != "/bin/bash":
        reset = f"proxy home/shell {fields[5]}:{fields[6]} reset to {PROXY_HOME}:/bin/bash"
        guest.record("/etc/passwd", "changed", reset)
        fields[5], fields[6] = PROXY_HOME, "/bin/bash"
    return ProxyIds(uid, gid)


def _lock_passwords(guest: Guest, path: str, name_field: int, password_field: int, proxy_password: str) -> None:
    # "!*" locks an account for every password. The proxy user gets "*" (no password can match) instead:
    # without PAM, sshd refuses even key logins to accounts whose hash starts with "!".
    lines = guest.read(path).decode("utf-8", "replace").splitlines()
    out, locked = [], []
    for line in lines:
        fields = line.split(":")
        if len(fields) < 2:
            continue
        want = proxy_password if fields[name_field] == PROXY_USER else "!*"
        old = fields[password_field]
        if old != want:
            if not old.startswith(("!", "*")) and old:  # a hash: a password that worked until now
                locked.append(fields[name_field])
            fields[password_field] = want
        if path == "/etc/shadow" and fields[name_field] == PROXY_USER and len(fields) >= 8 and fields[7]:
            fields[7] = ""  # an expiry date the agent set would lock the host out
        out.append(":".join(fields))
    if out != lines:
        guest.write(
            path,
            _text(out),
            0o640,
            0,
            _group_id(guest, "shadow"),
            why=f"every password locked; had a password until now: {', '.join(locked) or 'none'}",
        )


def _drop_supplementary_groups(guest: Guest, proxy: ProxyIds) -> None:
    # group:  name:x:gid:members      gshadow: name:password:admins:members
    for path in ("/etc/group", "/etc/gshadow"):
        if not guest.is_file(path):
            continue
        lines = guest.read(path).decode("utf-8", "replace").splitlines()
        out, dropped = [], []
        for line in lines:
            fields = line.split(":")
            if len(fields) == 4:
                members = [m for m in fields[3].split(",") if m]
                if PROXY_USER in members:
                    dropped.append(fields[0])
                    fields[3] = ",".join(m for m in members if m != PROXY_USER)
                if path == "/etc/gshadow":
                    fields[2] = ",".join(m for m in fields[2].split(",") if m and m != PROXY_USER)
            out.append(":".join(fields))
        if out != lines:
            mode, gid = (0o644, 0) if path == "/etc/group" else (0o640, _group_id(guest, "shadow"))
            guest.write(path, _text(out), mode, 0, gid, why=f"proxy removed from groups: {', '.join(dropped) or '-'}")


def _group_id(guest: Guest, name: str) -> int:
    for line in guest.read("/etc/group").decode("utf-8", "replace").splitlines():
        fields = line.split(":")
        if len(fields) == 4 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    return 0


def scrub_privilege_grants(guest: Guest) -> None:
    """No sudo, doas or polkit rule the agent wrote survives."""
    if guest.lexists("/etc/sudoers"):
        guest.write("/etc/sudoers", guest_files.SUDOERS.encode(), 0o440, why="reset to root-only")
    guest.empty_dir("/etc/sudoers.d", "sudo rules are the agent's", keep=("README",))
    guest.remove("/etc/doas.conf", "doas rules are the agent's")
    guest.empty_dir("/etc/polkit-1/rules.d", "polkit rules are the agent's")
    guest.empty_dir("/etc/polkit-1/localauthority", "polkit rules are the agent's")


# -- SSH -----------------------------------------------------------------------------------------


def rekey_ssh(guest: Guest, keys: HostKeys, proxy: ProxyIds) -> None:
    """Only the host's key logs in, only as proxy; the VM proves itself with a host key the host made."""
    for home in _home_dirs(guest, proxy.homes):
        for name in ("authorized_keys", "authorized_keys2", "rc", "environment"):
            guest.remove(f"{home}/.ssh/{name}", "SSH login material of the agent's era")
    guest.remove("/etc/ssh/sshrc", "runs at every SSH login")
    guest.empty_dir("/etc/ssh/sshd_config.d", "sshd drop-ins are the agent's")
    guest.write("/etc/ssh/sshd_config", guest_files.SSHD_CONFIG.encode(), 0o644, why="host's hardened sshd_config")
    guest.write(
        "/etc/default/ssh",
        b"# Written by the host's takeover: no extra sshd options.\nSSHD_OPTS=\n",
        0o644,
        why="SSHD_OPTS could point sshd at another config",
    )
    for name in guest.listdir("/etc/ssh"):
        if name.startswith("ssh_host_"):
            guest.remove(f"/etc/ssh/{name}", "the agent knows this host key")
    guest.write("/etc/ssh/ssh_host_ed25519_key", keys.vm_host_private, 0o600, why="new host key made on the host")
    guest.write(
        "/etc/ssh/ssh_host_ed25519_key.pub",
        (keys.vm_host_public + "\n").encode(),
        0o644,
        why="new host key made on the host",
    )
    guest.remove(f"{PROXY_HOME}/.ssh", "replaced by a directory with only the host's key")
    guest.mkdir(PROXY_HOME, 0o750, proxy.uid, proxy.gid)
    guest.mkdir(f"{PROXY_HOME}/.ssh", 0o700, proxy.uid, proxy.gid)
    # restrict: no forwarding and no ~/.ssh/rc; pty is allowed back for an operator's shell.
    guest.write(
        f"{PROXY_HOME}/.ssh/authorized_keys",
        f"restrict,pty {keys.login_public}\n".encode(),
        0o600,
        proxy.uid,
        proxy.gid,
        why="only the host's login key",
    )


def _home_dirs(guest: Guest, passwd_homes: tuple[str, ...]) -> list[str]:
    # Homes named in /etc/passwd before the scrub changed it, plus every directory under /home.
    homes = {"/root", PROXY_HOME, *passwd_homes}
    homes.update(f"/home/{name}" for name in guest.listdir("/home"))
    return sorted(homes)


# -- login scripts, cloud-init -------------------------------------------------------------------


def scrub_login_scripts(guest: Guest) -> None:
    """The host runs commands over SSH as proxy; nothing the agent wrote may run in those shells."""
    guest.empty_dir(PROXY_HOME, "the agent's files in the proxy user's home (dotfiles run at login)", keep=(".ssh",))
    guest.write("/etc/bash.bashrc", guest_files.BASH_BASHRC.encode(), 0o644, why="runs in every bash")
    guest.write("/etc/profile", guest_files.PROFILE.encode(), 0o644, why="runs in every login shell")
    guest.empty_dir("/etc/profile.d", "runs in every login shell")
    guest.write("/etc/environment", b"", 0o644, why="environment for every session")
    for name in guest.listdir("/etc"):
        if name.startswith("python3") and guest.lexists(f"/etc/{name}/sitecustomize.py"):
            guest.write(f"/etc/{name}/sitecustomize.py", b"", 0o644, why="imported by every Python process")


def disable_cloud_init(guest: Guest) -> None:
    """cloud-init would re-apply the agent's user-data (keys, users, commands) at the next boot."""
    guest.write("/etc/cloud/cloud-init.disabled", b"", 0o644, why="cloud-init off")
    guest.remove("/var/lib/cloud", "cloud-init state and seeds")
    guest.empty_dir("/etc/cloud/cloud.cfg.d", "cloud-init configuration", keep=("README",))
    for path in ("/boot/user-data", "/boot/meta-data", "/user-data", "/meta-data"):
        guest.remove(path, "cloud-init NoCloud seed")


# -- boot-time hooks -----------------------------------------------------------------------------

PACKAGE_UNIT_DIRS = ("/lib/systemd/", "/usr/lib/systemd/")


def scrub_boot_hooks(guest: Guest, plan: ScrubPlan) -> None:
    """Remove every local place where a boot, a device or a timer runs a command as root."""
    _scrub_systemd_dir(guest, "/etc/systemd/system")
    _scrub_systemd_dir(guest, "/etc/systemd/user")
    for directory in (
        "/etc/systemd/system-generators",
        "/etc/systemd/user-generators",
        "/etc/systemd/system-environment-generators",
        "/etc/systemd/user-environment-generators",
        "/etc/systemd/system-preset",
        "/etc/systemd/user-preset",
        "/etc/environment.d",
    ):
        guest.remove(directory, "runs or configures programs at boot")
    for name in guest.listdir("/etc/systemd"):
        if name.endswith(".conf.d"):
            guest.remove(f"/etc/systemd/{name}", "systemd manager overrides")
    guest.write("/etc/systemd/system.conf", b"[Manager]\n", 0o644, why="DefaultEnvironment= could preload a library")
    guest.write("/etc/systemd/user.conf", b"[Manager]\n", 0o644, why="same for user managers")
    guest.remove("/var/lib/systemd/linger", "lingering users start their own services at boot")
    guest.remove("/etc/rc.local", "run at boot by systemd-rc-local-generator")
    for level in ("0", "1", "2", "3", "4", "5", "6", "S"):
        guest.empty_dir(f"/etc/rc{level}.d", "SysV start links run scripts at boot", keep=("README",))
    guest.empty_dir("/etc/udev/rules.d", "udev RUN+= runs commands as root")
    guest.empty_dir("/etc/modprobe.d", "modprobe install= runs commands as root")
    guest.empty_dir("/etc/modules-load.d", "modules loaded at boot")
    guest.write("/etc/modules", b"", 0o644, why="modules loaded at boot")
    guest.empty_dir(
        "/etc/sysctl.d", "sysctl can set kernel.core_pattern or kernel.modprobe to a program", keep=("README.sysctl",)
    )
    guest.write("/etc/sysctl.conf", b"", 0o644, why="same as /etc/sysctl.d")
    guest.empty_dir("/etc/tmpfiles.d", "tmpfiles can write files and symlinks as root at boot")
    guest.empty_dir("/etc/binfmt.d", "binfmt handlers run programs for matching files")
    guest.remove("/etc/ld.so.preload", "preloads a library into every program")
    guest.remove(
        "/etc/ld.so.cache",
        "the cache can map a library name to any file; ld.so then searches only the standard directories",
    )
    guest.empty_dir("/etc/ld.so.conf.d", "library search paths", keep=("libc.conf", "x86_64-linux-gnu.conf"))
    guest.write("/etc/ld.so.conf.d/libc.conf", b"/usr/local/lib\n", 0o644, why="standard content")
    guest.write(
        "/etc/ld.so.conf.d/x86_64-linux-gnu.conf",
        b"/usr/local/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n",
        0o644,
        why="standard content",
    )
    guest.write("/etc/ld.so.conf", b"include /etc/ld.so.conf.d/*.conf\n", 0o644, why="standard content")
    fs_type = guest.root_filesystem_type()
    guest.write(
        "/etc/fstab",
        f"{ROOT_DEVICE} / {fs_type} rw,errors=remount-ro 0 1\n".encode(),
        0o644,
        why="a mount could hide the scrubbed files (e.g. bind a directory over ~/.ssh)",
    )
    guest.write(
        "/etc/hosts",
        b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
        why="could redirect the names the proxy connects to",
    )
    # cron and at: run commands on a schedule.
    guest.remove("/etc/crontab", "scheduled commands")
    for directory in (
        "/etc/cron.d",
        "/etc/cron.hourly",
        "/etc/cron.daily",
        "/etc/cron.weekly",
        "/etc/cron.monthly",
        "/etc/cron.yearly",
        "/var/spool/cron",
        "/var/spool/at",
        "/var/spool/atjobs",
    ):
        guest.empty_dir(directory, "scheduled commands", keep=(".placeholder",))
    guest.remove("/etc/anacrontab", "scheduled commands")


def _scrub_systemd_dir(guest: Guest, top: str) -> None:
    """Keep only enable links (and masks) that point at packaged units; drop local units and drop-ins."""
    if not guest.is_dir(top):
        return
    for name in guest.listdir(top):
        path = f"{top}/{name}"
        entry = guest.lstat(path)
        if entry is None:
            continue
        if stat.S_ISDIR(entry.mode) and not name.endswith(".d"):
            # foo.target.wants/, foo.service.requires/: directories of enable links.
            for link in guest.listdir(path):
                _keep_or_remove_link(guest, f"{path}/{link}")
        elif stat.S_ISLNK(entry.mode):
            _keep_or_remove_link(guest, path)
        elif stat.S_ISDIR(entry.mode):
            guest.remove(path, "unit drop-ins can change what a packaged unit runs")
        else:
            guest.remove(path, "unit written by the agent")


def _keep_or_remove_link(guest: Guest, path: str) -> None:
    entry = guest.lstat(path)
    if entry is None:
        return
    if not stat.S_ISLNK(entry.mode):
        guest.remove(path, "not an enable link")
        return
    target = posixpath.normpath(posixpath.join(posixpath.dirname(path), guest.readlink(path)))
    if target == "/dev/null" or target.startswith(PACKAGE_UNIT_DIRS):
        return
    guest.remove(path, f"enable link to a local unit ({target})")


# -- privilege bits ------------------------------------------------------------------------------


def strip_privilege_bits(guest: Guest) -> None:
    """The VM needs no setuid program and no file capability: strip all of them.

    The proxy runs as an unprivileged user and the host logs in as that user; nothing in this
    appliance legitimately changes user, so every setuid/setgid bit and every security.capability
    xattr is an escalation path and nothing else. World-writable files and directories without
    the sticky bit lose that bit too: anyone in the guest could replace what they hold.
    """
    files_by_dir: dict[str, list[str]] = {}
    for entry in guest.walk():
        mode = stat.S_IMODE(entry.mode)
        if stat.S_ISREG(entry.mode):
            parent, _, name = entry.path.rpartition("/")
            files_by_dir.setdefault(parent or "/", []).append(name)
            if mode & (stat.S_ISUID | stat.S_ISGID):
                guest.chmod(entry.path, mode & ~(stat.S_ISUID | stat.S_ISGID), f"setuid/setgid removed (was {mode:o})")
                mode &= ~(stat.S_ISUID | stat.S_ISGID)
        if (stat.S_ISREG(entry.mode) or stat.S_ISDIR(entry.mode)) and mode & 0o002 and not mode & stat.S_ISVTX:
            guest.chmod(entry.path, mode & ~0o002, f"world-writable (was {mode:o})")
    for directory, names in sorted(files_by_dir.items()):
        _strip_capabilities(guest, directory, names)


def _strip_capabilities(guest: Guest, directory: str, names: list[str]) -> None:
    for path in guest.files_with_xattr(directory, names, "security.capability"):
        guest.remove_xattr(path, "security.capability", "file capabilities grant root powers")


# -- the proxy -----------------------------------------------------------------------------------


def reset_proxy(guest: Guest, plan: ScrubPlan, proxy: ProxyIds) -> None:
    """Empty the proxy's data (the agent may have read its master key) and install the host's service."""
    guest.remove(PROXY_DATA, "the agent may have read the master key, database and WAL")
    guest.mkdir(PROXY_DATA, 0o700, proxy.uid, proxy.gid)
    if plan.proxy_config is not None:
        guest.write(
            f"{PROXY_DATA}/config.toml",
            plan.proxy_config,
            0o600,
            proxy.uid,
            proxy.gid,
            why="the host's proxy configuration",
        )
    for directory in ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"):
        guest.remove(f"{directory}/secret-proxy.service", "the agent's unit; replaced by the host's")
    guest.write("/etc/systemd/system/secret-proxy.service", guest_files.UNIT.encode(), 0o644, why="the host's unit")
    guest.mkdir("/etc/systemd/system/multi-user.target.wants", 0o755)
    link = "/etc/systemd/system/multi-user.target.wants/secret-proxy.service"
    guest.remove(link, "re-created by the host")
    guest.symlink(link, "/etc/systemd/system/secret-proxy.service", "enables the host's unit")
    guest.write("/usr/local/bin/secret-proxy", guest_files.WRAPPER.encode(), 0o755, why="the host's CLI wrapper")


def replace_kernel_modules(guest: Guest, tarball: Path | None) -> None:
    """The host boots its own kernel; the modules it may load come from the host too."""
    if tarball is None:
        return
    guest.remove("/lib/modules", "the agent's kernel modules; replaced by the host's")
    guest.tar_in(tarball, "/lib/modules", "the host's modules for its own kernel")


def replace_proxy_venv(guest: Guest, tarball: Path | None) -> None:
    if tarball is None:
        guest.findings.append(f"{PROXY_VENV} is the agent's build (not reinstalled)")
        return
    guest.remove(PROXY_VENV, "the agent's venv; replaced by one built on the host from locked wheels")
    guest.tar_in(tarball, PROXY_VENV, "the host's venv, root-owned so the proxy cannot change its own code")


def _text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()
