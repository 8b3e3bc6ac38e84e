"""The guest's disk: the cached base root filesystem, this build's files over it, as a sparse qcow2.

Files in the image must belong to root and to `proxy` (uid 13). An unprivileged
user cannot create such files, so the unpacking and `mke2fs -d` run inside a
user namespace where that user is root and owns a range of subordinate ids
(`unshare --map-auto --map-root-user`, util-linux); as real root they run as is.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from . import guest_files as gf
from .errors import BuildFailed, MissingTool

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

ASSEMBLE = """set -eu
umask 022
root="$1/root"
mkdir "$root"
tar -xpf "$2" -C "$root" --numeric-owner --exclude='./dev/*'
tar -xpf "$3" -C "$root" --numeric-owner
"$6" -q -F -t ext4 -L secret-proxy -d "$root" "$4" "$5"
rm -rf "$root"
"""


@dataclass(frozen=True)
class Overlay:
    """What one build lays over the base: the proxy, its service, the keys."""

    venv_tar: Path
    setup_key_pub: bytes
    host_key: bytes
    host_key_pub: bytes


class TarWriter:
    """Entries with explicit owners and modes: nothing depends on who runs the build."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar

    def add(self, path: str, mode: int, data: bytes | None = None, owner: int = 0, link: str | None = None) -> None:
        info = tarfile.TarInfo("./" + path.lstrip("/"))
        info.mode, info.uid, info.gid = mode, owner, owner
        if link is not None:
            info.type, info.linkname = tarfile.SYMTYPE, link
            self.tar.addfile(info)
        elif data is None:
            info.type = tarfile.DIRTYPE
            self.tar.addfile(info)
        else:
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))


def _system_files(w: TarWriter) -> None:
    """What every guest of ours has over the base: identity, network, the proxy's service, its user's dirs."""
    w.add("/etc/hostname", 0o644, gf.HOSTNAME.encode())
    w.add("/etc/hosts", 0o644, gf.HOSTS.encode())
    w.add("/etc/fstab", 0o644, gf.FSTAB.encode())
    w.add("/etc/systemd/network/10-virtio.network", 0o644, gf.NETWORK.encode())
    w.add("/etc/ssh/sshd_config.d/10-secret-proxy.conf", 0o644, gf.SSHD_DROPIN.encode())
    w.add("/etc/systemd/system/secret-proxy.service", 0o644, gf.UNIT.encode())
    w.add(
        "/etc/systemd/system/multi-user.target.wants/secret-proxy.service",
        0o777,
        link="/etc/systemd/system/secret-proxy.service",
    )
    w.add("/usr/local/bin/secret-proxy", 0o755, gf.WRAPPER.encode())
    w.add(gf.PROXY_HOME, 0o750, owner=gf.PROXY_UID)
    w.add(gf.PROXY_HOME + "/.ssh", 0o700, owner=gf.PROXY_UID)
    w.add(gf.DATA_DIR, 0o700, owner=gf.PROXY_UID)
    w.add(os.path.dirname(gf.VENV), 0o755)


def write_system_overlay(out: Path) -> Path:
    """The files of our guest without keys or venv: for the host, which adds its own of those."""
    with tarfile.open(out, "w") as tar:
        _system_files(TarWriter(tar))
    return out


def write_overlay(overlay: Overlay, out: Path) -> Path:
    with tarfile.open(out, "w") as tar:
        w = TarWriter(tar)
        _system_files(w)
        w.add("/etc/ssh/ssh_host_ed25519_key", 0o600, overlay.host_key)
        w.add("/etc/ssh/ssh_host_ed25519_key.pub", 0o644, overlay.host_key_pub)
        w.add(gf.PROXY_HOME + "/.ssh/authorized_keys", 0o600, overlay.setup_key_pub, owner=gf.PROXY_UID)
        with tarfile.open(overlay.venv_tar) as venv:
            for member in venv.getmembers():
                data = venv.extractfile(member) if member.isfile() else None
                member.name = "./" + os.path.normpath(gf.VENV.lstrip("/") + "/" + member.name)
                tar.addfile(member, data)
    return out


def assemble_disk(base: Path, overlay_tar: Path, work: Path, out: Path, size: str = "2G") -> Path:
    """An ext4 filesystem of base + overlay over the whole disk, converted to a sparse qcow2 at `out`."""
    mke2fs = shutil.which("mke2fs", path=SBIN_PATH)
    if mke2fs is None:
        raise MissingTool("mke2fs is not installed (package e2fsprogs)")
    if shutil.which("qemu-img") is None:
        raise MissingTool("qemu-img is not installed (package qemu-utils)")
    raw = work / "disk.raw"
    argv = ["sh", "-c", ASSEMBLE, "assemble", str(work), str(base), str(overlay_tar), str(raw), size, mke2fs]
    if os.geteuid() != 0:
        if shutil.which("unshare") is None:
            raise MissingTool("unshare is not installed (package util-linux)")
        argv = ["unshare", "--map-auto", "--map-root-user", "--", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise BuildFailed(
            f"assembling the disk failed: {proc.stderr.strip()[-800:]}",
            hint="as an unprivileged user this needs an /etc/subuid and /etc/subgid entry "
            "(useradd makes one; see `man subuid`)"
            if os.geteuid()
            else None,
        )
    partial = out.with_name(f".{out.name}.partial")
    convert = subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(partial)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    raw.unlink(missing_ok=True)
    if convert.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildFailed(f"qemu-img convert failed: {convert.stderr.strip()}")
    os.replace(partial, out)
    return out
