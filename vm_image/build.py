"""`vm_image build`: the agent's guest image, from Debian's packages and the locked wheels, offline-bootable.

Steps: kernel and initrd → base root filesystem (cached) → the proxy's venv
(cached) → keys for this build → disk → manifest. Inputs that did not change
since the last build give back the same image without rebuilding it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import guest_files, proc
from .base_image import prepare_base_image
from .boot_files import boot_files
from .disk import Overlay, assemble_disk, write_overlay
from .errors import BadInput
from .keys import fingerprint, new_host_key, new_setup_key
from .layout import Layout
from .manifest import file_sha256, installed_packages, read_json, tar_file_hashes, write_manifest
from .progress import Steps
from .proxy_venv import build_proxy_venv, locked_wheels
from .rootfs import SUITE, base_rootfs

MANIFEST_VERSION = 1


def build(
    layout: Layout,
    *,
    mirror: str | None = None,
    disk_size: str = "2G",
    force: bool = False,
    base_image: Path | None = None,
    steps: Steps | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the image in `layout.image`; returns its manifest."""
    steps = steps or Steps(total=5)
    _check_disk_size(disk_size)
    layout.make_dirs()
    running = proc.running_qemu(layout.pidfile)
    if running:
        raise BadInput(
            f"the VM (pid {running}) is running from {layout.disk}", hint="stop it first: python -m vm_image stop"
        )
    if base_image is not None:
        with steps.step(f"overlay and cloud-init seed for {base_image.name}") as note:
            return prepare_base_image(layout, base_image, note)
    started = time.monotonic()
    with steps.step("kernel and initrd from Debian's packages") as note:
        boot = boot_files(layout.cache / "boot", note)
    with steps.step("Debian root filesystem (cached after the first build)") as note:
        rootfs = base_rootfs(layout.cache, mirror, note)
    with steps.step("the proxy's venv from uv.lock (hash-checked wheels)") as note:
        venv = build_proxy_venv(layout.cache / "venv", note)
    key = _inputs_key(boot.key, rootfs.name, venv.name, disk_size)
    previous = read_json(layout.manifest)
    if not force and previous.get("inputs_key") == key and _outputs_present(layout):
        with steps.step("image") as note:
            note(f"inputs unchanged: reusing {layout.disk} (pass --force to rebuild with a new setup key)")
        return previous
    with steps.step("disk: base + proxy + this build's keys → qcow2") as note:
        for stale in (layout.manifest, layout.disk):
            stale.unlink(missing_ok=True)
        setup_pub = new_setup_key(layout.setup_key)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=layout.cache) as tmp:
            work = Path(tmp)
            host_key, host_pub = new_host_key(work)
            overlay = write_overlay(Overlay(venv, setup_pub, host_key, host_pub), work / "overlay.tar")
            note(f"assembling a {disk_size} ext4 filesystem and converting it to qcow2")
            assemble_disk(rootfs, overlay, work, layout.disk, disk_size)
        for src, dst in ((boot.kernel, layout.kernel), (boot.initrd, layout.initrd)):
            shutil.copyfile(src, dst)
        (layout.image / "host_key.pub").write_bytes(host_pub)
    manifest = {
        "version": MANIFEST_VERSION,
        "inputs_key": key,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
        "inputs": {
            "suite": SUITE,
            "debian_packages": installed_packages(rootfs),
            "kernel": boot.version,
            "wheels": locked_wheels(venv),
        },
        "files": tar_file_hashes(venv, guest_files.VENV),
        "disk": {
            "path": str(layout.disk),
            "format": "qcow2",
            "virtual_size": disk_size,
            "bytes": layout.disk.stat().st_size,
            "sha256": file_sha256(layout.disk),
        },
        "kernel": {"path": str(layout.kernel), "sha256": file_sha256(layout.kernel), "append": boot.append},
        "initrd": {"path": str(layout.initrd), "sha256": file_sha256(layout.initrd)},
        "ssh": {
            "setup_key": str(layout.setup_key),
            "setup_key_fingerprint": fingerprint(layout.setup_key),
            "host_key_fingerprint": fingerprint(layout.image / "host_key.pub"),
        },
    }
    write_manifest(layout.manifest, manifest)
    return manifest


def _inputs_key(*parts: str) -> str:
    texts = [
        guest_files.UNIT,
        guest_files.WRAPPER,
        guest_files.NETWORK,
        guest_files.SSHD_DROPIN,
        guest_files.FSTAB,
        guest_files.HOSTS,
        str(MANIFEST_VERSION),
    ]
    return hashlib.sha256(json.dumps([*parts, *texts]).encode()).hexdigest()


def _outputs_present(layout: Layout) -> bool:
    return all(p.is_file() for p in (layout.disk, layout.kernel, layout.initrd, layout.setup_key))


def _check_disk_size(size: str) -> None:
    number, unit = size[:-1], size[-1:]
    if (
        unit not in ("M", "G")
        or not number.isdigit()
        or not (512 <= int(number) * (1024 if unit == "G" else 1) <= 65536)
    ):
        raise BadInput(f"disk size {size!r} is not between 512M and 64G (write it like 2G or 1536M)")
