"""The image's manifest: what went in (package versions, wheel hashes) and what came out (file hashes)."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from .durable import write_atomic


def installed_packages(rootfs_tar: Path) -> dict[str, str]:
    """{package: version} from dpkg's status file inside the root filesystem tarball."""
    with tarfile.open(rootfs_tar) as tar:
        member = tar.extractfile("./var/lib/dpkg/status")
        text = member.read().decode() if member else ""
    packages: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            packages[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(packages.items()))


def tar_file_hashes(tarball: Path, prefix: str) -> dict[str, str]:
    """sha256 of every regular file in `tarball`, keyed by its path in the guest under `prefix`."""
    hashes: dict[str, str] = {}
    with tarfile.open(tarball) as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member)
                digest = hashlib.sha256(data.read()).hexdigest() if data else ""
                hashes[os.path.normpath(f"{prefix}/{member.name}")] = digest
    return dict(sorted(hashes.items()))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    # 0644: what went into the image is no secret, and whoever inspects the image may read it.
    write_atomic(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)
    return path


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing or not JSON (a manifest from an interrupted build)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
