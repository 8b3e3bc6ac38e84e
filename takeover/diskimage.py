"""What `qemu-img` says about a disk image, and the rule for which images the host accepts.

A qcow2 header can name a backing file or an external data file by any path.
QEMU running as root on the host would open that path, so an agent could make
the "VM disk" read (or write) a host file. Only self-contained qcow2 passes.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import DiskFormatError, TakeoverError

QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    snapshots: tuple[str, ...]


def inspect_image(path: Path, *, force_share: bool = False) -> ImageInfo:
    """Check `path` is a self-contained qcow2 and return its facts; raise DiskFormatError if not.

    `force_share` reads an image a running QEMU holds locked (the preflight in step 1);
    the authoritative check is made again on the host's own copy.
    """
    if not str(path).startswith("/"):
        raise DiskFormatError(f"disk path {path} is not absolute")  # a relative "json:" name would be parsed
    argv = [QEMU_IMG, "info", "--output=json", *(["-U"] if force_share else []), "--", str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise DiskFormatError(f"qemu-img cannot read {path}: {proc.stderr.strip()[-300:]}")
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        raise TakeoverError(f"qemu-img info printed something that is not JSON for {path}") from None
    fmt = info.get("format")
    if fmt != "qcow2":
        raise DiskFormatError(f"{path} is {fmt!r}, not qcow2")
    for key in ("backing-filename", "full-backing-filename", "backing-filename-format"):
        if key in info:
            raise DiskFormatError(f"{path} has a backing file ({info[key]!r}); a backing file can point at any "
                                  f"host file, so the host does not take it over")
    data = (info.get("format-specific") or {}).get("data") or {}
    if "data-file" in data or data.get("data-file-raw"):
        raise DiskFormatError(f"{path} keeps its data in an external file ({data.get('data-file')!r}); refused")
    if data.get("corrupt"):
        raise DiskFormatError(f"{path} is marked corrupt by qemu-img")
    snapshots = tuple(str(s.get("name")) for s in info.get("snapshots") or [])
    return ImageInfo(fmt, int(info.get("virtual-size", 0)), int(info.get("actual-size", 0)), snapshots)
