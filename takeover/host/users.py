"""The unprivileged system users root runs the host's QEMU and its egress proxy as."""

from __future__ import annotations

import pwd
import subprocess

from ..errors import RestartError


def ensure_system_user(name: str, comment: str = "secret-proxy-vm QEMU") -> None:
    """An unprivileged system user (QEMU's, the egress proxy's): created once, no home, no login."""
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    proc_ = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            comment,
            name,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc_.returncode != 0:
        raise RestartError(
            f"cannot create the system user {name!r} ({comment}): {proc_.stderr.strip()}",
            hint="create it yourself (useradd --system) or pass --qemu-user root",
        )
