"""SSH keys: the agent's setup key and the guest's host key per build, and the takeover's (takeover/host_keys.py).

ssh-keygen writes private keys 0600.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .errors import BadInput, BuildFailed, MissingTool


def ssh_keygen(path: Path, comment: str) -> None:
    if shutil.which("ssh-keygen") is None:
        raise MissingTool("ssh-keygen is not installed (package openssh-client)")
    result = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise BuildFailed(f"ssh-keygen failed: {result.stderr.strip()}")


def new_setup_key(path: Path) -> bytes:
    """A fresh key per build: the agent's way in until the host takes over. Returns the public line."""
    for old in (path, path.with_name(path.name + ".pub")):
        old.unlink(missing_ok=True)
    ssh_keygen(path, "vm_image setup key")
    return path.with_name(path.name + ".pub").read_bytes()


def new_host_key(work: Path) -> tuple[bytes, bytes]:
    """The guest's SSH host key, made per build so no two images share one.

    The private half stays only in the guest.
    """
    path = work / "ssh_host_ed25519_key"
    ssh_keygen(path, "root@secret-proxy-vm")
    private, public = path.read_bytes(), path.with_name(path.name + ".pub").read_bytes()
    path.unlink()
    return private, public


def key_fingerprint(path: Path) -> str:
    """The key's SHA256 fingerprint; BadInput when ssh-keygen cannot read it."""
    result = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0 or not result.stdout:
        raise BadInput(f"ssh-keygen cannot read {path}: {result.stderr.strip()}")
    return result.stdout.split()[1]


def fingerprint(path: Path) -> str:
    """The key's fingerprint, or "" when there is none to read."""
    try:
        return key_fingerprint(path)
    except BadInput:
        return ""
