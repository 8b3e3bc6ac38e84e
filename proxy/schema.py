"""The database's schema, and the migrations that bring a database written by an older proxy to it.

Every migration runs inside the caller's transaction, so an upgrade is all or nothing; a test
per version (tests/test_store.py, tests/test_broker.py) opens a database in that version's shape.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import replace

from . import audit, crypto
from .approval import ApprovalRule

SCHEMA_VERSION = 7
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    wrapped_key BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    updated_at REAL NOT NULL,
    policy TEXT,
    approval TEXT
);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    secret TEXT NOT NULL,
    reason TEXT NOT NULL,
    ttl_seconds INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    decided_at REAL,
    decided_by TEXT,
    retrieved_at REAL,
    approval TEXT
);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status, expires_at);
CREATE INDEX IF NOT EXISTS requests_agent ON requests (agent, status);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER NOT NULL UNIQUE,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    request_id TEXT,
    secret TEXT,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS calls (
    request_id TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    url TEXT NOT NULL,
    headers TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    body_size INTEGER NOT NULL,
    body BLOB
);
CREATE TABLE IF NOT EXISTS telegram_messages (
    request_id TEXT PRIMARY KEY,
    chat_id INTEGER NOT NULL,
    message_id INTEGER NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    votes_shown INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    secret TEXT NOT NULL,
    method TEXT,
    url_prefix TEXT,
    calls_left INTEGER,
    created_at REAL NOT NULL,
    expires_at REAL,
    granted_by TEXT NOT NULL,
    request_id TEXT NOT NULL,
    ended_at REAL,
    ended_why TEXT,
    ended_shown INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS grants_live ON grants (agent, secret, ended_at);
CREATE TABLE IF NOT EXISTS votes (
    request_id TEXT NOT NULL,
    voter TEXT NOT NULL,
    actor TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (request_id, voter)
);
"""


def migrate(conn: sqlite3.Connection, load_audit_key: Callable[[sqlite3.Connection], crypto.AuditKey]) -> None:
    """Bring a database written by an older proxy to SCHEMA_VERSION, in the caller's transaction."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row else 1
    if version < 2:
        # 1 -> 2: `agents.revoked_at` was never set (revoking deletes the row), and the audit
        # head gains a MAC. The old head is blessed only if it names the last entry, so a log
        # truncated before the upgrade still fails `audit verify`.
        if "revoked_at" in [c[1] for c in conn.execute("PRAGMA table_info(agents)")]:
            conn.execute("ALTER TABLE agents DROP COLUMN revoked_at")
        audit_key = load_audit_key(conn)
        head = conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
        last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if last is None and head is None:
            audit.write_head(conn, audit_key, 0, audit.GENESIS)
        elif last is not None and head is not None and head[0] == last[1]:
            audit.write_head(conn, audit_key, last[0], last[1])
    if version < 3:
        # 2 -> 3: a secret may carry a use policy (brokered calls); the `calls` table is new and
        # was created by SCHEMA. Existing secrets get none: retrievable as before, never brokered.
        if "policy" not in [c[1] for c in conn.execute("PRAGMA table_info(secrets)")]:
            conn.execute("ALTER TABLE secrets ADD COLUMN policy TEXT")
    if version < 4:
        # 3 -> 4: a call keeps its body (NULL when asked by hash, and once made or expired), so that the
        # proxy can make an approved call by its id alone. Calls asked before have none: made as before.
        if "body" not in [c[1] for c in conn.execute("PRAGMA table_info(calls)")]:
            conn.execute("ALTER TABLE calls ADD COLUMN body BLOB")
    if version < 5:
        # 4 -> 5: approval rules (proxy/approval.py). A secret and a request without one keep
        # today's rule, `approve`; the `votes` table is new and was created by SCHEMA.
        for table, column, sql in (
            ("secrets", "approval", "approval TEXT"),
            ("requests", "approval", "approval TEXT"),
            ("telegram_messages", "votes_shown", "votes_shown INTEGER NOT NULL DEFAULT 0"),
        ):
            if column not in [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {sql}")
    # 5 -> 6: grants (proxy/grants.py); the table is new and was created by SCHEMA. Nothing to change.
    if version < 7:
        # 6 -> 7: whether a value may be retrieved moved from the use policy (`broker_only`) into the approval
        # rule, so that one place says how a secret may be used. A broker-only secret stays broker-only; a
        # policy that only said so (no destination, no injection) is no policy.
        rows = conn.execute("SELECT name, policy, approval FROM secrets WHERE policy IS NOT NULL").fetchall()
        for name, policy_json, rule_json in rows:
            policy = json.loads(policy_json)
            if "broker_only" not in policy:
                continue
            rule = ApprovalRule.from_json(rule_json)
            if policy.pop("broker_only"):
                rule = replace(rule, broker_only=True)
            kept = json.dumps(policy, sort_keys=True) if policy["destinations"] or policy["injection"] else None
            conn.execute("UPDATE secrets SET policy = ?, approval = ? WHERE name = ?", (kept, rule.to_json(), name))
    if version < SCHEMA_VERSION:
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
