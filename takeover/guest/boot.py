"""The host's own kernel, initrd and kernel modules for the VM it takes over.

The agent's kernel and initrd (named in its ready file) are never used: they
run before anything we scrubbed and could undo all of it. `vm_image.boot_files`
produces a trusted kernel and initrd from Debian's packages; the modules for
that kernel come from the same Debian package, so what the guest kernel may
load is the host's too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from vm_image import debs
from vm_image.boot_files import KERNEL_APPEND, BootFiles
from vm_image.boot_files import boot_files as vm_image_boot_files

from ..errors import TakeoverError, from_vm_image
from ..host.files import check_safe_path

APT_ARCHIVES = Path("/var/cache/apt/archives")  # a .deb apt already fetched (and checked) on this host
# Drivers a VM on QEMU's virtio devices never needs; leaving them out makes the tree a
# fraction of its size (and shrinks what the guest kernel could be talked into loading).
MODULE_DIRS_LEFT_OUT = (
    "kernel/drivers/gpu",
    "kernel/drivers/net/wireless",
    "kernel/drivers/media",
    "kernel/sound",
    "kernel/drivers/infiniband",
    "kernel/drivers/staging",
    "kernel/drivers/bluetooth",
    "kernel/net/bluetooth",
    "kernel/drivers/iio",
    "kernel/drivers/hid",
    "kernel/drivers/input/touchscreen",
    "kernel/drivers/usb",
    "kernel/drivers/net/ethernet",
    "kernel/drivers/scsi",
    "kernel/drivers/isdn",
    "kernel/drivers/mtd",
    "kernel/drivers/nfc",
    "kernel/net/wireless",
    "kernel/net/mac80211",
)


class BootFilesError(TakeoverError):
    hint = "check that the Debian kernel package is available (`apt-get download linux-image-amd64` works)"


def host_boot_files(
    boot_dir: Path, kernel: Path | None = None, initrd: Path | None = None, append: str | None = None
) -> BootFiles:
    """Kernel and initrd in `boot_dir` (cached across runs), from vm_image.boot_files.

    An operator may name their own kernel and initrd instead (--kernel/--initrd): they are
    copied into the host directory, so the VM never boots from a path someone else can change.
    """
    check_safe_path(boot_dir, "boot directory")
    boot_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(boot_dir, 0o711 if os.stat(boot_dir.parent).st_mode & 0o011 else 0o700)
    if kernel is not None and initrd is not None:
        copies = []
        for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img")):
            dst = boot_dir / name
            partial = boot_dir / f".{name}.partial"
            shutil.copyfile(src, partial, follow_symlinks=True)
            os.chmod(partial, 0o644)
            os.replace(partial, dst)
            copies.append(dst)
        return BootFiles(
            copies[0],
            copies[1],
            append or KERNEL_APPEND,
            kernel_version(copies[0]),
            source=f"operator: {kernel}, {initrd}",
        )
    with from_vm_image(BootFilesError, "cannot prepare the host's kernel and initrd: "):
        provided = vm_image_boot_files(boot_dir)
    return BootFiles(
        provided.kernel,
        provided.initrd,
        append or provided.append,
        kernel_version(provided.kernel),
        source="vm_image.boot_files",
    )


def kernel_version(kernel: Path) -> str:
    """The release string (e.g. 6.1.0-56-amd64) from an x86 bzImage's setup header."""
    with open(kernel, "rb") as f:
        header = f.read(0x4000 + 0x200)
    if header[0x202:0x206] != b"HdrS":
        raise BootFilesError(f"{kernel} is not an x86 bzImage")
    offset = int.from_bytes(header[0x20E:0x210], "little") + 0x200
    with open(kernel, "rb") as f:
        f.seek(offset)
        text = f.read(256).split(b"\0")[0].decode("ascii", "replace")
    return text.split()[0]


def modules_tarball(boot: BootFiles, boot_dir: Path) -> Path:
    """A tarball of /lib/modules/VERSION for the host's kernel, from Debian's package; cached."""
    tarball = boot_dir / f"modules-{boot.version}.tar"
    if tarball.is_file():
        return tarball
    with tempfile.TemporaryDirectory(prefix=".modules-", dir=boot_dir) as tmp:
        root = Path(tmp)
        tree = _package_modules(boot.version, root)
        partial = boot_dir / f".{tarball.name}.partial"
        with tarfile.open(partial, "w") as tar:
            tar.add(tree, arcname=boot.version, filter=_module_filter(boot.version))
        os.chmod(partial, 0o600)
        os.replace(partial, tarball)
    return tarball


def _module_filter(version: str) -> Any:
    left_out = tuple(f"{version}/{d}" for d in MODULE_DIRS_LEFT_OUT)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.name.startswith(left_out):
            return None
        if info.issym() or info.islnk():
            return None  # build/ and source/ links point into headers we do not ship
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    return keep


def _package_modules(version: str, work: Path) -> Path:
    """The modules tree of linux-image-VERSION: the host's installed copy if dpkg owns it, else the .deb."""
    installed = Path("/lib/modules") / version
    owner = subprocess.run(["dpkg-query", "-S", str(installed / "modules.order")], capture_output=True, text=True)
    if owner.returncode == 0 and f"linux-image-{version}" in owner.stdout and (installed / "modules.dep").is_file():
        return installed
    with from_vm_image(BootFilesError, f"cannot get the modules of {version}: "):
        deb = debs.fetch(f"linux-image-{version}", work / "debs", also_look_in=APT_ARCHIVES)
        root = debs.unpack(deb, work / "root")
    tree = next((p for p in (root / "lib/modules" / version, root / "usr/lib/modules" / version) if p.is_dir()), None)
    if tree is None:
        raise BootFilesError(f"linux-image-{version} has no modules for {version}")
    if shutil.which("depmod") is None:
        raise BootFilesError("depmod (kmod) is not installed")
    base = root if (root / "lib/modules").is_dir() else root / "usr"
    depmod = subprocess.run(["depmod", "-b", str(base), version], capture_output=True, text=True, timeout=300)
    if depmod.returncode != 0:
        raise BootFilesError(f"depmod failed for {version}: {depmod.stderr.strip()}")
    return tree
