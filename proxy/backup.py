"""A consistent copy of the store, as one bounded archive: what `secret-proxy backup` prints.

The database is copied with SQLite's online backup API, so the copy is one committed state even
while the proxy serves (a writer is never blocked for long; the copy restarts if a commit lands
mid-copy). The master key that seals it goes along: without it the copy restores nothing, which
is why the host seals the whole archive to the operator's key before it touches a disk
(takeover/host/backup_seal.py). The audit key is inside the database, wrapped under the master key.

The archive, read back by `read_archive` before anything is written (proxy/restore.py):

    MAGIC (8 bytes) | manifest length (4 bytes, big-endian) | manifest (JSON) | each file's bytes

The manifest lists each file's name (from a closed set), size and SHA-256, and the counts the copy
holds. Nothing after the last file is allowed. `config.toml` is not carried: it names the host's
forward proxy and Telegram, which belong to the VM the copy is restored into.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

from . import audit, crypto
from .config import Settings

MAGIC = b"SPXBAK\x00\x01"
FORMAT = 1
DB_NAME = "proxy.db"
KEY_NAME = "master.key"
FILES = (DB_NAME, KEY_NAME)
# An archive is held in memory, by the guest and by the host: this bounds both. A store of a few
# thousand secrets and a year of audit is a few MiB.
MAX_ARCHIVE_BYTES = 1024 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024
T = TypeVar("T")


class BackupError(Exception):
    """A backup could not be made, or an archive is not one that restores; the message says which and why."""


@dataclass(frozen=True)
class Counts:
    """What a copy holds, as numbers only: what the operator checks after a restore."""

    secrets: int
    agents: int
    audit_entries: int


@dataclass(frozen=True)
class Archive:
    created: float
    counts: Counts
    files: dict[str, bytes]


def snapshot(settings: Settings) -> tuple[bytes, crypto.MasterKey]:
    """The database as one committed state, and the master key it is sealed with."""
    if not settings.db_path.is_file():
        raise BackupError(f"no database at {settings.db_path}; nothing to back up")
    source = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True, timeout=30.0)
    copy = sqlite3.connect(":memory:")
    try:
        source.backup(copy)
        data = rollback_journal_header(copy.serialize())
    finally:
        copy.close()
        source.close()
    if len(data) > MAX_ARCHIVE_BYTES - MAX_MANIFEST_BYTES - 1024:
        raise BackupError(f"the database is {len(data)} bytes, over the backup's limit of {MAX_ARCHIVE_BYTES}")
    return data, key_of(settings, data)


def rollback_journal_header(db: bytes) -> bytes:
    """`db` marked as a rollback-journal database (header bytes 18 and 19, 2 for WAL, become 1).

    The copy keeps the live store's WAL mark, and a WAL database opens only as a file with its -wal
    and -shm beside it: so marked, the archive opens in memory to be checked, and as a lone file.
    The proxy's Store turns WAL on again when it opens the restored file.
    """
    if db[18:20] != b"\x02\x02":
        return db
    return db[:18] + b"\x01\x01" + db[20:]


def key_of(settings: Settings, db: bytes) -> crypto.MasterKey:
    """The key file whose key the copy names: `master.key`, or `master.key.new` mid-rotation."""
    key_id = inspect(db, lambda conn: conn.execute("SELECT value FROM meta WHERE key = 'master_key_id'").fetchone())
    for path in (settings.key_path, settings.key_path.with_suffix(".key.new")):
        try:
            key = crypto.read_key_file(path)
        except (crypto.CryptoError, OSError):
            continue
        if key_id is not None and key.key_id == key_id[0]:
            return key
    raise BackupError(f"neither {settings.key_path} nor master.key.new is the key the database is sealed with")


def make_archive(settings: Settings, now: float | None = None) -> bytes:
    db, key = snapshot(settings)
    counts = verify_copy(db, key)
    files = {DB_NAME: db, KEY_NAME: crypto.key_file_text(key)}
    manifest = {
        "format": FORMAT,
        "created": time.time() if now is None else now,
        "counts": asdict(counts),
        "files": [{"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()],
    }
    head = json.dumps(manifest, sort_keys=True).encode()
    return MAGIC + len(head).to_bytes(4, "big") + head + b"".join(files.values())


def read_archive(data: bytes) -> Archive:
    """The archive's files and manifest, each file checked against its size and SHA-256; BackupError if not whole."""
    if len(data) > MAX_ARCHIVE_BYTES:
        raise BackupError(f"the archive is over {MAX_ARCHIVE_BYTES} bytes")
    if not data.startswith(MAGIC):
        raise BackupError("this is not a secret-proxy backup archive (wrong magic)")
    at = len(MAGIC) + 4
    size = int.from_bytes(data[len(MAGIC) : at], "big")
    if size > MAX_MANIFEST_BYTES or at + size > len(data):
        raise BackupError("the archive's manifest is truncated or oversized")
    try:
        manifest = json.loads(data[at : at + size])
        if manifest["format"] != FORMAT:
            raise BackupError(f"archive format {manifest['format']!r}; this proxy reads format {FORMAT}")
        listed = [(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in manifest["files"]]
        counts = Counts(**{k: int(v) for k, v in manifest["counts"].items()})
        created = float(manifest["created"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BackupError(f"the archive's manifest is malformed: {exc}") from None
    if sorted(name for name, _, _ in listed) != sorted(FILES):
        raise BackupError(f"the archive must hold exactly {', '.join(FILES)}")
    at += size
    files: dict[str, bytes] = {}
    for name, length, digest in listed:
        body = data[at : at + length] if length >= 0 else b""
        if len(body) != length:
            raise BackupError(f"the archive is truncated: {name} has {len(body)} of {length} bytes")
        if hashlib.sha256(body).hexdigest() != digest:
            raise BackupError(f"{name} in the archive does not match its SHA-256 (corrupted)")
        files[name] = body
        at += length
    if at != len(data):
        raise BackupError(f"the archive has {len(data) - at} bytes after its last file")
    return Archive(created, counts, files)


def verify_copy(db: bytes, key: crypto.MasterKey) -> Counts:
    """A copy that restores: SQLite finds it intact, `key` is the one it is sealed with, the audit chain holds."""

    def check(conn: sqlite3.Connection) -> Counts:
        found = conn.execute("PRAGMA integrity_check").fetchall()
        if found != [("ok",)]:
            raise BackupError(f"the database copy fails SQLite's integrity check: {found[:3]}")
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('master_key_id', 'audit_key')"))
        if meta.get("master_key_id") != key.key_id:
            raise BackupError("the master key in the archive is not the one its database is sealed with")
        try:
            audit_key = crypto.unwrap_audit_key(key, bytes.fromhex(meta["audit_key"]))
        except (crypto.CryptoError, KeyError, ValueError) as exc:
            raise BackupError(f"the audit key in the copy does not open: {exc}") from None
        problems = audit.verify(conn, audit_key)
        if problems:
            raise BackupError(f"the copy's audit chain is NOT intact ({len(problems)} problems): {problems[0]}")
        return Counts(
            secrets=conn.execute("SELECT COUNT(*) FROM secrets").fetchone()[0],
            agents=conn.execute("SELECT COUNT(*) FROM agents").fetchone()[0],
            audit_entries=conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0],
        )

    return inspect(db, check)


def inspect(db: bytes, look: Callable[[sqlite3.Connection], T]) -> T:
    """Run `look` on a private in-memory copy of `db`: nothing is written anywhere, whatever the bytes are."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.deserialize(db)
        return look(conn)
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"the database copy does not open: {exc}") from None
    finally:
        conn.close()
