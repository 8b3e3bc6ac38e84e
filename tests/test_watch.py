"""The inotify watch on the data directory (proxy/watch.py), with real files and a real event loop."""

from __future__ import annotations

import asyncio
import time

from proxy.watch import DirectoryWatch


def test_a_change_visible_only_after_the_last_event_is_still_seen_soon(tmp_path):
    """A commit becomes visible after its fsync, which raises no event (slow in a TCG guest): the
    watch keeps looking after the last write, so the waiter learns of it without the 1 s sweeper."""

    async def scenario() -> float:
        committed = {"visible": False}
        seen: list[float] = []
        watch = DirectoryWatch(tmp_path, lambda: seen.append(time.monotonic()) if committed["visible"] else None)
        assert watch.start()
        try:
            (tmp_path / "proxy.db-wal").write_bytes(b"frames")  # the writer's only event
            await asyncio.sleep(0.15)  # its fsync: the commit shows only now, with no event
            committed["visible"] = True
            shown = time.monotonic()
            deadline = shown + 2
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert seen, "the commit was not seen without another event"
            return seen[0] - shown
        finally:
            watch.stop()

    assert asyncio.run(scenario()) < 0.2  # one follow-up step at 0.15 s is at most 0.16 s away


def test_the_follow_up_looks_stop(tmp_path):
    """Looking again is bounded: a quiet directory is not looked at forever (the sweeper takes over)."""

    async def scenario() -> int:
        looks: list[float] = []
        watch = DirectoryWatch(tmp_path, lambda: looks.append(time.monotonic()))
        assert watch.start()
        try:
            (tmp_path / "proxy.db-wal").write_bytes(b"frames")
            await asyncio.sleep(1.5)
            return len(looks)
        finally:
            watch.stop()

    assert 2 <= asyncio.run(scenario()) <= 10


def test_every_commit_ends_with_an_event_after_it_is_visible(tmp_path):
    """The WAL's events come before a commit is visible; the marker's close comes after it, so a server
    watching the directory learns of another process's commit without looking again later."""
    import ctypes
    import os
    import struct

    from proxy.store import COMMIT_MARK, Store, init_data_dir

    from .proxy_helpers import make_settings

    settings = make_settings(tmp_path)
    init_data_dir(settings)
    with Store(settings) as store:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(settings.data_dir), 0x08 | 0x02) >= 0
        try:
            store.add_agent("alice", ["*"], "test")
            events, buf = [], os.read(fd, 65536)
            while buf:
                _, mask, _, size = struct.unpack_from("iIII", buf)
                events.append((mask, buf[16 : 16 + size].rstrip(b"\0").decode()))
                buf = buf[16 + size :]
        finally:
            os.close(fd)
    assert events[-1] == (0x08, COMMIT_MARK), events  # IN_CLOSE_WRITE, after the WAL's writes
    assert any(name.endswith("-wal") for _, name in events[:-1]), events
    assert os.stat(settings.data_dir / COMMIT_MARK).st_mode & 0o777 == 0o600
