"""The kernel and initrd a guest boots with, from Debian's packages (never from inside the guest).

Used by `vm_image build` for the agent's VM and by `takeover` for the host's:
the host builds its own copy and never boots what the agent supplied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import debs
from .initrd import INIT, build_initrd, module_closure

# Debian's cloud kernel: made for VMs, a quarter of the generic kernel's modules.
KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# button + evdev: the ACPI power button, so `system_powerdown` (vm_image stop) shuts the guest down cleanly.
MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "button", "evdev"]
# panic=-1 with QEMU's -no-reboot: a guest that cannot boot ends its QEMU instead of hanging.
KERNEL_APPEND = "root=/dev/vda rw console=ttyS0 panic=-1"


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    append: str
    # boot_files(): the kernel package, e.g. linux-image-6.1.0-56-cloud-amd64 6.1.192-2;
    # the takeover's: the kernel's own release string, e.g. 6.1.0-56-cloud-amd64.
    version: str
    key: str = ""  # boot_files(): hash of every input: same key, same files
    source: str = ""  # the takeover's: where they came from, for its journal and report

    def to_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BootFiles:
        return cls(
            Path(data["kernel"]),
            Path(data["initrd"]),
            data["append"],
            data["version"],
            data.get("key", ""),
            data.get("source", ""),
        )


def boot_files(out_dir: Path, progress: Callable[[str], None] = lambda _: None) -> BootFiles:
    """`out_dir/vmlinuz` and `out_dir/initrd.img` for the current Debian kernel; cached by package version."""
    out_dir.mkdir(parents=True, exist_ok=True)
    package = debs.depends_on(KERNEL_PACKAGE, "linux-image-")
    version = f"{package} {debs.candidate_version(package)}"
    busybox_version = debs.candidate_version(BUSYBOX_PACKAGE)
    key = hashlib.sha256(json.dumps([version, busybox_version, MODULES, INIT, KERNEL_APPEND]).encode()).hexdigest()
    kernel, initrd, stamp = out_dir / "vmlinuz", out_dir / "initrd.img", out_dir / "boot.json"
    result = BootFiles(kernel, initrd, KERNEL_APPEND, version, key)
    if stamp.is_file() and kernel.is_file() and initrd.is_file():
        if json.loads(stamp.read_text()).get("key") == key:
            return result
    progress(f"fetching {package} and {BUSYBOX_PACKAGE} from Debian")
    with tempfile.TemporaryDirectory(prefix=".boot-", dir=out_dir) as tmp:
        work = Path(tmp)
        kernel_tree = debs.unpack(debs.fetch(package, work / "debs"), work / "kernel")
        busybox_tree = debs.unpack(debs.fetch(BUSYBOX_PACKAGE, work / "debs"), work / "busybox")
        vmlinuz = next((kernel_tree / "boot").glob("vmlinuz-*"))
        modules_dir = next(p for p in (kernel_tree / "lib/modules", kernel_tree / "usr/lib/modules") if p.is_dir())
        modules = module_closure(next(modules_dir.iterdir()), MODULES)
        progress(f"building the initrd ({len(modules)} modules, busybox)")
        build_initrd(busybox_tree / "bin/busybox", modules, work / "initrd.img")
        shutil.copyfile(vmlinuz, work / "vmlinuz")
        for name in ("vmlinuz", "initrd.img"):
            os.chmod(work / name, 0o644)
            os.replace(work / name, out_dir / name)
    stamp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
