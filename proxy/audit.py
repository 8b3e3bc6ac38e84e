"""The append-only, hash-chained audit log.

Each entry stores the hash of the one before it and its own hash, an HMAC over
its content and that link, keyed by a key wrapped under the master key. Editing,
deleting or reordering an entry breaks the chain; forging a consistent chain
needs the master key, which the agent never holds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from dataclasses import dataclass

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts: float
    actor: str
    action: str
    request_id: str | None
    secret: str | None
    detail: dict
    prev_hash: str
    hash: str


def _entry_hash(key: bytes, seq: int, ts: float, actor: str, action: str,
                request_id: str | None, secret: str | None, detail_json: str, prev_hash: str) -> str:
    body = json.dumps([seq, repr(ts), actor, action, request_id, secret, detail_json, prev_hash],
                      separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def append(conn: sqlite3.Connection, key: bytes, ts: float, actor: str, action: str,
           request_id: str | None = None, secret: str | None = None, detail: dict | None = None) -> None:
    """Append within the caller's transaction, so the entry lands with the change it records."""
    row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
    detail_json = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"))
    digest = _entry_hash(key, seq, ts, actor, action, request_id, secret, detail_json, prev)
    conn.execute(
        "INSERT INTO audit (seq, ts, actor, action, request_id, secret, detail, prev_hash, hash)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, ts, actor, action, request_id, secret, detail_json, prev, digest),
    )
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_head', ?)", (digest,))


def entries(conn: sqlite3.Connection, limit: int | None = None) -> list[AuditEntry]:
    sql = "SELECT seq, ts, actor, action, request_id, secret, detail, prev_hash, hash FROM audit ORDER BY rowid"
    rows = conn.execute(sql).fetchall()
    if limit is not None:
        rows = rows[-limit:]
    return [AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8]) for r in rows]


def verify(conn: sqlite3.Connection, key: bytes) -> list[str]:
    """Return the problems found, in log order; an empty list means the chain is intact."""
    problems: list[str] = []
    prev = GENESIS
    expected_seq = 1
    rows = conn.execute(
        "SELECT seq, ts, actor, action, request_id, secret, detail, prev_hash, hash FROM audit ORDER BY rowid"
    ).fetchall()
    for seq, ts, actor, action, request_id, secret, detail_json, prev_hash, digest in rows:
        if seq != expected_seq:
            problems.append(f"entry {seq}: expected entry {expected_seq} here (deleted or reordered entries)")
        if prev_hash != prev:
            problems.append(f"entry {seq}: link to the previous entry is broken")
        if not hmac.compare_digest(
            digest, _entry_hash(key, seq, ts, actor, action, request_id, secret, detail_json, prev_hash)
        ):
            problems.append(f"entry {seq}: content does not match its hash (edited)")
        prev = digest
        expected_seq = seq + 1
    head = conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
    if head is not None and head[0] != prev:
        problems.append("the last entries were removed (the chain ends before the recorded head)")
    return problems
