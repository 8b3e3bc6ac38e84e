"""Step 7: remove what the agent had: its monitor socket, ready file, pidfile and (by default) its disk.

These paths come from the agent's ready file, and we are root: a path naming
a host file ("pidfile": "/etc/shadow") must not make us delete it. So each
file is removed only if, seen through a pinned directory handle and without
following links, it is the kind of file we expect and belongs to the agent
(for the disk: the very inode checked in step 1).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vm_image import proc

from ..errors import TakeoverError
from ..models import SourceVM
from .context import Context


@dataclass(frozen=True)
class RevokeResult:
    """Step 7's result: each of the agent's files, removed or kept, with why (`{"path", "outcome"}`)."""

    removed: list[dict[str, str]]
    kept: list[dict[str, str]]


def revoke_agent_access(source: SourceVM, *, keep_source: bool) -> RevokeResult:
    if proc.alive(source.pid, source.pid_start_ticks):
        raise TakeoverError(
            f"the agent's QEMU (pid {source.pid}) is running again",
            hint="it was started again after the checkpoint; stop it and rerun",
        )
    removed: list[dict[str, str]] = []
    kept: list[dict[str, str]] = []
    wanted: list[tuple[str, str]] = [(source.monitor, "socket")]
    if source.ready_file:
        wanted.append((source.ready_file, "file"))
    if source.pidfile:
        wanted.append((source.pidfile, "file"))
    for path, kind in wanted:
        outcome = remove_agent_file(Path(path), kind, source.uid)
        (removed if outcome == "removed" else kept).append({"path": path, "outcome": outcome})
    if keep_source:
        kept.append({"path": source.disk, "outcome": "kept (--keep-source)"})
    else:
        outcome = remove_agent_file(
            Path(source.disk), "file", source.uid, inode=(source.disk_dev, source.disk_ino), owner=source.disk_uid
        )
        (removed if outcome == "removed" else kept).append({"path": source.disk, "outcome": outcome})
    return RevokeResult(removed, kept)


def remove_agent_file(
    path: Path, kind: str, agent_uid: int, *, inode: tuple[int, int] | None = None, owner: int | None = None
) -> str:
    owner = agent_uid if owner is None else owner
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return "already gone (no directory)"
    try:
        try:
            st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return "already gone"
        is_kind = stat.S_ISSOCK(st.st_mode) if kind == "socket" else stat.S_ISREG(st.st_mode)
        if not is_kind:
            return f"not removed: not a {kind}"
        if owner == 0 and agent_uid == 0 and inode is None and kind != "socket":
            return "not removed: the agent runs as root, so ownership proves nothing"
        if st.st_uid != owner:
            return f"not removed: owned by uid {st.st_uid}, not the agent ({owner})"
        if inode is not None and (st.st_dev, st.st_ino) != tuple(inode):
            return "not removed: not the file checked in step 1"
        os.unlink(path.name, dir_fd=dir_fd)
        return "removed"
    finally:
        os.close(dir_fd)


def step_revoke(ctx: Context) -> RevokeResult:
    result = revoke_agent_access(ctx.source, keep_source=ctx.cfg.keep_source)
    for item in result.removed:
        ctx.note(f"removed {item['path']}")
    for item in result.kept:
        ctx.note(f"kept {item['path']}: {item['outcome']}")
    return result
