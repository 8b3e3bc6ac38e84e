"""What the host proves of its VM over SSH: its key logs in, the host key is the pinned one, nothing else logs in.

Checked by the cut-over's first boot (inside its private network) and by step `verify`, and
used by `takeover egress sync` and `status` through the operator CLI's path in the guest (`CLI`).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import VerifyError
from ..models import Endpoint
from .ssh import SSHTarget, SSHTimeout, run_bounded

CLI = "/usr/local/bin/secret-proxy"


@dataclass(frozen=True)
class HostLogin:
    """What `check_host_login` proved: SSH as the host works, with the pinned key, and nothing else logs in."""

    seconds: float
    host_key: str
    auth_methods: list[str]


def check_host_login(ssh: SSHTarget, timeout: float, alive: Callable[[], bool]) -> HostLogin:
    """SSH with the host's key against the pinned host key; the proxy user's only key is the host's; the
    operator CLI works on the data directory and its audit chain is intact; sshd offers only publickey.

    Shared by the cut-over's first boot (in its private network) and by step 6.
    """
    ssh_s = wait_for_ssh(ssh, timeout, alive)
    shown = host_key_shown(ssh.endpoint)
    pinned = pinned_key(ssh.known_hosts)
    if shown != pinned:
        raise VerifyError(f"the VM shows host key {shown!r}, not the pinned one")
    keys = ssh.run("cat", ".ssh/authorized_keys")
    if keys.returncode != 0 or len([line for line in keys.stdout.splitlines() if line.strip()]) != 1:
        raise VerifyError(f"the proxy user's authorized_keys is not exactly the host's key: {keys.stdout!r}")
    audit = ssh.run(CLI, "audit", "verify")
    if audit.returncode != 0 or "intact" not in audit.stdout:
        raise VerifyError(
            f"`secret-proxy audit verify` failed in the VM: {(audit.stdout + audit.stderr).strip()[-300:]}"
        )
    methods = offered_methods(ssh)
    if methods != ["publickey"]:
        raise VerifyError(f"the VM's sshd offers {methods}, not only publickey")
    return HostLogin(round(ssh_s, 3), shown, methods)


def wait_for_ssh(ssh: SSHTarget, timeout: float, alive: Callable[[], bool] = lambda: True) -> float:
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < max(timeout, 30):
        try:
            result = ssh.run("true", timeout=60)
        except SSHTimeout as exc:  # a guest still booting may accept and then stall; try again
            result = subprocess.CompletedProcess([], 255, "", str(exc))
        if result.returncode == 0:
            return time.monotonic() - started
        last = result.stderr.strip()
        if "Host key verification failed" in last or "REMOTE HOST IDENTIFICATION HAS CHANGED" in last:
            raise VerifyError(f"the VM's SSH host key is not the pinned one: {last}")
        if not alive():
            raise VerifyError("the host's QEMU exited before SSH answered")
        time.sleep(2)
    raise VerifyError(f"SSH with the host's key did not work: {last}")


def host_key_shown(endpoint: Endpoint) -> str:
    result = run_bounded(["ssh-keyscan", "-T", "10", "-t", "ed25519", "-p", str(endpoint.port), endpoint.host])
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "ssh-ed25519":
            return f"{parts[1]} {parts[2]}"
    raise VerifyError(f"ssh-keyscan got no ed25519 host key from {endpoint}: {result.stderr.strip()}")


def pinned_key(known_hosts: Path) -> str:
    parts = known_hosts.read_text().split()
    return f"{parts[1]} {parts[2]}"


def offered_methods(ssh: SSHTarget) -> list[str]:
    """The authentication methods sshd offers, from a login attempt with no usable key."""
    result = run_bounded(ssh.argv("true", options=("PubkeyAuthentication=no",)))
    match = re.search(r"Permission denied \(([^)]*)\)", result.stderr)
    if result.returncode == 0 or match is None:
        raise VerifyError(f"a login without a key was not refused as expected: {result.stderr.strip()!r}")
    return match.group(1).split(",")
