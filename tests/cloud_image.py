"""A stand-in for a downloaded cloud image, built by the tests (nothing can be downloaded here).

Like Debian's genericcloud image: an MBR-partitioned disk, ext4 on the first
partition, its own kernel and initramfs booted by a bootloader (extlinux), and
cloud-init waiting for a datasource. Built once per machine as root (mmdebstrap,
then libguestfs), cached.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from vm_image import debs

from .takeover_helpers import open_appliance

CACHE = Path("/var/tmp/secret-proxy-vm-tests/cloud-base")
PACKAGES = [
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "python3",
    "cloud-init",
    "netbase",
    "sudo",
]
HOOKS = [
    'rm -f "$1"/etc/ssh/ssh_host_*',
    'echo "/dev/vda1 / ext4 rw,errors=remount-ro 0 1" > "$1"/etc/fstab',
    'echo cloud-test > "$1"/etc/hostname',
    'printf "[Match]\\nName=en*\\n\\n[Network]\\nDHCP=ipv4\\n" > "$1"/etc/systemd/network/10-en.network',
    'chroot "$1" systemctl enable systemd-networkd.service',
    'printf "datasource_list: [ NoCloud, None ]\\nnetwork: {config: disabled}\\n"'
    ' > "$1"/etc/cloud/cloud.cfg.d/90-test.cfg',
]
EXTLINUX = (
    "DEFAULT linux\nTIMEOUT 1\nLABEL linux\n  LINUX /boot/{kernel}\n  INITRD /boot/{initrd}\n"
    "  APPEND root=/dev/vda1 rw console=ttyS0 panic=-1\n"
)


def cloud_base_image() -> Path:
    key = hashlib.sha256(repr((PACKAGES, HOOKS, EXTLINUX)).encode()).hexdigest()[:12]
    image = CACHE / f"cloud-{key}.qcow2"
    if image.exists():
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        rootfs = work / "rootfs.tar"
        subprocess.run(
            [
                "mmdebstrap",
                "--mode=root",
                "--variant=minbase",
                "--quiet",
                "--include=" + ",".join(PACKAGES),
                *[f"--customize-hook={h}" for h in HOOKS],
                "bookworm",
                str(rootfs),
            ],
            check=True,
            capture_output=True,
            timeout=1800,
        )
        mbr = (
            debs.unpack(debs.fetch("syslinux-common", work / "debs"), work / "syslinux")
            / "usr/lib/syslinux/mbr/mbr.bin"
        ).read_bytes()
        partial = work / "cloud.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(partial), "3G"], check=True)
        g = open_appliance(partial)
        g.part_disk("/dev/sda", "mbr")
        g.part_set_bootable("/dev/sda", 1, True)
        g.mkfs("ext4", "/dev/sda1")
        g.mount("/dev/sda1", "/")
        g.tar_in(str(rootfs), "/")
        boot = g.ls("/boot")
        kernel = next(n for n in boot if n.startswith("vmlinuz-"))
        initrd = next(n for n in boot if n.startswith("initrd.img-"))
        g.write("/boot/extlinux.conf", EXTLINUX.format(kernel=kernel, initrd=initrd).encode())
        g.extlinux("/boot")
        g.pwrite_device("/dev/sda", mbr[:440], 0)
        g.shutdown()
        g.close()
        os.chmod(partial, 0o644)
        os.replace(partial, image)
    return image
