"""The host's own SSH login to its VM: the host key pinned, strict checking, every command bounded in time.

Used by step 6 (verify), by `takeover egress sync` (the VM's policies) and by the demo and the
bench; the command line itself is vm_image's (`ssh_argv`).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vm_image.ssh_command import ssh_argv

from ..errors import VerifyError
from ..models import Endpoint


@dataclass(frozen=True)
class SSHTarget:
    endpoint: Endpoint
    key: Path
    known_hosts: Path
    user: str = "proxy"

    def argv(self, *remote: str, key: Path | None = None, options: tuple[str, ...] = ()) -> list[str]:
        pinned = (
            "BatchMode=yes",
            "StrictHostKeyChecking=yes",
            f"UserKnownHostsFile={self.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "HostKeyAlgorithms=ssh-ed25519",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "ConnectTimeout=10",
            "LogLevel=ERROR",
        )
        host, port = self.endpoint.host, self.endpoint.port
        return ssh_argv(host, port, self.user, remote, options=(*pinned, *options), key=key or self.key)

    def run(self, *remote: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_bounded(self.argv(*remote), timeout)


class SSHTimeout(VerifyError):
    """An ssh or ssh-keyscan that did not finish in time (the guest accepted but never answered)."""


def run_bounded(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SSHTimeout(f"`{argv[0]}` to the VM did not finish within {timeout:.0f} s") from None


def which_ssh() -> None:
    for tool in ("ssh", "ssh-keyscan"):
        if shutil.which(tool) is None:
            raise VerifyError(f"{tool} is not installed on the host", hint="apt-get install openssh-client")
