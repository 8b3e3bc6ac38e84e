"""`vm_image build --base-image FILE`: a copy-on-write overlay on the user's cloud image, plus a NoCloud seed.

The base image is never written: QEMU writes to `image/disk.qcow2`, whose
backing file is the base image's absolute path. It boots with its own
bootloader and kernel; cloud-init installs the proxy from the seed at first boot.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import guest_files
from .cloud_init import make_seed
from .errors import BadInput, BuildFailed, MissingTool
from .keys import new_setup_key
from .layout import Layout
from .manifest import file_sha256, tar_file_hashes, write_manifest
from .proxy_venv import build_proxy_venv, locked_wheels

FORMATS = ("qcow2", "raw")


def image_info(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BadInput(f"--base-image {path} is not a file")
    try:
        result = subprocess.run(
            ["qemu-img", "info", "--output=json", "--", str(path)], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        raise MissingTool("qemu-img is not installed (package qemu-utils)") from None
    if result.returncode != 0:
        raise BadInput(f"--base-image {path}: qemu-img cannot read it: {result.stderr.strip()}")
    info: dict[str, Any] = json.loads(result.stdout)  # qemu-img's --output=json info is one object
    if info.get("format") not in FORMATS:
        raise BadInput(f"--base-image {path} is {info.get('format')!r}; use a qcow2 or raw image")
    if info["format"] == "raw":
        with open(path, "rb") as f:
            sector = f.read(512)
        if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
            raise BadInput(f"--base-image {path} is not a disk image (no partition table or boot sector)")
    if info.get("backing-filename"):
        raise BadInput(f"--base-image {path} has a backing file of its own; flatten it first (qemu-img convert)")
    return info


def prepare_base_image(layout: Layout, base: Path, note: Callable[[str], None]) -> dict[str, Any]:
    base = base.absolute()
    if "," in str(base):
        raise BadInput(f"--base-image path {base} contains a comma, which QEMU's options cannot hold")
    info = image_info(base)
    started = time.monotonic()
    venv = build_proxy_venv(layout.cache / "venv", note)
    for stale in (layout.manifest, layout.disk, layout.seed, layout.kernel, layout.initrd):
        stale.unlink(missing_ok=True)
    setup_pub = new_setup_key(layout.setup_key).decode()
    note(f"overlay on {base} ({info['format']}, {info['virtual-size'] / 2**30:.1f} GiB virtual)")
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", info["format"], str(layout.disk)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise BuildFailed(f"qemu-img create failed: {result.stderr.strip()}")
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=layout.cache) as tmp:
        note("cloud-init NoCloud seed: user-data, meta-data and the proxy's venv")
        make_seed(layout.seed, setup_pub, venv, Path(tmp))
    manifest = {
        "version": 1,
        "mode": "base-image",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
        "inputs": {
            "base_image": {"path": str(base), "format": info["format"], "sha256": file_sha256(base)},
            "wheels": locked_wheels(venv),
        },
        "files": tar_file_hashes(venv, guest_files.VENV),
        "disk": {
            "path": str(layout.disk),
            "format": "qcow2",
            "backing_file": str(base),
            "virtual_size": f"{info['virtual-size'] // 2**20}M",
            "bytes": layout.disk.stat().st_size,
        },
        "seed": {"path": str(layout.seed), "sha256": file_sha256(layout.seed)},
        "kernel": None,
        "ssh": {"setup_key": str(layout.setup_key)},
    }
    write_manifest(layout.manifest, manifest)
    return manifest
