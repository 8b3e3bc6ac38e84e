"""The guest's base root filesystem: Debian 12 from Debian's packages, as a tarball (cached).

mmdebstrap needs no root: as an unprivileged user it works in a user namespace
(`--mode=unshare`, with Debian's uidmap). The tarball holds only packages and
settings shared by every build; what differs per build (keys, the proxy) is laid
over it by `disk.py`. A caller that needs more in its system (the benchmark's agent
machine, which runs QEMU itself) names extra packages; they change the cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import BuildFailed, MissingTool

SUITE = "bookworm"
# dbus: systemd-logind needs it, and logind is what turns the ACPI power button into a clean shutdown.
PACKAGES = ["systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "python3", "ca-certificates", "kmod"]
# Documentation, manuals and translations are a third of a minimal system; nothing in a VM reads them.
DPKG_OPTIONS = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
]
# Run inside the new system before it is packed ($1 is its root). Host keys are made per build,
# never shared between images built from this cache.
CUSTOMIZE = [
    'chroot "$1" usermod --home /home/proxy --shell /bin/bash proxy',
    'rm -f "$1"/etc/ssh/ssh_host_*',
    'chroot "$1" systemctl enable systemd-networkd.service',
    'chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer '
    "serial-getty@ttyS0.service getty@tty1.service getty-static.service e2scrub_reap.service",
    'rm -rf "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/*',
]


def inputs_key(mirror: str | None, extra_packages: Sequence[str] = ()) -> str:
    parts: list[object] = [SUITE, PACKAGES, DPKG_OPTIONS, CUSTOMIZE, mirror]
    if extra_packages:  # the proxy's own system keeps the key it always had
        parts.append(sorted(extra_packages))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def mmdebstrap_argv(mode: str, out: Path, mirror: str | None = None, extra_packages: Sequence[str] = ()) -> list[str]:
    """The mmdebstrap command that writes the root filesystem tarball `out`."""
    argv = [
        "mmdebstrap",
        f"--mode={mode}",
        "--variant=minbase",
        "--format=tar",
        "--quiet",
        "--include=" + ",".join([*PACKAGES, *sorted(extra_packages)]),
    ]
    argv += [f"--dpkgopt={opt}" for opt in DPKG_OPTIONS]
    argv += [f"--customize-hook={hook}" for hook in CUSTOMIZE]
    argv += [SUITE, str(out)]
    return [*argv, mirror] if mirror else argv


def base_rootfs(
    cache_dir: Path,
    mirror: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
    extra_packages: Sequence[str] = (),
) -> Path:
    """`cache_dir/rootfs-KEY.tar`, built with mmdebstrap when no tarball for these inputs exists.

    One cache directory keeps one tarball: a build for other inputs removes the others.
    """
    tarball = cache_dir / f"rootfs-{inputs_key(mirror, extra_packages)[:16]}.tar"
    if tarball.is_file():
        progress(f"reusing the cached root filesystem {tarball.name}")
        return tarball
    if shutil.which("mmdebstrap") is None:
        raise MissingTool("mmdebstrap is not installed (package mmdebstrap; unprivileged builds also need uidmap)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    mode = "root" if os.geteuid() == 0 else "unshare"
    partial = cache_dir / f".{tarball.name}.partial"
    argv = mmdebstrap_argv(mode, partial, mirror, extra_packages)
    progress(f"building a Debian {SUITE} root filesystem with mmdebstrap ({mode} mode; about a minute)")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        hint = (
            "as an unprivileged user, mmdebstrap needs uidmap and an /etc/subuid entry for you"
            if mode == "unshare"
            else None
        )
        raise BuildFailed(f"mmdebstrap failed: {proc.stderr.strip()[-800:]}", hint=hint)
    os.chmod(partial, 0o644)
    os.replace(partial, tarball)
    for stale in cache_dir.glob("rootfs-*.tar"):  # built for inputs that changed: 200 MB each
        if stale != tarball:
            stale.unlink()
    return tarball
