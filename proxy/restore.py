"""Putting a backup back: staged while the proxy serves, swapped in only before it starts.

`stage` checks an archive whole (proxy/backup.py: every file's SHA-256, SQLite's integrity check,
the master key opens the store, the audit chain verifies) and only then writes it, each file 0600
from its first byte and synced, into a directory that is renamed into place in one step: a staged
copy is complete or absent. `apply_staged` runs as the unit's ExecStartPre, before `proxy serve`,
so nothing has the database open while it is swapped.

The swap survives a crash at any point; the next start finishes it (every step can be redone):

    1. `restore.old/` gets the current files (hard links: nothing is copied or changed), then is
       renamed into place: from here on the old state is kept, whatever happens to the live names
    2. the staged copy is checked again; the live names get the staged files (a copy, renamed over
       each), the old -wal and -shm removed first so no old log is replayed onto the new database
    3. `restore.last.json` records it; the staged directory is renamed away (the commit point)
    4. `restore.old/` becomes `pre-restore/` (the previous one goes), the leftovers are removed

A staged copy that no longer checks out at step 2 is never applied: the live files are put back
from `restore.old/` (a crash may have replaced some), and `restore.last.json` says why.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import crypto
from .backup import DB_NAME, FILES, KEY_NAME, MAX_ARCHIVE_BYTES, Archive, BackupError, read_archive, verify_copy
from .config import Settings
from .key_files import fsync_dir

STAGED = "restore.staged"
OLD = "restore.old"
PRE_RESTORE = "pre-restore"
LAST = "restore.last.json"
TRASH_PREFIX = "restore.trash-"
# The live files a swap moves aside together: the database with its log, and the keys.
LIVE = (DB_NAME, DB_NAME + "-wal", KEY_NAME, KEY_NAME + ".new")
STALE = (DB_NAME + "-wal", DB_NAME + "-shm", KEY_NAME + ".new")
MANIFEST = "manifest.json"


def check(archive_bytes: bytes) -> Archive:
    """The archive, fully checked; BackupError (nothing written) if any part fails."""
    archive = read_archive(archive_bytes)
    key = crypto.key_from_text(archive.files[KEY_NAME], "in the archive")
    counts = verify_copy(archive.files[DB_NAME], key)
    if counts != archive.counts:
        raise BackupError(f"the copy holds {counts}, not the {archive.counts} its manifest names")
    return archive


def read_bounded(stream: Any, limit: int = MAX_ARCHIVE_BYTES) -> bytes:
    """All of `stream`, at most `limit` bytes, read in chunks: `read(limit)` would ask for the whole limit
    at once, more memory than a small guest has."""
    data = bytearray()
    while chunk := stream.read(min(1024 * 1024, limit + 1 - len(data))):
        data.extend(chunk)
        if len(data) > limit:
            raise BackupError(f"the archive is over {limit} bytes; refused before it was read whole")
    return bytes(data)


def stage(settings: Settings, archive_bytes: bytes) -> dict[str, Any]:
    """Check the archive, then put it where the next start applies it (a staged copy before it is replaced)."""
    archive = check(archive_bytes)
    data_dir = settings.data_dir
    work = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=data_dir))  # 0700; a trash name until it is whole
    for name in FILES:
        write_private(work / name, archive.files[name])
    manifest = {"backup_created": archive.created, "staged_at": time.time(), "counts": asdict(archive.counts)}
    write_private(work / MANIFEST, json.dumps(manifest, sort_keys=True).encode())
    fsync_dir(work)
    staged = data_dir / STAGED
    if staged.exists():  # an earlier staged copy, never applied: this one replaces it
        staged.rename(data_dir / f"{TRASH_PREFIX}{os.urandom(6).hex()}")
    work.rename(staged)
    fsync_dir(data_dir)
    remove_trash(data_dir)
    return {"staged": True, **manifest, "applies": "at the proxy's next start (the VM's next boot)"}


def apply_staged(settings: Settings, fault: Callable[[str], None] = lambda point: None) -> dict[str, Any]:
    """Swap a staged copy in, or finish a swap a crash interrupted; `fault(point)` lets a test crash there."""
    data_dir = settings.data_dir
    staged, old = data_dir / STAGED, data_dir / OLD
    if not staged.is_dir():
        if old.is_dir():
            finish(data_dir)  # a crash after the commit point: only the clean-up was left
        remove_trash(data_dir)
        return {"applied": False, "detail": "nothing staged"}
    if not old.is_dir():
        keep_old(data_dir)
    fault("old kept")
    try:
        archive_bytes = _staged_archive(staged)
        counts = verify_copy(archive_bytes[DB_NAME], crypto.key_from_text(archive_bytes[KEY_NAME], str(staged)))
    except BackupError as exc:
        return reject(data_dir, str(exc))
    for name in STALE:
        (data_dir / name).unlink(missing_ok=True)
    fault("stale removed")
    for name in FILES:
        replace_with_copy(staged / name, data_dir / name)
        fault(f"{name} replaced")
    fsync_dir(data_dir)
    manifest = json.loads((staged / MANIFEST).read_text())
    record = {"result": "applied", "applied_at": time.time(), **manifest, "counts": asdict(counts)}
    write_atomic(data_dir / LAST, json.dumps(record, sort_keys=True).encode())
    fault("recorded")
    staged.rename(data_dir / f"{TRASH_PREFIX}{os.urandom(6).hex()}")  # the commit point
    fsync_dir(data_dir)
    fault("committed")
    finish(data_dir)
    return record


def state(settings: Settings) -> dict[str, Any]:
    """Whether a copy is staged (with its manifest), and what the last apply did."""
    data_dir = settings.data_dir
    staged = data_dir / STAGED
    found: dict[str, Any] = {"staged": staged.is_dir()}
    if staged.is_dir():
        found["staged_copy"] = json.loads((staged / MANIFEST).read_text())
    last = data_dir / LAST
    found["last"] = json.loads(last.read_text()) if last.is_file() else None
    found["pre_restore"] = str(data_dir / PRE_RESTORE) if (data_dir / PRE_RESTORE).is_dir() else None
    return found


def keep_old(data_dir: Path) -> None:
    """Step 1: the current files, linked (not moved) into `restore.old/`, which appears whole or not at all."""
    work = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=data_dir))
    for name in LIVE:
        if (data_dir / name).exists():
            os.link(data_dir / name, work / name)
    fsync_dir(work)
    work.rename(data_dir / OLD)
    fsync_dir(data_dir)


def reject(data_dir: Path, why: str) -> dict[str, Any]:
    """A staged copy that fails its check: the old files back under the live names, the copy set aside."""
    old = data_dir / OLD
    for name in STALE:
        (data_dir / name).unlink(missing_ok=True)
    for name in LIVE:
        if (old / name).exists():
            replace_with_copy(old / name, data_dir / name)
    fsync_dir(data_dir)
    record = {"result": "rejected", "rejected_at": time.time(), "why": why}
    write_atomic(data_dir / LAST, json.dumps(record, sort_keys=True).encode())
    (data_dir / STAGED).rename(data_dir / f"{TRASH_PREFIX}{os.urandom(6).hex()}")
    shutil.rmtree(old)
    fsync_dir(data_dir)
    remove_trash(data_dir)
    print(f"secret-proxy restore: the staged copy was NOT applied: {why}", file=sys.stderr)
    return record


def finish(data_dir: Path) -> None:
    """Step 4: the old files become `pre-restore/` (one kept: the previous one goes), leftovers removed."""
    pre = data_dir / PRE_RESTORE
    if pre.exists():
        pre.rename(data_dir / f"{TRASH_PREFIX}{os.urandom(6).hex()}")
    (data_dir / OLD).rename(pre)
    fsync_dir(data_dir)
    remove_trash(data_dir)


def remove_trash(data_dir: Path) -> None:
    for path in data_dir.glob(TRASH_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


def _staged_archive(staged: Path) -> dict[str, bytes]:
    try:
        return {name: (staged / name).read_bytes() for name in FILES}
    except OSError as exc:
        raise BackupError(f"the staged copy is incomplete: {exc}") from None


def replace_with_copy(source: Path, target: Path) -> None:
    """`target` becomes a synced copy of `source` in one rename; `source` stays (a redo copies it again)."""
    write_atomic(target, source.read_bytes())


def write_atomic(target: Path, data: bytes) -> None:
    temporary = target.with_name(f".{target.name}.{os.urandom(6).hex()}")
    write_private(temporary, data)
    os.replace(temporary, target)


def write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 from its first byte (never over anything), write it whole, fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
