"""The unprivileged system users root runs the host's QEMU and its egress proxy as.

A user a run creates is recorded in its host directory (`users.json`), so that `takeover remove`
deletes exactly those and never one that was there before (another host VM's, or the operator's).
"""

from __future__ import annotations

import json
import pwd
import subprocess
from pathlib import Path

from ..errors import RestartError
from .files import write_json_atomic

USERS_NAME = "users.json"  # the system users this host directory's runs created


def ensure_system_user(name: str, comment: str = "secret-proxy-vm QEMU", *, host_dir: Path | None = None) -> bool:
    """An unprivileged system user (QEMU's, the egress proxy's): created once, no home, no login.
    True if this call created it; then it is recorded in `host_dir` (when given) for `takeover remove`."""
    try:
        pwd.getpwnam(name)
        return False
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
    if host_dir is not None:
        # Recorded after useradd: a crash between the two leaves a user behind, never removes a stranger's.
        write_json_atomic(host_dir / USERS_NAME, {"created": sorted({*created_users(host_dir), name})})
    return True


def created_users(host_dir: Path) -> list[str]:
    """The users this host directory's runs created (users.json), oldest record first; [] if none."""
    try:
        data = json.loads((host_dir / USERS_NAME).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise RestartError(
            f"{host_dir / USERS_NAME} is unreadable: {exc}",
            hint=f"read it, delete the users it names yourself (userdel), then remove {host_dir / USERS_NAME}",
        ) from None
    names = data.get("created") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RestartError(f"{host_dir / USERS_NAME} does not list user names", hint="read it and fix it by hand")
    return list(names)


def delete_user(name: str) -> str | None:
    """userdel NAME (its group goes with it); None when done, else why it stays (e.g. a process of its own).
    No pkill: a user still running something is someone's, and stays."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        return None  # gone already
    done = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=60)
    return None if done.returncode == 0 else (done.stderr.strip() or f"userdel exited {done.returncode}")
