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
from dataclasses import dataclass, replace
from pathlib import Path

from vm_image import proc

from ..agent.machine import Connection
from ..agent.nested_vm import nested_alive, remove_nested_file, tell_agent
from ..errors import TakeoverError
from ..host.files import read_root_only_file
from ..models import SourceVM
from .context import Context
from .verify import VerifyResult


@dataclass(frozen=True)
class RevokeResult:
    """Step 7's result: each of the agent's files, removed or kept, with why (`{"path", "outcome"}`)."""

    removed: list[dict[str, str]]
    kept: list[dict[str, str]]
    told_agent: list[str] | None = None  # files written in the agent machine (its new address)


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


def revoke_in_machine(source: SourceVM, conn: Connection, *, keep_source: bool) -> RevokeResult:
    """The nested VM's leftovers in the agent machine removed, each only if still what step 1 saw."""
    if nested_alive(conn, source.pid, source.pid_start_ticks):
        raise TakeoverError(
            f"the nested QEMU (pid {source.pid}) is running again in {source.machine}",
            hint="it was started again after the checkpoint; stop it and rerun",
        )
    wanted: list[tuple[str, str]] = [(source.monitor, "socket")]
    for path in (source.ready_file, source.pidfile):
        if path:
            wanted.append((path, "regular file"))
    if source.setup_key_pub:  # without it, what is left cannot log in to a VM again
        wanted += [
            (source.setup_key_pub, "regular file"),
            (str(Path(source.setup_key_pub).with_suffix("")), "regular file"),
        ]
    removed: list[dict[str, str]] = []
    kept: list[dict[str, str]] = []
    for path, kind in wanted:
        outcome = remove_nested_file(conn, path, kind, source)
        (removed if outcome == "removed" else kept).append({"path": path, "outcome": outcome})
    if keep_source:
        kept.append({"path": source.disk, "outcome": "kept (--keep-source)"})
    else:
        outcome = remove_nested_file(conn, source.disk, "regular file", source, disk=True)
        (removed if outcome == "removed" else kept).append({"path": source.disk, "outcome": outcome})
    return RevokeResult(removed, kept)


def step_revoke(ctx: Context) -> RevokeResult:
    source = ctx.source
    if source.machine is not None:
        result = revoke_in_machine(source, ctx.machine(), keep_source=ctx.cfg.keep_source)
        result = replace(result, told_agent=_tell_agent(ctx))
    else:
        result = revoke_agent_access(source, keep_source=ctx.cfg.keep_source)
    for item in result.removed:
        ctx.note(f"removed {item['path']}")
    for item in result.kept:
        ctx.note(f"kept {item['path']}: {item['outcome']}")
    return result


def _tell_agent(ctx: Context) -> list[str]:
    """The served URL, and the token verify created if any, written where the agent's tools in its machine read them."""
    source = ctx.source
    token = None
    verified = ctx.journal.read("verify", VerifyResult)
    if verified.agent_token is not None:
        token = read_root_only_file(Path(verified.agent_token.token_file), "the agent's token file", 4096)
    written = tell_agent(ctx.machine(), source.proxy.url, token, source.uid, source.gid)
    ctx.note(f"told the agent machine: SECRET_PROXY_URL={source.proxy.url} in {', '.join(written)}")
    return written
