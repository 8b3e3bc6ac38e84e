"""`python -m takeover rollback`: bring the agent's VM back from `takeover-checkpoint`.

`loadvm` needs the same devices the snapshot was saved with, so the agent's
QEMU is started again with its own command line, recorded from
/proc/PID/cmdline in step 1. That command line is the agent's: it is replayed
only with the host's QEMU binary and only as the agent's own uid, gid and
groups (setpriv, no new privileges), so it can do nothing the agent could not
already do by running it itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from .errors import RollbackError, UnsafeCommandLine
from .models import CHECKPOINT_TAG, SourceVM

QEMU_BINARY = re.compile(r"^qemu-system-x86_64$")
# Options whose effect must not survive into the replay: an old snapshot or migration
# stream would replace the checkpoint, and a paused start would never answer /health.
STRIPPED_WITH_VALUE = {"-loadvm", "-incoming"}
STRIPPED_FLAGS = {"-S"}
HEALTH_TIMEOUT = 300.0


def replay_command(cmdline: list[str], disk: str, disk_as_named: str | Path | None = None) -> list[str]:
    """The agent's QEMU command line, checked and rewritten to load the checkpoint.

    Raises UnsafeCommandLine when it cannot be replayed: not QEMU x86_64, or not using the disk.
    """
    if len(cmdline) < 2:
        raise UnsafeCommandLine("the source QEMU's command line is empty")
    if not QEMU_BINARY.match(os.path.basename(cmdline[0])):
        raise UnsafeCommandLine(f"the source process is {os.path.basename(cmdline[0])!r}, not qemu-system-x86_64")
    host_qemu = shutil.which("qemu-system-x86_64")
    if host_qemu is None:
        raise UnsafeCommandLine("qemu-system-x86_64 is not installed on the host")
    names = {disk, str(disk_as_named)} if disk_as_named else {disk}
    if not any(name in arg for arg in cmdline[1:] for name in names):
        raise UnsafeCommandLine(f"the source QEMU's command line does not name the disk {disk}; it cannot "
                                f"be replayed for a rollback")
    args, skip = [], False
    for arg in cmdline[1:]:
        if skip:
            skip = False
            continue
        option = "-" + arg.lstrip("-") if arg.startswith("-") else arg
        if option in STRIPPED_WITH_VALUE:
            skip = True
            continue
        if option.split("=", 1)[0] in STRIPPED_WITH_VALUE:
            continue  # --loadvm=tag
        if option in STRIPPED_FLAGS:
            continue
        args.append(arg)
    return [host_qemu, *args, "-loadvm", CHECKPOINT_TAG]


def start_source_vm(source: SourceVM, log_path: Path, load_checkpoint: bool = True) -> subprocess.CompletedProcess | None:
    """Start the agent's QEMU again as the agent; returns after QEMU daemonized (or was detached)."""
    argv = replay_command(source.cmdline, source.disk)
    if not load_checkpoint:
        argv = argv[:-2]
    if source.uid != 0:
        groups = ",".join(str(g) for g in source.groups) or None
        argv = ["setpriv", f"--reuid={source.uid}", f"--regid={source.gid}",
                *([f"--groups={groups}"] if groups else ["--clear-groups"]),
                "--no-new-privs", "--inh-caps=-all", "--", *argv]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/"}
    daemonizes = "-daemonize" in source.cmdline or "--daemonize" in source.cmdline
    cwd = source.cwd if os.path.isdir(source.cwd) else "/"
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if daemonizes:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd, env=env,
                                  timeout=300)
            if proc.returncode != 0:
                raise RollbackError(f"the agent's QEMU did not start again (exit {proc.returncode}): "
                                    f"{_tail(log_path)}")
            return proc
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd, env=env,
                                 start_new_session=True)
        time.sleep(2)
        if child.poll() is not None:
            raise RollbackError(f"the agent's QEMU exited at once (exit {child.returncode}): {_tail(log_path)}")
        return None
    finally:
        os.close(log)


def wait_for_health(url: str, timeout: float = HEALTH_TIMEOUT, alive: Callable[[], bool] = lambda: True) -> float:
    """Poll `url`/health until it answers 200; returns the seconds it took."""
    import urllib.request

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        if not alive():
            break
        time.sleep(1)
    raise TimeoutError(f"{url}/health did not answer within {timeout:.0f} s")


def _tail(path: Path, limit: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip() or "(no output)"
    except OSError:
        return "(no output)"
