"""A process of the agent's uid gets no descriptor of root's log (`takeover/host/detached.py`).

The attack: the agent copies a descriptor of its own replayed QEMU (it may ptrace a process of
its uid, or use pidfd_getfd) and writes to root's log for as long as it likes, until root's disk
is full. Played by a real process of `nobody` that writes more than the limit while it starts,
then writes again after the start is over.
"""

from __future__ import annotations

import os
import pwd
import signal
import sys
import time

import pytest

from takeover.host.detached import LOG_LIMIT, start_detached, start_drained

pytestmark = pytest.mark.root

NOBODY = pwd.getpwnam("nobody")
FLOOD = 3 * LOG_LIMIT  # far more than the log may hold
AGENT = f"""
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1}})
os.write(2, b"started\\n")
os.write(2, b"x" * {FLOOD})
signal.sigwait({{signal.SIGUSR1}})  # root's start window is over when SIGUSR1 comes
try:
    os.write(2, b"written after the start\\n")
except BrokenPipeError:
    sys.exit(42)
sys.exit(0)
"""


def bytes_written(pid: int) -> int:
    """What the process has written so far (its write calls' total, /proc/PID/io)."""
    for line in open(f"/proc/{pid}/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/PID/io")


def as_nobody(*argv: str) -> list[str]:
    return [
        "setpriv",
        f"--reuid={NOBODY.pw_uid}",
        f"--regid={NOBODY.pw_gid}",
        "--clear-groups",
        "--no-new-privs",
        *argv,
    ]


def test_the_agents_process_writes_through_a_pipe_root_closes_and_cannot_grow_roots_log(tmp_path):
    log = tmp_path / "rollback-qemu.log"
    child, drain = start_drained(as_nobody(sys.executable, "-c", AGENT), log, env={"PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 30
        while bytes_written(child.pid) < len("started\n") + FLOOD:  # all of it went through the pipe
            assert time.monotonic() < deadline and child.poll() is None, log.read_bytes()[:200]
            time.sleep(0.05)
        fds = [os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in (0, 1, 2)]
        assert fds[0] == "/dev/null" and fds[1] == fds[2] and fds[1].startswith("pipe:["), fds
        assert str(log) not in [os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")]
    finally:
        drain.close()
    os.kill(child.pid, signal.SIGUSR1)
    assert child.wait(30) == 42  # its write after the start failed: nothing reads the pipe any more
    text = log.read_bytes()
    assert text.startswith(b"started\n")
    assert LOG_LIMIT <= len(text) < LOG_LIMIT + 100 and b"[log cut at 1048576 bytes]" in text
    assert os.stat(log).st_mode & 0o777 == 0o600


def test_a_failed_start_leaves_all_it_said_in_the_log(tmp_path):
    log = tmp_path / "rollback-qemu.log"
    child, drain = start_drained(
        as_nobody(sys.executable, "-c", "import sys; sys.exit('qemu: could not load the checkpoint')"),
        log,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert child.wait(30) == 1
    drain.close()
    drain.close()  # twice is harmless: the failure path closes it before the caller's finally does
    assert log.read_text() == "qemu: could not load the checkpoint\n"


def test_roots_own_processes_still_log_to_the_file(tmp_path):
    log = tmp_path / "qemu.log"
    child = start_detached([sys.executable, "-c", "print('hello')"], log, env={"PATH": "/usr/bin:/bin"})
    assert child.wait(30) == 0
    assert log.read_text() == "hello\n"
    assert os.stat(log).st_mode & 0o777 == 0o600
