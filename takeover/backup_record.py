"""`HOST_DIR/backups.json`: the last backup and the last restore, for `takeover status` and the operator.

Written atomically, 0600, by `takeover backup` and `takeover restore` (takeover/backup.py); read by
`status` (takeover/glance.py), where a missing file reads as "never" and a damaged one says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import JournalError
from .host.files import write_json_atomic
from .record import from_record, to_record

RECORD_NAME = "backups.json"
MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class BackupMade:
    path: Path
    created: str  # UTC, ISO 8601, as in the file's header
    bytes: int
    recipient: str  # the fingerprint of the operator's key it is sealed to


@dataclass(frozen=True)
class RestoreDone:
    source: Path
    backup_created: str
    restored_at: str
    counts: dict[str, int]


@dataclass(frozen=True)
class BackupRecord:
    last_backup: BackupMade | None = None
    last_restore: RestoreDone | None = None


def load(host_dir: Path) -> BackupRecord:
    path = host_dir / RECORD_NAME
    try:
        text = path.read_bytes()[:MAX_RECORD_BYTES]
    except FileNotFoundError:
        return BackupRecord()
    try:
        return from_record(BackupRecord, json.loads(text), RECORD_NAME)
    except ValueError as exc:
        raise JournalError(f"{path} is not valid JSON: {exc}") from None


def save(host_dir: Path, record: BackupRecord) -> None:
    write_json_atomic(host_dir / RECORD_NAME, to_record(record))


def glance(host_dir: Path) -> dict[str, Any]:
    """What `status` shows: the last backup (or "never") and the last restore, if any."""
    try:
        record = load(host_dir)
    except JournalError as exc:
        return {"last_backup": f"unreadable: {exc}"}
    shown: dict[str, Any] = {"last_backup": to_record(record.last_backup) if record.last_backup else "never"}
    if record.last_restore is not None:
        shown["last_restore"] = to_record(record.last_restore)
    return shown
