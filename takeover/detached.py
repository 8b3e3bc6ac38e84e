"""Start a process root does not wait for: a session of its own, no terminal, output to a 0600 log.

The host's QEMU, the agent's QEMU replayed by a rollback and the egress proxy all start this way:
`start_new_session` (setsid in the child before exec) so none of them holds root's terminal or
receives its signals, stdin from /dev/null, and a log root opens without following a link.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def start_detached(
    argv: list[str],
    log_path: Path,
    *,
    env: dict[str, str],
    cwd: str | None = None,
    umask: int = -1,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    log = os.open(log_path, flags, 0o600)
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=cwd,
            env=env,
            umask=umask,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log)
