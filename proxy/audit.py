"""The append-only, hash-chained audit log.

Each entry stores the hash of the one before it and its own hash, an HMAC over
its content and that link, keyed by the audit key (wrapped under the master key).
Editing, deleting or reordering an entry breaks the chain. The head, the last
entry's sequence number and hash, is kept beside the log with its own HMAC, so
deleting the last entries (or all of them) is detected too: a forged head needs
the audit key, which the agent never holds. What a MAC cannot show is a whole
database put back to an older copy (log and head together); that needs a record
kept outside the VM.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .crypto import AuditKey

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts: float
    actor: str
    action: str
    request_id: str | None
    secret: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str


def _entry_hash(
    key: AuditKey,
    seq: int,
    ts: float,
    actor: str,
    action: str,
    request_id: str | None,
    secret: str | None,
    detail_json: str,
    prev_hash: str,
) -> str:
    body = json.dumps(
        [seq, repr(ts), actor, action, request_id, secret, detail_json, prev_hash],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return key.mac(body.encode())


def _head_message(seq: int, digest: str) -> bytes:
    return f"secret-proxy audit-head:{seq}:{digest}".encode()


def write_head(conn: sqlite3.Connection, key: AuditKey, seq: int, digest: str) -> None:
    """Record the last entry (seq 0 and GENESIS for an empty log), authenticated."""
    head = json.dumps({"seq": seq, "hash": digest, "mac": key.mac(_head_message(seq, digest))})
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_head', ?)", (head,))


def append(
    conn: sqlite3.Connection,
    key: AuditKey,
    ts: float,
    actor: str,
    action: str,
    request_id: str | None = None,
    secret: str | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
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
    write_head(conn, key, seq, digest)
    return seq


def entries(conn: sqlite3.Connection, limit: int | None = None) -> list[AuditEntry]:
    sql = "SELECT seq, ts, actor, action, request_id, secret, detail, prev_hash, hash FROM audit ORDER BY rowid"
    rows = conn.execute(sql).fetchall()
    if limit is not None:
        rows = rows[-limit:]
    return [AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8]) for r in rows]


def verify(conn: sqlite3.Connection, key: AuditKey) -> list[str]:
    """Return the problems found, in log order; an empty list means the chain is intact."""
    problems: list[str] = []
    prev = GENESIS
    expected_seq = 1
    last_seq = 0
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
        last_seq = seq
        expected_seq = seq + 1
    problems.extend(_head_problems(conn, key, last_seq, prev))
    return problems


def _head_problems(conn: sqlite3.Connection, key: AuditKey, last_seq: int, last_hash: str) -> list[str]:
    row = conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
    if row is None:
        return ["the recorded head of the log is missing (entries or the head were removed)"]
    try:
        head = json.loads(row[0])
        seq, digest, mac = int(head["seq"]), str(head["hash"]), str(head["mac"])
    except (ValueError, TypeError, KeyError):
        return ["the recorded head of the log is malformed (rewritten)"]
    if not key.verify(_head_message(seq, digest), mac):
        return ["the recorded head of the log does not match its MAC (rewritten)"]
    if (seq, digest) != (last_seq, last_hash):
        return [
            f"the log ends at entry {last_seq} but its authenticated head is entry {seq} "
            "(the last entries were removed)"
        ]
    return []
