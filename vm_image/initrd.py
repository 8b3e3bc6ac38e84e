"""A minimal initrd: static busybox, the virtio drivers, and a ten-line init.

Debian's own initramfs would need the kernel's whole module tree in the guest
and takes seconds more to boot under TCG. This one loads exactly the drivers a
QEMU guest on virtio needs, mounts the root disk and hands over to its systemd.
It is built from Debian's busybox-static and kernel packages, on the build side.
"""

from __future__ import annotations

import gzip
import io
import stat
from pathlib import Path

INIT = """#!/bin/busybox sh
# The initrd's init: load the virtio drivers, mount the root disk, hand over to its systemd.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
    insmod "/modules/$m" 2>/dev/null || echo "initrd: cannot load $m"
done
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=/dev/*) root="${arg#root=}" ;; esac
done
i=0
while [ ! -b "$root" ] && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
    echo "initrd: cannot mount the root disk $root; powering off"
    sleep 1
    poweroff -f
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
"""


def module_closure(modules_dir: Path, wanted: list[str]) -> list[Path]:
    """`wanted` modules and everything they depend on, in load order (dependencies first)."""
    index = {p.name.removesuffix(".ko").replace("-", "_"): p for p in modules_dir.rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        path = index.get(key)
        if path is None or path in order:
            return  # built into the kernel (or already queued)
        if key in chain:
            raise ValueError(f"module dependency cycle: {' -> '.join(chain + (key,))}")
        for dep in _depends(path):
            visit(dep, chain + (key,))
        order.append(path)

    for name in wanted:
        if name.replace("-", "_") not in index and not _builtin(modules_dir, name):
            raise FileNotFoundError(f"kernel module {name} is neither built in nor in {modules_dir}")
        visit(name, ())
    return order


def _depends(ko: Path) -> list[str]:
    """The `depends=` entry of the module's .modinfo section (NUL-separated key=value strings)."""
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + len(b"\0depends=") : data.index(b"\0", at + 1)].decode()
    return [d for d in value.split(",") if d]


def _builtin(modules_dir: Path, name: str) -> bool:
    builtin = modules_dir / "modules.builtin"
    key = name.replace("-", "_")
    return builtin.is_file() and any(
        Path(line).name.removesuffix(".ko").replace("-", "_") == key for line in builtin.read_text().split()
    )


def build_initrd(busybox: Path, modules: list[Path], out: Path) -> Path:
    """Write a gzipped newc cpio archive with /init, /bin/busybox and the modules, in order."""
    archive = _Cpio()
    for directory in ("bin", "modules", "dev", "proc", "sys", "newroot"):
        archive.add(directory, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.add("init", stat.S_IFREG | 0o755, INIT.encode())
    archive.add("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())
    for path in modules:
        archive.add(f"modules/{path.name}", stat.S_IFREG | 0o644, path.read_bytes())
    archive.add("modules.order", stat.S_IFREG | 0o644, "".join(p.name + "\n" for p in modules).encode())
    partial = out.with_name(f".{out.name}.partial")
    with open(partial, "wb") as f:
        # mtime=0: the same inputs give the same bytes, so the manifest's hash is reproducible.
        with gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(archive.finish())
    partial.replace(out)
    return out


class _Cpio:
    """The SVR4 "newc" format the kernel unpacks: a 110-byte ASCII header, name, data, 4-byte padding."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % v for v in fields) + encoded)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.buf.getvalue()
