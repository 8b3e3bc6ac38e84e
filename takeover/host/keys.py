"""The host's keys: the VM's new SSH host key (pinned), and the host's own login key.

Both are generated on the host by ssh-keygen in a private (0700) temporary
directory, so no key ever exists where another user could read it, and the
agent, which built the VM, never sees either.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vm_image import keys

from ..errors import HostKeyError, from_vm_image
from ..models import Endpoint
from .files import write_atomic

HOST_KEY = "host_key"
KNOWN_HOSTS = "known_hosts"


@dataclass(frozen=True)
class HostKeys:
    vm_host_private: bytes  # goes into the guest as /etc/ssh/ssh_host_ed25519_key, never kept on the host
    vm_host_public: str
    vm_host_fingerprint: str
    login_key: Path  # host_dir/host_key, 0600
    login_public: str
    login_fingerprint: str
    known_hosts: Path

    def to_dict(self) -> dict[str, str]:
        return {
            "vm_host_key_fingerprint": self.vm_host_fingerprint,
            "vm_host_public_key": self.vm_host_public,
            "login_key": str(self.login_key),
            "login_public_key": self.login_public,
            "login_key_fingerprint": self.login_fingerprint,
            "known_hosts": str(self.known_hosts),
        }


def generate_host_keys(host_dir: Path, ssh: Endpoint) -> HostKeys:
    """New keys for this takeover; replaces the host's login key and the pinned known_hosts entry."""
    if shutil.which("ssh-keygen") is None:
        raise HostKeyError("ssh-keygen is not installed")
    with tempfile.TemporaryDirectory(prefix=".keys-", dir=host_dir) as tmp:
        os.chmod(tmp, 0o700)
        work = Path(tmp)
        _keygen(work / "vm_host", "secret-proxy-vm host key")
        _keygen(work / "login", "secret-proxy-vm host login")
        vm_private = (work / "vm_host").read_bytes()
        vm_public = (work / "vm_host.pub").read_text().strip()
        login_public = (work / "login.pub").read_text().strip()
        # The private key never exists anywhere but 0700 directories and 0600 files.
        write_atomic(host_dir / HOST_KEY, (work / "login").read_bytes())
        write_atomic(host_dir / (HOST_KEY + ".pub"), (login_public + "\n").encode())
        vm_fp = fingerprint(work / "vm_host.pub")
        login_fp = fingerprint(host_dir / (HOST_KEY + ".pub"))
    known_hosts = host_dir / KNOWN_HOSTS
    key_type, key_b64 = vm_public.split()[:2]
    write_atomic(known_hosts, f"{known_hosts_name(ssh)} {key_type} {key_b64}\n".encode())
    return HostKeys(
        vm_private, f"{key_type} {key_b64}", vm_fp, host_dir / HOST_KEY, login_public, login_fp, known_hosts
    )


def new_vm_host_key(host_dir: Path, ssh: Endpoint, known_hosts: Path) -> HostKeys:
    """A new host key for a VM the host rebuilt (`takeover upgrade`), pinned in `known_hosts`, not yet in use.

    The host's login key is kept: it is the host's, never in the guest but as a public key. The
    VM's key is new because the host never keeps a VM's private key; the pin takes effect when the
    upgrade swaps `known_hosts` in with the new disk.
    """
    if shutil.which("ssh-keygen") is None:
        raise HostKeyError("ssh-keygen is not installed")
    login_key, _ = load_host_keys(host_dir)
    login_public = (host_dir / (HOST_KEY + ".pub")).read_text().strip()
    with tempfile.TemporaryDirectory(prefix=".keys-", dir=host_dir) as tmp:
        os.chmod(tmp, 0o700)
        work = Path(tmp)
        _keygen(work / "vm_host", "secret-proxy-vm host key")
        vm_private = (work / "vm_host").read_bytes()
        vm_public = (work / "vm_host.pub").read_text().strip()
        vm_fp = fingerprint(work / "vm_host.pub")
    key_type, key_b64 = vm_public.split()[:2]
    write_atomic(known_hosts, f"{known_hosts_name(ssh)} {key_type} {key_b64}\n".encode())
    login_fp = fingerprint(host_dir / (HOST_KEY + ".pub"))
    return HostKeys(vm_private, f"{key_type} {key_b64}", vm_fp, login_key, login_public, login_fp, known_hosts)


def known_hosts_name(ssh: Endpoint) -> str:
    # ssh looks a host up as "[host]:port", except on port 22 where it uses the bare host.
    return ssh.host if ssh.port == 22 else f"[{ssh.host}]:{ssh.port}"


def load_host_keys(host_dir: Path) -> tuple[Path, Path]:
    """The login key and pinned known_hosts of an earlier run."""
    key, known = host_dir / HOST_KEY, host_dir / KNOWN_HOSTS
    if not key.is_file() or not known.is_file():
        raise HostKeyError(
            f"{key} or {known} is missing; the scrub step creates them",
            hint="rerun `python -m takeover run`; it redoes the scrub from a fresh copy",
        )
    return key, known


def _keygen(path: Path, comment: str) -> None:
    with from_vm_image(HostKeyError):
        keys.ssh_keygen(path, comment)


def fingerprint(public_key: Path) -> str:
    with from_vm_image(HostKeyError):
        return keys.key_fingerprint(public_key)
