"""Start the agent's own QEMU again, as the agent, for `rollback` (rollback.py).

`loadvm` needs the same devices the snapshot was saved with, so the agent's
QEMU is started again with its own command line, recorded from
/proc/PID/cmdline in step 1. That command line is the agent's, and root
starts it from root's terminal, so the replay is fenced three ways:

- only options vm_image itself writes, every path a file of the agent's
  (agent/cmdline.py); checked in step 1, before anything changes, and again here;
- the host's QEMU binary, as the agent's own uid, gid and groups, with no new
  privileges and no capabilities (setpriv);
- nothing of root's session: a new session with no controlling terminal (the
  agent can ptrace a process of its own uid, and with a terminal it could read
  root's keys or push input into root's shell with TIOCSTI), no descriptor but
  /dev/null and a pipe (root copies it to the log, at most 1 MiB, while QEMU
  starts, then closes its end: host/detached.py), a clean environment, and the
  agent's own directory as its working directory.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

from vm_image.qemu_binary import QEMU, find_qemu
from vm_image.shutdown import kill_group

from ..errors import RollbackError, UnsafeCommandLine
from ..host.detached import LogDrain, start_drained
from ..host.terminal import log_tail
from ..models import CHECKPOINT_TAG, SourceVM
from .cmdline import check_options

QEMU_BINARY = re.compile(r"^qemu-system-x86_64$")
# Options whose effect must not survive into the replay: an old snapshot or migration
# stream would replace the checkpoint, and a paused start would never answer /health.
STRIPPED_WITH_VALUE = {"-loadvm", "-incoming"}
STRIPPED_FLAGS = {"-S"}
START_TIMEOUT = 300.0  # a daemonizing QEMU returns once the checkpoint is loaded
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def replay_command(cmdline: list[str], disk: str, disk_as_named: str | Path | None = None, *, owner: int) -> list[str]:
    """The agent's QEMU command line, checked and rewritten to load the checkpoint.

    `owner` is the agent's uid (the QEMU process's): every file the command line names must be
    theirs. Raises UnsafeCommandLine when it cannot be replayed: not QEMU x86_64, an option
    outside the allow-list (agent/cmdline.py), or no -drive with the disk.
    """
    if len(cmdline) < 2:
        raise UnsafeCommandLine("the source QEMU's command line is empty")
    if not QEMU_BINARY.match(os.path.basename(cmdline[0])):
        raise UnsafeCommandLine(f"the source process is {os.path.basename(cmdline[0])!r}, not {QEMU}")
    host_qemu = find_qemu()
    if host_qemu is None:
        raise UnsafeCommandLine(f"{QEMU} is not installed on the host")
    args, skip = [], False
    for arg in cmdline[1:]:
        if skip:
            skip = False
            continue
        option = "-" + arg.lstrip("-") if arg.startswith("-") else arg
        if option in STRIPPED_WITH_VALUE:
            skip = True
            continue
        if option in STRIPPED_FLAGS:
            continue
        args.append(arg)
    checked = check_options(args, owner)
    wanted = {os.path.realpath(disk)} | ({str(disk_as_named)} if disk_as_named else set())
    if not any(f in wanted or os.path.realpath(f) in wanted for f in checked.drive_files):
        raise UnsafeCommandLine(
            f"the source QEMU's command line does not name the disk {disk!r} in a -drive; "
            f"it cannot be replayed for a rollback"
        )
    return [host_qemu, *args, "-loadvm", CHECKPOINT_TAG]


def replay_argv(source: SourceVM, load_checkpoint: bool = True) -> list[str]:
    """setpriv (the agent's uid, gid and groups; no new privileges; no capabilities), then the checked QEMU."""
    qemu = replay_command(source.cmdline, source.disk, owner=source.uid)
    if not load_checkpoint:
        qemu = qemu[:-2]
    setpriv = shutil.which("setpriv", path=SYSTEM_PATH)
    if setpriv is None:
        raise RollbackError(
            "setpriv is not installed; the agent's QEMU is only ever started through it",
            hint="apt-get install util-linux, then rerun `python -m takeover rollback`",
        )
    groups = ",".join(str(g) for g in source.groups)
    return [
        setpriv,
        f"--reuid={source.uid}",
        f"--regid={source.gid}",
        f"--groups={groups}" if groups else "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--",
        *qemu,
    ]


def agent_workdir(source: SourceVM) -> str:
    """The directory holding the agent's disk when it is the agent's; else "/". Never root's own cwd."""
    directory = os.path.dirname(os.path.realpath(source.disk))
    try:
        st = os.lstat(directory)
    except OSError:
        return "/"
    return directory if stat.S_ISDIR(st.st_mode) and st.st_uid == source.uid else "/"


def start_source_vm(source: SourceVM, log_path: Path, load_checkpoint: bool = True) -> int | None:
    """Start the agent's QEMU again as the agent, in a session of its own; returns once it daemonized
    (None) or, for a QEMU that stays in the foreground, its pid once it survived a moment."""
    try:
        argv = replay_argv(source, load_checkpoint)
    except UnsafeCommandLine as exc:
        # Step 1 accepted this command line: the agent changed its files since. Nothing was started.
        raise RollbackError(
            f"the agent's QEMU command line is no longer replayable: {exc}",
            hint=f"nothing was started and the agent's disk and {CHECKPOINT_TAG} snapshot are "
            f"untouched; the agent can start its VM itself (`python -m vm_image launch`), or "
            f"fix the files named above and rerun `python -m takeover rollback`",
        ) from None
    workdir = agent_workdir(source)
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": workdir}
    daemonizes = "-daemonize" in source.cmdline or "--daemonize" in source.cmdline
    # Neither setpriv nor QEMU (nor the QEMU parent that waits while the daemon loads the
    # checkpoint) may hold root's terminal, nor root's log: its output comes through a pipe
    # root closes once the start is over (host/detached.py).
    child, drain = start_drained(argv, log_path, env=env, cwd=workdir)
    try:
        return _wait_started(child, daemonizes, drain, log_path)
    finally:
        drain.close()


def _wait_started(child: subprocess.Popen[bytes], daemonizes: bool, drain: LogDrain, log_path: Path) -> int | None:
    def failed(what: str) -> RollbackError:
        drain.close()  # the log holds all QEMU said before the tail is read
        return RollbackError(f"the agent's QEMU {what}: {log_tail(log_path, 600)}")

    if daemonizes:
        try:
            code = child.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_group(child)
            raise failed(f"did not finish starting within {START_TIMEOUT:.0f} s") from None
        if code != 0:
            raise failed(f"did not start again (exit {code})")
        return None
    time.sleep(2)
    if child.poll() is not None:
        raise failed(f"exited at once (exit {child.returncode})")
    return child.pid
