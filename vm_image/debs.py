"""Debian packages fetched as files and unpacked without installing them (no root needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .errors import BuildFailed, MissingTool

# Package names come from our own code, never from user input; still, nothing odd reaches apt.
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789+-.:")


def candidate_version(package: str) -> str:
    """The version apt would fetch now, so caches can be keyed by it."""
    _check_name(package)
    out = _run(["apt-cache", "policy", package]).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise BuildFailed(
        f"apt knows no installable version of {package}", hint="run `apt-get update` as root, then try again"
    )


def depends_on(package: str, prefix: str) -> str:
    """The first dependency of a metapackage whose name starts with `prefix` (the real kernel package)."""
    _check_name(package)
    for line in _run(["apt-cache", "depends", package]).stdout.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith(prefix):
            return name
    raise BuildFailed(f"{package} depends on no {prefix}* package")


def fetch(package: str, dest: Path, also_look_in: Path | None = None) -> Path:
    """Download `package`'s .deb into `dest` (or reuse one already there, or in `also_look_in`)."""
    _check_name(package)
    dest.mkdir(parents=True, exist_ok=True)
    for where in (dest, also_look_in):
        existing = sorted(where.glob(f"{package}_*.deb")) if where else []
        if existing:
            return existing[-1]
    _run(["apt-get", "download", "-q", package], cwd=dest)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if not found:
        raise BuildFailed(f"apt-get download {package} produced no .deb in {dest}")
    return found[-1]


def unpack(deb: Path, dest: Path) -> Path:
    if shutil.which("dpkg-deb") is None:
        raise MissingTool("dpkg-deb is not installed (package dpkg)")
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def _check_name(package: str) -> None:
    if not package or not set(package) <= _NAME_CHARS or package.startswith("-"):
        raise ValueError(f"not a Debian package name: {package!r}")


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise MissingTool(f"{argv[0]} is not installed (package apt)")
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=900)
    if proc.returncode != 0:
        raise BuildFailed(f"`{' '.join(argv)}` failed: {proc.stderr.strip()[-400:]}")
    return proc
