"""Opening a file the agent named, as root, without ever opening anything but a regular file.

`O_NOFOLLOW` guards only the last component of a path: with a directory of the
agent's that is a link to `/dev`, `open("~agent/l/watchdog", O_RDONLY|O_NOFOLLOW)`
opens the host's watchdog device (which reboots the host when closed without
its magic byte), a tape (which rewinds) or a serial line. So the file is first
pinned with `O_PATH` (which opens no device and reads nothing), checked with
`fstat` to be a regular file (and the expected owner's), and only then reopened
for reading through that very descriptor.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotAgentFile(OSError):
    """The path is a link, not a regular file, not the expected owner's, or larger than allowed."""


def open_regular(path: Path, *, owner: int | None = None) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at `path` (last component not a link) and its stat."""
    pinned = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(pinned)
        if stat.S_ISLNK(st.st_mode):  # O_PATH|O_NOFOLLOW pins the link itself: refuse it as open() would
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
        if not stat.S_ISREG(st.st_mode):
            raise NotAgentFile(f"{path} is not a regular file")
        if owner is not None and st.st_uid != owner:
            raise NotAgentFile(f"{path} is owned by uid {st.st_uid}, not {owner}")
        fd = os.open(f"/proc/self/fd/{pinned}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(pinned)
    return fd, st


def read_regular(path: Path, limit: int, *, owner: int | None = None) -> tuple[bytes, os.stat_result]:
    """At most `limit` bytes of the regular file at `path`; more than that is refused, not cut."""
    fd, st = open_regular(path, owner=owner)
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise NotAgentFile(f"{path} is larger than {limit} bytes")
    return data, st
