"""Notice another process's commit to the database at once, with inotify (Linux, via ctypes).

A commit by the CLI (over SSH, in another process) writes the database's WAL,
which raises inotify events on the data directory, but before the commit is
visible to readers (SQLite publishes it in the shared-memory index after its
fsync, which raises no event). So every commit ends by closing a marker file
(`Store._announce_commit`): that event comes after the commit is visible, and
the waiter learns of it at once. The last event of a burst is still followed by
more looks at growing intervals, for a writer whose marker could not be written
(the fsync can take a while on a busy disk, and tens of milliseconds in a TCG
guest). Where inotify is missing the caller polls.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("proxy")

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
# Seconds between the looks after the last event: 0.63 s in all, then the sweeper's once a second.
FOLLOW_UP_LOOKS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)


class DirectoryWatch:
    """Calls `on_change` on the event loop after files in `directory` are written."""

    def __init__(self, directory: Path, on_change: Callable[[], object]) -> None:
        self.directory = directory
        self.on_change = on_change
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._follow_up: asyncio.TimerHandle | None = None

    def start(self) -> bool:
        """Start watching; False when inotify is unavailable (not Linux, or out of watches)."""
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            init, add_watch = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            return False
        fd = init(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.warning(
                "inotify unavailable (%s); waiting agents learn of CLI decisions by polling",
                os.strerror(ctypes.get_errno()),
            )
            return False
        mask = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
        if add_watch(fd, os.fsencode(self.directory), mask) < 0:
            log.warning(
                "cannot watch %s (%s); waiting agents learn of CLI decisions by polling",
                self.directory,
                os.strerror(ctypes.get_errno()),
            )
            os.close(fd)
            return False
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._on_readable)
        return True

    def stop(self) -> None:
        if self._follow_up is not None:
            self._follow_up.cancel()
        if self._fd >= 0 and self._loop is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _on_readable(self) -> None:
        try:
            while os.read(self._fd, 65536):  # drain: many events, one look
                pass
        except BlockingIOError:
            pass
        self.on_change()
        self._follow(0)  # a new event starts the follow-up looks over

    def _follow(self, step: int) -> None:
        if self._follow_up is not None:
            self._follow_up.cancel()
            self._follow_up = None
        if step < len(FOLLOW_UP_LOOKS) and self._loop is not None:
            self._follow_up = self._loop.call_later(FOLLOW_UP_LOOKS[step], self._look_again, step + 1)

    def _look_again(self, next_step: int) -> None:
        self._follow_up = None
        self.on_change()
        self._follow(next_step)
