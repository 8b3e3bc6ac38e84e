"""Start a process root does not wait for: a session of its own, no terminal, output to a 0600 log.

The host's QEMU, the agent's QEMU replayed by a rollback and the egress proxy all start this way:
`start_new_session` (setsid in the child before exec) so none of them holds root's terminal or
receives its signals, stdin from /dev/null, and a log root opens without following a link.

A process of the agent's own uid (the replayed QEMU) gets no descriptor of root's log at all:
the agent can copy any descriptor of its own processes (`pidfd_getfd`, ptrace) and would keep
writing to root's file for as long as it liked. It gets a pipe instead (`start_drained`): root
copies what arrives to the log, at most `LOG_LIMIT` bytes, while the process starts, then closes
its end; later writes fail with EPIPE (QEMU ignores SIGPIPE) and reach nothing of root's.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from pathlib import Path

LOG_LIMIT = 1 << 20
_CLOSE_GRACE = 0.5  # after close(), what is already in the pipe is still copied for this long


def start_detached(
    argv: list[str],
    log_path: Path,
    *,
    env: dict[str, str],
    cwd: str | None = None,
    umask: int = -1,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    log = _open_log(log_path, append)
    try:
        return _popen(argv, log, env=env, cwd=cwd, umask=umask)
    finally:
        os.close(log)


class LogDrain:
    """Root's end of the pipe a process writes its output to, copied to a log until `close()`."""

    def __init__(self, read_fd: int, log_fd: int, limit: int = LOG_LIMIT) -> None:
        self._read_fd, self._log_fd, self._limit = read_fd, log_fd, limit
        self._written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        stopped_at = None
        while True:
            if self._stop.is_set():
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > _CLOSE_GRACE:
                    return
            if not poller.poll(100):
                if stopped_at is not None:
                    return
                continue
            try:
                chunk = os.read(self._read_fd, 65536)
            except OSError:
                return
            if not chunk:  # every writer has closed its end
                return
            self._copy(chunk)

    def _copy(self, chunk: bytes) -> None:
        room = self._limit - self._written
        if room <= 0:
            return  # read and dropped, so the writer never blocks on a full pipe
        try:
            os.write(self._log_fd, chunk[:room])
            self._written += min(room, len(chunk))
            if self._written >= self._limit:
                os.write(self._log_fd, f"\n[log cut at {self._limit} bytes]\n".encode())
        except OSError:  # a full or failing disk: keep draining, stop copying
            self._written = self._limit

    def close(self) -> None:
        """Copy what is already there, then close root's end: the process's later writes fail."""
        self._stop.set()
        self._thread.join()
        if self._read_fd >= 0:
            os.close(self._read_fd)
            os.close(self._log_fd)
            self._read_fd = self._log_fd = -1


def start_drained(
    argv: list[str], log_path: Path, *, env: dict[str, str], cwd: str | None = None
) -> tuple[subprocess.Popen[bytes], LogDrain]:
    """`start_detached` for a process of the agent's: its output reaches the log through a pipe root closes."""
    log = _open_log(log_path, append=False)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        child = _popen(argv, write_fd, env=env, cwd=cwd)
    except BaseException:
        for fd in (log, read_fd):
            os.close(fd)
        raise
    finally:
        os.close(write_fd)
    return child, LogDrain(read_fd, log)


def _open_log(log_path: Path, append: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    return os.open(log_path, flags, 0o600)


def _popen(
    argv: list[str], out: int, *, env: dict[str, str], cwd: str | None, umask: int = -1
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        cwd=cwd,
        env=env,
        umask=umask,
        start_new_session=True,
        close_fds=True,
    )
