"""SSH keys made per build: the agent's setup key and the guest's host key (ssh-keygen writes private keys 0600)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .errors import BuildFailed, MissingTool


def ssh_keygen(path: Path, comment: str) -> None:
    if shutil.which("ssh-keygen") is None:
        raise MissingTool("ssh-keygen is not installed (package openssh-client)")
    result = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise BuildFailed(f"ssh-keygen failed: {result.stderr.strip()}")


def new_setup_key(path: Path) -> bytes:
    """A fresh key per build: the agent's way in until the host takes over. Returns the public line."""
    for old in (path, path.with_name(path.name + ".pub")):
        old.unlink(missing_ok=True)
    ssh_keygen(path, "vm_image setup key")
    return path.with_name(path.name + ".pub").read_bytes()


def new_host_key(work: Path) -> tuple[bytes, bytes]:
    """The guest's SSH host key, made per build so no two images share one (the private half stays only in the guest)."""
    path = work / "ssh_host_ed25519_key"
    ssh_keygen(path, "root@secret-proxy-vm")
    private, public = path.read_bytes(), path.with_name(path.name + ".pub").read_bytes()
    path.unlink()
    return private, public


def fingerprint(path: Path) -> str:
    result = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, timeout=30)
    return result.stdout.split()[1] if result.returncode == 0 and result.stdout else ""
