"""The master key's file and its rotation on disk: a crash in the middle of a rotation is finished or
undone at the next start, never left with a database sealed under a key no file holds."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from . import crypto
from .config import Settings


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_key_rotation_finished(settings: Settings) -> None:
    """Finish or undo a rotation that a crash interrupted (see `Store.rotate_master_key`)."""
    pending = settings.key_path.with_suffix(".key.new")
    if not pending.exists():
        return
    # Under the write lock: a rotation running in another process holds it from before it writes
    # the pending file until its commit, so a proxy starting meanwhile waits instead of deleting it.
    conn = sqlite3.connect(settings.db_path, timeout=30.0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not pending.exists():
                return  # that rotation finished meanwhile
            new = crypto.read_key_file(pending)
            row = conn.execute("SELECT value FROM meta WHERE key = 'master_key_id'").fetchone()
            if row and row[0] == new.key_id:
                replace_if_present(pending, settings.key_path)
            else:
                pending.unlink(missing_ok=True)
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()
    fsync_dir(settings.data_dir)


def replace_if_present(pending: Path, key_path: Path) -> None:
    try:
        os.replace(pending, key_path)
    except FileNotFoundError:
        pass  # the rotating process renamed it right after its commit
