"""The encrypted SQLite store: secrets, agents, requests and the audit log.

One database file in the data directory, WAL mode with `synchronous=FULL`, so a
change the proxy has acknowledged survives `kill -9` or power loss. Every state
change and its audit entry commit in one transaction. Each thread gets its own
connection, so the event loop can read while a writer thread commits.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets as pysecrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from . import audit, crypto, key_files, schema, wire
from .approval import ApprovalRule, changed_rule, voter
from .broker import Call
from .config import Settings
from .errors import StoreError
from .grants import FOREVER, Grant, GrantError, call_prefix, calls_within, within
from .policy import Policy

# Whole-string patterns, used with fullmatch: `$` alone would let "name\n" through.
NAME_RE = wire.SECRET_NAME_RE
AGENT_NAME_RE = wire.AGENT_NAME_RE
SCOPE_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,128}")
# The only shape `create_request` issues: "req_" + 24 random bytes in base64url.
REQUEST_ID_RE = wire.REQUEST_ID_RE
RECHECK_SECONDS = 0.02  # how stale a read may be about another process's commit
COMMIT_MARK = "commit.mark"  # closed after every commit: the watch's cue (Store._announce_commit)
STATUSES = ("pending", "approved", "denied", "expired", "retrieved", "used", "cancelled")


@dataclass(frozen=True)
class Agent:
    name: str
    scopes: tuple[str, ...]
    created_at: float

    def may_request(self, secret: str) -> bool:
        return any(fnmatch.fnmatchcase(secret, pattern) for pattern in self.scopes)


@dataclass(frozen=True, eq=False)  # identity hash: the API memoizes rendering per cached object
class Request:
    id: str
    agent: str
    secret: str
    reason: str
    ttl_seconds: int
    status: str
    created_at: float
    expires_at: float
    decided_at: float | None
    decided_by: str | None
    retrieved_at: float | None


@dataclass(frozen=True)
class Decision:
    request: Request
    changed: bool  # False when the request was already decided or expired, or the vote was not counted
    # For a quorum: "counted" (a new approver's vote; the request may still be pending), "repeated"
    # (this approver had already approved: counts once) or "not_allowed" (outside the secret's approvers).
    vote: str | None = None
    votes: int = 0  # distinct approvals so far


@dataclass(frozen=True)
class Latencies:
    cumulative: tuple[int, ...]  # decisions within each bound asked for
    count: int
    total_seconds: float


@dataclass(frozen=True)
class Figures:
    """What the metrics listener shows of the database (`Store.figures`): counts only."""

    secrets: int
    agents: int
    requests_by_status: dict[str, int]
    audit_entries: int
    store_bytes: int
    decisions: dict[tuple[str, str], Latencies]  # (approved|denied, telegram|operator)


_GRANT_COLS = (
    "id, agent, secret, method, url_prefix, calls_left, created_at, expires_at, granted_by, request_id, ended_at,"
    " ended_why"
)
_REQUEST_COLS = (
    "id, agent, secret, reason, ttl_seconds, status, created_at, expires_at, decided_at, decided_by, retrieved_at"
)


def init_data_dir(settings: Settings) -> None:
    """Create the data directory (0700), the master key (0600) and the database."""
    data_dir = settings.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if settings.key_path.exists():
        raise StoreError("already_initialized", f"{settings.key_path} exists; refusing to overwrite a master key")
    key = crypto.new_master_key()
    crypto.write_key_file(settings.key_path, key)
    key_files.fsync_dir(data_dir)
    with Store(settings, key):
        pass


class Store:
    def __init__(
        self, settings: Settings, key: crypto.MasterKey | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        # Wall-clock time for every deadline the store writes or checks (a request's expiry, a grant's end,
        # an audit entry's time); a test passes a clock it moves, so that a 15-minute grant ends without
        # waiting 15 minutes and without editing the database behind the store's back.
        self._clock = clock
        if key is None:
            key_files.ensure_key_rotation_finished(settings)
            key = crypto.read_key_file(settings.key_path)
        self._key = key
        self._local = threading.local()
        self._epoch = 0  # bumped by every commit in this process; see _read_cache
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._setup()
        self._audit_key = self._load_audit_key()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections -------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.settings.db_path, timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change. Nested inside another transaction it is a savepoint, so
        the group-commit writer can run many changes under one durable COMMIT."""
        conn = self._conn()
        local = self._local
        depth = getattr(local, "depth", 0)
        begin, commit, rollback = (
            ("BEGIN IMMEDIATE", "COMMIT", ("ROLLBACK",))
            if depth == 0
            else (f"SAVEPOINT sp{depth}", f"RELEASE sp{depth}", (f"ROLLBACK TO sp{depth}", f"RELEASE sp{depth}"))
        )
        conn.execute(begin)
        local.depth = depth + 1
        try:
            yield conn
        except BaseException:
            for statement in rollback:
                conn.execute(statement)
            raise
        else:
            conn.execute(commit)
            if depth == 0:
                self._epoch += 1
                self._announce_commit()
        finally:
            local.depth = depth
            local.cache = None

    def _announce_commit(self) -> None:
        """Close a marker file opened for writing: an inotify event that comes after the commit is visible.

        The WAL's own events come before it (SQLite publishes a commit after its fsync, which raises
        none), so without this a running server learns of another process's commit only by looking
        again later (proxy/watch.py); with it, at once.
        """
        # O_NONBLOCK: a FIFO put in its place fails at once instead of holding the commit's caller.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            os.close(os.open(self.settings.data_dir / COMMIT_MARK, flags, 0o600))
        except OSError:
            pass  # another user's marker, say: the watch's later looks still notice the commit

    def _read_cache(self) -> dict[tuple[str, str], Agent | Request | Call | None]:
        """Per-thread cache of agents and requests for the hot path, status polls.

        A commit in this process (the writer thread, this thread) bumps `_epoch`
        and drops every thread's cache at once. A commit by another process (the
        CLI over SSH) shows in SQLite's `data_version`, which costs a query, so it
        is checked at most every `RECHECK_SECONDS`: an approval or a revocation
        from the CLI reaches the server's reads within that bound. The clock ages
        cached requests too, which `get_request` checks on every hit.
        """
        local = self._local
        now = time.monotonic()
        cache: dict[tuple[str, str], Agent | Request | Call | None] | None = getattr(local, "cache", None)
        if cache is not None and local.cache_epoch == self._epoch and now - local.checked_at < RECHECK_SECONDS:
            return cache
        epoch = self._epoch
        version = self._conn().execute("PRAGMA data_version").fetchone()[0]
        if cache is None or local.cache_epoch != epoch or local.cache_version != version:
            cache = local.cache = {}
            local.cache_epoch, local.cache_version = epoch, version
        local.checked_at = now
        return cache

    def invalidate(self) -> None:
        """Drop every thread's read cache: another process committed (see `changes_since`)."""
        self._epoch += 1

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()

    def _setup(self) -> None:
        conn = self._conn()
        conn.executescript(schema.SCHEMA)
        with self.transaction() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'master_key_id'").fetchone()
            if row is None:
                audit_key = crypto.new_audit_key()
                conn.execute("INSERT INTO meta VALUES ('master_key_id', ?)", (self._key.key_id,))
                conn.execute(
                    "INSERT INTO meta VALUES ('audit_key', ?)", (crypto.wrap_audit_key(self._key, audit_key).hex(),)
                )
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(schema.SCHEMA_VERSION),))
                audit.write_head(conn, audit_key, 0, audit.GENESIS)
            elif row[0] != self._key.key_id:
                raise StoreError(
                    "wrong_master_key", f"{self.settings.key_path} is not the key this database was sealed with"
                )
            else:
                schema.migrate(conn, self._load_audit_key)

    def _load_audit_key(self, conn: sqlite3.Connection | None = None) -> crypto.AuditKey:
        row = (conn or self._conn()).execute("SELECT value FROM meta WHERE key = 'audit_key'").fetchone()
        return crypto.unwrap_audit_key(self._key, bytes.fromhex(row[0]))

    def _audit(
        self,
        conn: sqlite3.Connection,
        actor: str,
        action: str,
        request_id: str | None = None,
        secret: str | None = None,
        **detail: object,
    ) -> None:
        audit.append(conn, self._audit_key, self._clock(), actor, action, request_id, secret, detail)

    def record(
        self, actor: str, action: str, request_id: str | None = None, secret: str | None = None, **detail: object
    ) -> None:
        """Audit an event that changes nothing else (a refusal, an operator look-up)."""
        with self.transaction() as conn:
            self._audit(conn, actor, action, request_id, secret, **detail)

    # -- secrets -----------------------------------------------------------
    def set_secret(
        self,
        name: str,
        value: bytes,
        actor: str,
        policy: Policy | None = None,
        approval: ApprovalRule | None = None,
        broker_only: bool | None = None,
    ) -> None:
        """Store a value with its use policy; `approval` None keeps the secret's approval rule (a new one's is
        `approve`), so that replacing a value never quietly loosens how much approval it needs, and
        `broker_only` None keeps whether it may be retrieved (`approval.changed_rule`)."""
        check_secret_name(name)
        if not value:
            raise StoreError("invalid_request", "a secret value must not be empty")
        sealed = crypto.seal(self._key, name, value)
        with self.transaction() as conn:
            existed = conn.execute("SELECT approval FROM secrets WHERE name = ?", (name,)).fetchone()
            current = ApprovalRule.from_json(existed[0] if existed else None)
            rule_json = changed_rule(current, approval, broker_only).to_json()
            conn.execute(
                "INSERT OR REPLACE INTO secrets (name, wrapped_key, ciphertext, updated_at, policy, approval)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    name,
                    sealed.wrapped_key,
                    sealed.ciphertext,
                    self._clock(),
                    policy.to_json() if policy else None,
                    rule_json,
                ),
            )
            self._audit(
                conn,
                actor,
                "secret.set",
                secret=name,
                replaced=bool(existed),
                policy=policy.lines() if policy else None,
                approval=ApprovalRule.from_json(rule_json).lines(),
            )
            self._end_grants(conn, actor, "the secret's value or use policy changed", "secret = ?", (name,))

    def set_approval(
        self, name: str, rule: ApprovalRule | None, actor: str, broker_only: bool | None = None
    ) -> ApprovalRule:
        """Change only a secret's approval rule (None: keep it) and whether it may be retrieved (None: keep
        that); return the rule now in force. Pending requests keep the rule they were created under."""
        with self.transaction() as conn:
            row = conn.execute("SELECT approval FROM secrets WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise StoreError("unknown_secret", f"no secret named {name!r}; store it with `secrets set` first")
            rule = changed_rule(ApprovalRule.from_json(row[0]), rule, broker_only)
            conn.execute("UPDATE secrets SET approval = ? WHERE name = ?", (rule.to_json(), name))
            self._audit(
                conn,
                actor,
                "secret.approval_set",
                secret=name,
                was=ApprovalRule.from_json(row[0]).lines(),
                approval=rule.lines(),
            )
            self._end_grants(conn, actor, "the secret's approval rule changed", "secret = ?", (name,))
        return rule

    def get_approval(self, name: str) -> ApprovalRule:
        row = self._conn().execute("SELECT approval FROM secrets WHERE name = ?", (name,)).fetchone()
        return ApprovalRule.from_json(row[0] if row else None)

    def request_rule(self, request_id: str) -> ApprovalRule:
        """The approval rule a request was created under: the one it is decided by."""
        row = self._conn().execute("SELECT approval FROM requests WHERE id = ?", (request_id,)).fetchone()
        return ApprovalRule.from_json(row[0] if row else None)

    def votes(self, request_id: str) -> list[str]:
        """The actors whose approvals count toward a request's quorum, first first (one per person)."""
        rows = self._conn().execute("SELECT actor FROM votes WHERE request_id = ? ORDER BY ts", (request_id,))
        return [r[0] for r in rows]

    def get_policy(self, name: str) -> Policy | None:
        row = self._conn().execute("SELECT policy FROM secrets WHERE name = ?", (name,)).fetchone()
        return Policy.from_json(row[0]) if row and row[0] else None

    def get_call(self, request_id: str) -> Call | None:
        """The exact call a request asks to make, or None for a plain retrieval request.

        Cached like requests (a call never changes once asked): every status poll shows whether
        its request is a call."""
        cache = self._read_cache()
        key = ("call", request_id)
        if key in cache:
            hit = cache[key]
            return hit if isinstance(hit, Call) else None
        row = (
            self._conn()
            .execute(
                "SELECT method, url, headers, body_sha256, body_size FROM calls WHERE request_id = ?", (request_id,)
            )
            .fetchone()
        )
        call = (
            None
            if row is None
            else Call(row[0], row[1], tuple((h[0], h[1]) for h in json.loads(row[2])), row[3], row[4])
        )
        cache[key] = call
        return call

    def call_body(self, request_id: str) -> bytes | None:
        """The body of a call as asked, kept until the call is made or expires; None if asked by its hash."""
        row = self._conn().execute("SELECT body FROM calls WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def secrets_in_scope(self, agent: Agent) -> list[tuple[str, Policy | None, ApprovalRule]]:
        """The secrets `agent` may ask for, with their use policies and approval rules (never a value)."""
        rows = self._conn().execute("SELECT name, policy, approval FROM secrets ORDER BY name")
        return [
            (name, Policy.from_json(p) if p else None, ApprovalRule.from_json(a))
            for name, p, a in rows
            if agent.may_request(name)
        ]

    def delete_secret(self, name: str, actor: str) -> None:
        with self.transaction() as conn:
            if conn.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount == 0:
                raise StoreError("unknown_secret", f"no secret named {name!r}")
            self._audit(conn, actor, "secret.deleted", secret=name)
            self._end_grants(conn, actor, "the secret was deleted", "secret = ?", (name,))

    def list_secrets(self) -> list[tuple[str, float]]:
        return [tuple(r) for r in self._conn().execute("SELECT name, updated_at FROM secrets ORDER BY name")]

    def secret_exists(self, name: str) -> bool:
        return self._conn().execute("SELECT 1 FROM secrets WHERE name = ?", (name,)).fetchone() is not None

    # -- figures (proxy/metrics.py) ------------------------------------------
    def figures(self, latency_bounds: tuple[float, ...]) -> Figures:
        """Counts for the metrics listener, read in one snapshot: no name, id or value leaves here.

        The approval latency is over people's decisions only (Telegram and the operator's CLI), not the
        rule's or a grant's, which take no time; by decision and by whom (`telegram`, `operator`)."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            secrets = conn.execute("SELECT COUNT(*) FROM secrets").fetchone()[0]
            agents = conn.execute("SELECT COUNT(*) FROM agents").fetchone()[0]
            by_status = dict(conn.execute("SELECT status, COUNT(*) FROM requests GROUP BY status").fetchall())
            audit_entries = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[0]
            within = ", ".join("SUM(seconds <= ?)" for _ in latency_bounds)
            rows = conn.execute(
                f"SELECT decision, who, {within}, COUNT(*), SUM(seconds) FROM ("
                " SELECT CASE status WHEN 'denied' THEN 'denied' ELSE 'approved' END AS decision,"
                " substr(decided_by, 1, instr(decided_by, ':') - 1) AS who, decided_at - created_at AS seconds"
                " FROM requests WHERE decided_at IS NOT NULL"
                " AND (decided_by LIKE 'telegram:%' OR decided_by LIKE 'operator:%')"
                " AND status != 'cancelled') GROUP BY decision, who",
                latency_bounds,
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        decisions = {
            (r[0], r[1]): Latencies(tuple(int(c) for c in r[2 : 2 + len(latency_bounds)]), r[-2], float(r[-1]))
            for r in rows
        }
        size = sum(
            os.stat(path).st_size
            for path in (self.settings.db_path, self.settings.db_path.with_name(self.settings.db_path.name + "-wal"))
            if path.exists()
        )
        return Figures(secrets, agents, {s: by_status.get(s, 0) for s in STATUSES}, audit_entries, size, decisions)

    # -- agents ------------------------------------------------------------
    def add_agent(self, name: str, scopes: list[str], actor: str) -> str:
        if not AGENT_NAME_RE.fullmatch(name):
            raise StoreError("invalid_request", f"agent name must match {wire.AGENT_NAME}")
        scopes = [s.strip() for s in scopes if s.strip()]
        if not scopes or any(not SCOPE_RE.fullmatch(s) for s in scopes):
            raise StoreError(
                "invalid_request", "give one or more secret-name patterns (letters, digits, _.-, and globs *?[])"
            )
        token = "spx_" + pysecrets.token_urlsafe(32)
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone():
                raise StoreError("agent_exists", f"an agent named {name!r} exists; revoke it first")
            conn.execute(
                "INSERT INTO agents (name, token_hash, scopes, created_at) VALUES (?, ?, ?, ?)",
                (name, crypto.hash_token(token), ",".join(scopes), self._clock()),
            )
            self._audit(conn, actor, "agent.added", agent=name, scopes=scopes)
        return token

    def revoke_agent(self, name: str, actor: str) -> None:
        with self.transaction() as conn:
            # The row goes, so the name can be reused; the audit log keeps the history.
            if conn.execute("DELETE FROM agents WHERE name = ?", (name,)).rowcount == 0:
                raise StoreError("unknown_agent", f"no agent named {name!r}")
            self._audit(conn, actor, "agent.revoked", agent=name)
            self._end_grants(conn, actor, "the agent's token was revoked", "agent = ?", (name,))

    def list_agents(self) -> list[Agent]:
        rows = self._conn().execute("SELECT name, scopes, created_at FROM agents ORDER BY name")
        return [Agent(r[0], tuple(r[1].split(",")), r[2]) for r in rows]

    def authenticate(self, token: str) -> Agent | None:
        digest = crypto.hash_token(token)
        cache = self._read_cache()
        key = ("agent", digest)
        hit = cache.get(key)
        if isinstance(hit, Agent):  # an "agent" key only ever holds an Agent
            return hit
        agent = self._authenticate(digest)
        if agent is not None:  # unknown tokens are not cached: a flood of them would grow the cache
            cache[key] = agent
        return agent

    def _authenticate(self, digest: str) -> Agent | None:
        row = (
            self._conn()
            .execute("SELECT name, scopes, created_at, token_hash FROM agents WHERE token_hash = ?", (digest,))
            .fetchone()
        )
        if row is None or not crypto.tokens_equal(row[3], digest):
            return None
        return Agent(row[0], tuple(row[1].split(",")), row[2])

    # -- requests ----------------------------------------------------------
    def create_request(
        self,
        agent: Agent,
        secret: str,
        reason: str,
        ttl_seconds: int,
        call: Call | None = None,
        body: bytes | None = None,
    ) -> Request:
        """A new pending request (to retrieve, or to make `call`); a refusal raises StoreError and writes nothing.

        The caller has checked `call` against the secret's policy (`broker.check_call`), and `body`
        (None when the agent asked by the body's hash) against `call`'s hash and size."""
        actor = f"agent:{agent.name}"
        now = self._clock()
        refusal: StoreError | None = None
        if not agent.may_request(secret):
            raise StoreError("forbidden", f"agent {agent.name!r} may not request {secret!r}", secret=secret)
        if not self.secret_exists(secret):
            raise StoreError("unknown_secret", f"no secret named {secret!r}", secret=secret)
        if call is None and self.get_approval(secret).broker_only:
            raise StoreError(
                "broker_only",
                f"{secret!r} can only be used in a brokered call (POST /v1/calls), never retrieved",
                secret=secret,
            )
        request_id = "req_" + pysecrets.token_urlsafe(24)
        with self.transaction() as conn:
            rule_row = conn.execute("SELECT approval FROM secrets WHERE name = ?", (secret,)).fetchone()
            rule_json = rule_row[0] if rule_row else None
            rule = ApprovalRule.from_json(rule_json)
            pending = conn.execute(
                "SELECT COUNT(*) FROM requests WHERE agent = ? AND status = 'pending' AND expires_at > ?",
                (agent.name, now),
            ).fetchone()[0]
            if rule.kind == "deny":
                refusal = StoreError(
                    "denied",
                    f"{secret!r} is never handed out or used: its approval rule is `deny`; ask the operator",
                    kind="rule_denies",
                    secret=secret,
                )
            elif pending >= self.settings.max_pending_per_agent:
                refusal = StoreError(
                    "rate_limited",
                    f"agent has {pending} pending requests (limit {self.settings.max_pending_per_agent}); "
                    "wait for decisions",
                    kind="too_many_pending",
                    secret=secret,
                )
            else:
                conn.execute(
                    f"INSERT INTO requests ({_REQUEST_COLS}, approval)"
                    " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, NULL, NULL, NULL, ?)",
                    (
                        request_id,
                        agent.name,
                        secret,
                        reason,
                        ttl_seconds,
                        now,
                        now + self.settings.pending_timeout_seconds,
                        rule_json,
                    ),
                )
                call_detail: dict[str, object] = {}
                if call is not None:
                    conn.execute(
                        "INSERT INTO calls (request_id, method, url, headers, body_sha256, body_size, body)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            request_id,
                            call.method,
                            call.url,
                            json.dumps(call.headers),
                            call.body_sha256,
                            call.body_size,
                            body,
                        ),
                    )
                    call_detail = {
                        "call": {
                            "method": call.method,
                            "url": call.url,
                            "body_sha256": call.body_sha256,
                            "body_size": call.body_size,
                        }
                    }
                self._audit(
                    conn,
                    actor,
                    "request.created",
                    request_id,
                    secret,
                    reason=reason,
                    ttl_seconds=ttl_seconds,
                    approval=rule.kind if rule.kind != "quorum" else f"quorum:{rule.needed}",
                    **call_detail,
                )
                grant = self._live_grant(conn, agent.name, secret, call, now) if rule.kind == "approve" else None
                if rule.kind == "auto" or grant is not None:
                    # No new tap: approved in the transaction that made it, audited as the proxy's decision
                    # with the rule or the grant that allowed it.
                    conn.execute(
                        "UPDATE requests SET status = 'approved', decided_at = ?, decided_by = ?,"
                        " expires_at = ? WHERE id = ?",
                        (now, f"grant:{grant.id}" if grant else "proxy:auto", now + ttl_seconds, request_id),
                    )
                    used: dict[str, object] = {"grant": grant.id} if grant else {"rule": "auto"}
                    self._audit(conn, "proxy", "request.approved", request_id, secret, **used)
                    if grant is not None and grant.calls_left is not None:
                        conn.execute("UPDATE grants SET calls_left = calls_left - 1 WHERE id = ?", (grant.id,))
                        if grant.calls_left <= 1:
                            self._end_grants(conn, "proxy", "its calls are used up", "id = ?", (grant.id,))
        if refusal is not None:
            raise refusal
        return self.get_request(request_id)  # type: ignore[return-value]

    def get_request(self, request_id: str) -> Request | None:
        cache = self._read_cache()
        key = ("request", request_id)
        hit = cache.get(key)
        if isinstance(hit, Request):  # a "request" key only ever holds a Request
            req = hit
        else:
            row = self._conn().execute(f"SELECT {_REQUEST_COLS} FROM requests WHERE id = ?", (request_id,)).fetchone()
            if row is None:
                return None
            req = cache[key] = Request(*row)
        if req.status in ("pending", "approved") and req.expires_at <= self._clock():
            # Report it expired without writing: reads run on the event loop, and the
            # sweeper (or the next write) records the expiry within a second.
            return replace(req, status="expired")
        return req

    def list_requests(self, status: str | None = None) -> list[Request]:
        self.expire_due()
        if status is None:
            rows = self._conn().execute(f"SELECT {_REQUEST_COLS} FROM requests ORDER BY created_at")
        else:
            rows = self._conn().execute(
                f"SELECT {_REQUEST_COLS} FROM requests WHERE status = ? ORDER BY created_at", (status,)
            )
        return [Request(*r) for r in rows]

    def agent_requests(self, agent: Agent, status: str | None = None, limit: int = 50) -> list[Request]:
        """`agent`'s own requests, newest first (never another agent's)."""
        self.expire_due()
        where, args = (
            ("agent = ?", (agent.name,)) if status is None else ("agent = ? AND status = ?", (agent.name, status))
        )
        rows = self._conn().execute(
            f"SELECT {_REQUEST_COLS} FROM requests WHERE {where} ORDER BY created_at DESC LIMIT ?", (*args, limit)
        )
        return [Request(*r) for r in rows]

    def cancel(self, agent: Agent, request_id: str) -> Decision:
        """Withdraw `agent`'s own pending request: `cancelled`, audited; a later decision changes nothing.

        A request no longer pending is left as it is (`changed` False): an approval the agent no
        longer wants simply expires, and a denial or a use stays on record as it was."""
        self.expire_due()
        now = self._clock()
        with self.transaction() as conn:
            row = conn.execute(
                f"SELECT {_REQUEST_COLS} FROM requests WHERE id = ? AND agent = ?", (request_id, agent.name)
            ).fetchone()
            if row is None:
                raise StoreError("not_found", "no such request")
            req = Request(*row)
            if req.status != "pending":
                return Decision(req, changed=False)
            conn.execute(
                "UPDATE requests SET status = 'cancelled', decided_at = ?, decided_by = ? WHERE id = ?",
                (now, f"agent:{agent.name}", request_id),
            )
            conn.execute("UPDATE calls SET body = NULL WHERE request_id = ?", (request_id,))
            self._audit(conn, f"agent:{agent.name}", "request.cancelled", request_id, req.secret)
        return Decision(self.get_request(request_id), changed=True)  # type: ignore[arg-type]

    def expire_due(self) -> list[Request]:
        """Mark every pending or approved request past its deadline as expired (and end every grant past its
        time); return the requests."""
        now = self._clock()
        if (
            self._conn()
            .execute("SELECT 1 FROM grants WHERE ended_at IS NULL AND expires_at <= ? LIMIT 1", (now,))
            .fetchone()
        ):
            with self.transaction() as conn:
                self._end_grants(conn, "proxy", "its time is over", "expires_at <= ?", (now,))
        due = (
            self._conn()
            .execute("SELECT id FROM requests WHERE status IN ('pending', 'approved') AND expires_at <= ?", (now,))
            .fetchall()
        )
        if not due:
            return []
        expired: list[Request] = []
        with self.transaction() as conn:
            for (request_id,) in due:
                row = conn.execute(f"SELECT {_REQUEST_COLS} FROM requests WHERE id = ?", (request_id,)).fetchone()
                before = Request(*row)
                changed = conn.execute(
                    "UPDATE requests SET status = 'expired' WHERE id = ? AND status IN ('pending', 'approved')"
                    " AND expires_at <= ?",
                    (request_id, now),
                ).rowcount
                if changed:
                    conn.execute("UPDATE calls SET body = NULL WHERE request_id = ?", (request_id,))
                    self._audit(conn, "proxy", "request.expired", request_id, before.secret, was=before.status)
                    expired.append(
                        Request(
                            *conn.execute(
                                f"SELECT {_REQUEST_COLS} FROM requests WHERE id = ?", (request_id,)
                            ).fetchone()
                        )
                    )
        return expired

    def decide(
        self, request_id: str, approve: bool, actor: str, grant_seconds: int = 0, grant_calls: int | None = None
    ) -> Decision:
        """Approve or deny a pending request. A decision is final: later ones change nothing.

        `grant_seconds` (grants.FOREVER: until revoked) approves, besides this request, the same agent's
        next ones for the same secret (for a call: the same method and destination prefix, `grant_calls`
        of them at most; None: the rule's `grant_calls`, if it sets one) for that long; only within the
        rule's `max_grant` and `grant_calls`, else refused (`forbidden`, kind `grant_not_allowed`)."""
        self.expire_due()
        now = self._clock()
        grant_refusal: StoreError | None = None
        with self.transaction() as conn:
            row = conn.execute(f"SELECT {_REQUEST_COLS} FROM requests WHERE id = ?", (request_id,)).fetchone()
            if row is None:
                self._audit(conn, actor, "decision.refused", request_id, code="not_found")
                refusal = StoreError("not_found", f"no request {request_id!r}")
            else:
                req = Request(*row)
                if req.status != "pending":
                    self._audit(
                        conn,
                        actor,
                        "decision.refused",
                        request_id,
                        req.secret,
                        code="already_decided",
                        status=req.status,
                    )
                    return Decision(req, changed=False)
                rule = ApprovalRule.from_json(
                    conn.execute("SELECT approval FROM requests WHERE id = ?", (request_id,)).fetchone()[0]
                )
                kind, _, ident = actor.partition(":")
                if kind == "telegram" and not (ident.lstrip("-").isdigit() and rule.allows_approver(int(ident))):
                    self._audit(
                        conn, actor, "decision.refused", request_id, req.secret, code="not_this_secrets_approver"
                    )
                    return Decision(req, changed=False, vote="not_allowed")
                if approve and grant_seconds:
                    # The buttons offer only the lengths the rule allows; a forged tap or a CLI flag asks for more.
                    why = None
                    if not (rule.kind == "approve" and within(grant_seconds, rule.max_grant)):
                        why = f"{req.secret!r} allows no grant that long (see `secrets show`); approve it once instead"
                    else:
                        try:
                            grant_calls = calls_within(grant_calls, rule.grant_calls)
                        except GrantError as exc:
                            why = f"{exc} (see `secrets show`); give fewer with --calls"
                    if why is not None:
                        self._audit(conn, actor, "decision.refused", request_id, req.secret, code="grant_not_allowed")
                        grant_refusal = StoreError("forbidden", why, kind="grant_not_allowed", secret=req.secret)
                votes = 0
                refusal = None
                if grant_refusal is None:
                    if approve and rule.needed > 1:
                        who = voter(actor)
                        counted = conn.execute(
                            "INSERT OR IGNORE INTO votes (request_id, voter, actor, ts) VALUES (?, ?, ?, ?)",
                            (request_id, who, actor, now),
                        ).rowcount
                        votes = conn.execute(
                            "SELECT COUNT(*) FROM votes WHERE request_id = ?", (request_id,)
                        ).fetchone()[0]
                        if not counted:  # this person's approval is in already: it counts once
                            self._audit(
                                conn,
                                actor,
                                "decision.refused",
                                request_id,
                                req.secret,
                                code="already_voted",
                                votes=votes,
                            )
                            return Decision(req, changed=False, vote="repeated", votes=votes)
                        alone = rule.decided_by_alone(who)  # the rule lets the operator decide alone
                        self._audit(
                            conn,
                            actor,
                            "request.vote",
                            request_id,
                            req.secret,
                            votes=votes,
                            needed=rule.needed,
                            voter=who,
                            **({"decides_alone": True} if alone else {}),
                        )
                        if votes < rule.needed and not alone:
                            return Decision(req, changed=True, vote="counted", votes=votes)
                    status = "approved" if approve else "denied"
                    expires_at = now + req.ttl_seconds if approve else req.expires_at
                    conn.execute(
                        "UPDATE requests SET status = ?, decided_at = ?, decided_by = ?, expires_at = ? WHERE id = ?",
                        (status, now, actor, expires_at, request_id),
                    )
                    self._audit(conn, actor, f"request.{status}", request_id, req.secret)
                    if approve and grant_seconds:
                        self._start_grant(conn, req, actor, grant_seconds, grant_calls, now)
        if refusal is not None:
            raise refusal
        if grant_refusal is not None:
            raise grant_refusal
        return Decision(self.get_request(request_id), changed=True, vote="counted" if votes else None, votes=votes)  # type: ignore[arg-type]

    # -- grants ------------------------------------------------------------
    def _start_grant(
        self, conn: sqlite3.Connection, req: Request, actor: str, seconds: int, calls: int | None, now: float
    ) -> None:
        call = self.get_call(req.id)
        grant_id = "gr_" + pysecrets.token_urlsafe(12)
        expires_at = None if seconds == FOREVER else now + seconds
        prefix = call_prefix(call) if call else None
        conn.execute(
            f"INSERT INTO grants ({_GRANT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
            (
                grant_id,
                req.agent,
                req.secret,
                call.method if call else None,
                prefix,
                calls,
                now,
                expires_at,
                actor,
                req.id,
            ),
        )
        self._audit(
            conn,
            actor,
            "grant.started",
            req.id,
            req.secret,
            grant=grant_id,
            agent=req.agent,
            method=call.method if call else None,
            url_prefix=prefix,
            calls=calls,
            expires_at=expires_at,
        )

    def _live_grant(
        self, conn: sqlite3.Connection, agent: str, secret: str, call: Call | None, now: float
    ) -> Grant | None:
        rows = conn.execute(
            f"SELECT {_GRANT_COLS} FROM grants WHERE agent = ? AND secret = ? AND ended_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > ?) AND (calls_left IS NULL OR calls_left > 0)"
            " ORDER BY created_at",
            (agent, secret, now),
        ).fetchall()
        return next((g for g in (Grant(*r) for r in rows) if g.covers(call)), None)

    def _end_grants(self, conn: sqlite3.Connection, actor: str, why: str, where: str, args: tuple[object, ...]) -> int:
        """End every live grant matching `where`, each audited; the ones already over are left as they are."""
        live = conn.execute(
            f"SELECT id, secret, request_id FROM grants WHERE ended_at IS NULL AND {where}", args
        ).fetchall()
        for grant_id, secret, request_id in live:
            conn.execute("UPDATE grants SET ended_at = ?, ended_why = ? WHERE id = ?", (self._clock(), why, grant_id))
            self._audit(conn, actor, "grant.ended", request_id, secret, grant=grant_id, why=why)
        return len(live)

    def grant_of(self, request_id: str) -> Grant | None:
        """The grant an approval of `request_id` started, if any."""
        row = self._conn().execute(f"SELECT {_GRANT_COLS} FROM grants WHERE request_id = ?", (request_id,)).fetchone()
        return Grant(*row) if row else None

    def grants_ended_unshown(self) -> list[tuple[Grant, Request, int, int]]:
        """Ended grants whose request's Telegram message does not say so yet, with where that message is."""
        rows = (
            self._conn()
            .execute(
                f"SELECT {', '.join('g.' + c.strip() for c in _GRANT_COLS.split(','))}, m.chat_id, m.message_id"
                " FROM grants g JOIN telegram_messages m ON m.request_id = g.request_id"
                " WHERE g.ended_at IS NOT NULL AND g.ended_shown = 0"
            )
            .fetchall()
        )
        out = []
        for r in rows:
            req = self.get_request(r[9])
            if req is not None:
                out.append((Grant(*r[:12]), req, r[12], r[13]))
        return out

    def mark_grant_end_shown(self, grant_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE grants SET ended_shown = 1 WHERE id = ?", (grant_id,))

    def revoke_grant(self, grant_id: str, actor: str) -> None:
        with self.transaction() as conn:
            if not self._end_grants(conn, actor, f"revoked by {actor}", "id = ?", (grant_id,)):
                raise StoreError("not_found", f"no live grant {grant_id!r}; see `python -m proxy grants list`")

    def list_grants(self, live_only: bool = True) -> list[Grant]:
        self.expire_due()
        where = " WHERE ended_at IS NULL" if live_only else ""
        rows = self._conn().execute(f"SELECT {_GRANT_COLS} FROM grants{where} ORDER BY created_at")
        return [Grant(*r) for r in rows]

    def retrieve(self, agent: Agent, request_id: str) -> tuple[str, bytes]:
        """Hand out an approved value once; every other case is a refusal with its own code.

        The value is decrypted (and checked to be text) inside the transaction that marks
        the request retrieved, so a value that cannot be handed out leaves it approved.
        A refusal writes nothing; the caller audits it.
        """
        actor = f"agent:{agent.name}"
        now = self._clock()
        self.expire_due()
        with self.transaction() as conn:
            req, approved_call = self._usable_request(conn, agent, request_id, now, call=False)
            if approved_call is not None:
                raise StoreError(
                    "broker_only",
                    f"this request approved a call, not a retrieval; make it with POST /v1/requests/{request_id}/call",
                    secret=req.secret,
                )
            if self.get_approval(req.secret).broker_only:  # as the rule is now: a tightening applies at once
                raise StoreError(
                    "broker_only",
                    f"{req.secret!r} can only be used in a brokered call, never retrieved",
                    secret=req.secret,
                )
            sealed, _ = self._sealed_secret(conn, req.secret)
            value = crypto.open_sealed(self._current_key(conn), req.secret, sealed)
            try:
                value.decode()
            except UnicodeDecodeError:
                raise StoreError(
                    "internal_error",
                    "the stored value is not UTF-8 text; store it again as text",
                    kind="not_text",
                    secret=req.secret,
                ) from None
            conn.execute("UPDATE requests SET status = 'retrieved', retrieved_at = ? WHERE id = ?", (now, request_id))
            self._audit(conn, actor, "secret.retrieved", request_id, req.secret)
        return req.secret, value

    def claim_call(self, agent: Agent, request_id: str, call: Call) -> tuple[str, bytes, Policy]:
        """Use up an approved call request, if `call` is exactly the one approved; return what making it needs.

        Claimed before the call is made, in one transaction with its audit entry, so two
        concurrent executions cannot both pass: one approval, one call. A call that differs
        from the approved one (method, URL, headers, body) is refused and leaves the approval
        unused. The policy is read again here: the operator may have narrowed it since.
        """
        actor = f"agent:{agent.name}"
        now = self._clock()
        self.expire_due()
        with self.transaction() as conn:
            req, approved = self._usable_request(conn, agent, request_id, now, call=True)
            if approved != call:
                differs = [
                    f
                    for f in ("method", "url", "headers", "body_sha256", "body_size")
                    if getattr(approved, f) != getattr(call, f)
                ]
                raise StoreError(
                    "call_mismatch",
                    f"this call is not the one approved (its {', '.join(differs)} differ); ask for a new approval",
                    secret=req.secret,
                )
            sealed, policy_json = self._sealed_secret(conn, req.secret)
            if not policy_json:
                raise StoreError("no_policy", f"secret {req.secret!r} no longer has a use policy", secret=req.secret)
            policy = Policy.from_json(policy_json)
            value = crypto.open_sealed(self._current_key(conn), req.secret, sealed)
            conn.execute("UPDATE requests SET status = 'used', retrieved_at = ? WHERE id = ?", (now, request_id))
            conn.execute("UPDATE calls SET body = NULL WHERE request_id = ?", (request_id,))  # kept until made
            self._audit(conn, actor, "call.started", request_id, req.secret, method=call.method, url=call.url)
        return req.secret, value, policy

    def _usable_request(
        self, conn: sqlite3.Connection, agent: Agent, request_id: str, now: float, *, call: bool
    ) -> tuple[Request, Call | None]:
        """`agent`'s own request, refused unless approved, unused and unexpired; with the call it approves.

        Another agent's request is "not found", never "denied": its id tells nothing. For a
        call (`call=True`) a request that approves no call is not found either.
        """
        row = conn.execute(
            f"SELECT {_REQUEST_COLS} FROM requests WHERE id = ? AND agent = ?", (request_id, agent.name)
        ).fetchone()
        approved = self.get_call(request_id) if row else None
        if row is None or (call and approved is None):
            raise StoreError("not_found", "no such call request" if call else "no such request")
        req = Request(*row)
        refusal = _retrieval_refusal(req, now)
        if refusal is not None:
            raise refusal
        return req, approved

    def _sealed_secret(self, conn: sqlite3.Connection, name: str) -> tuple[crypto.Sealed, str | None]:
        """The sealed value of secret `name` and its use policy (JSON), for a request that names it."""
        row = conn.execute("SELECT wrapped_key, ciphertext, policy FROM secrets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError("unknown_secret", f"secret {name!r} was deleted", secret=name)
        return crypto.Sealed(row[0], row[1]), row[2]

    def _current_key(self, conn: sqlite3.Connection) -> crypto.MasterKey:
        """The key the database is sealed with now: the CLI may have rotated it since we started.

        Read inside a transaction, so a rotation cannot commit meanwhile. The rotation writes
        `master.key.new` before its commit and renames it after, so the new key is in one of
        the two files whenever the database names it.
        """
        key_id = conn.execute("SELECT value FROM meta WHERE key = 'master_key_id'").fetchone()[0]
        if key_id == self._key.key_id:
            return self._key
        for path in (self.settings.key_path, self.settings.key_path.with_suffix(".key.new")):
            try:
                key = crypto.read_key_file(path)
            except (crypto.CryptoError, OSError):
                continue
            if key.key_id == key_id:
                self._key = key
                return key
        raise StoreError(
            "internal_error",
            f"the database is sealed with master key {key_id}, which is in "
            f"neither {self.settings.key_path} nor master.key.new; restore that key file",
            kind="master_key_missing",
        )

    # -- audit and keys ----------------------------------------------------
    def last_audit_seq(self) -> int:
        row = self._conn().execute("SELECT MAX(seq) FROM audit").fetchone()
        return row[0] or 0

    def changes_since(self, seq: int) -> tuple[int, list[str]]:
        """The request ids that entries after `seq` name, committed by any process, and the new last seq.

        Every change to a request is audited in its own transaction, so the log is also the
        feed of changes that wakes waiting agents (`proxy/state.py`).
        """
        rows = self._conn().execute("SELECT seq, request_id FROM audit WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        if not rows:
            return seq, []
        return rows[-1][0], [r[1] for r in rows if r[1] is not None]

    def audit_entries(self, limit: int | None = None) -> list[audit.AuditEntry]:
        return audit.entries(self._conn(), limit)

    def audit_verify(self) -> list[str]:
        return audit.verify(self._conn(), self._audit_key)

    def rotate_master_key(self, actor: str) -> str:
        """Re-wrap every data key under a fresh master key; values are never decrypted.

        Crash safety: holding the write lock, the new key is written beside the old as
        `master.key.new`, the database commits the re-wrapped keys and the new key id
        together, then the file is renamed over the old one. `ensure_key_rotation_finished`
        completes or undoes an interrupted rotation at the next start, by comparing key
        ids under the same lock. A running proxy follows the new key (`_current_key`).
        """
        new = crypto.new_master_key()
        pending = self.settings.key_path.with_suffix(".key.new")
        with self.transaction() as conn:  # the write lock first: see ensure_key_rotation_finished
            old = self._current_key(conn)
            pending.unlink(missing_ok=True)
            crypto.write_key_file(pending, new)
            for name, wrapped in conn.execute("SELECT name, wrapped_key FROM secrets").fetchall():
                conn.execute(
                    "UPDATE secrets SET wrapped_key = ? WHERE name = ?", (crypto.rewrap(old, new, name, wrapped), name)
                )
            audit_wrapped = crypto.wrap_audit_key(new, self._audit_key)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_key'", (audit_wrapped.hex(),))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'master_key_id'", (new.key_id,))
            self._audit(conn, actor, "master_key.rotated", old_key_id=old.key_id, new_key_id=new.key_id)
        key_files.replace_if_present(pending, self.settings.key_path)
        key_files.fsync_dir(self.settings.data_dir)
        self._key = new
        return new.key_id

    # -- Telegram message bookkeeping ---------------------------------------
    def remember_message(self, request_id: str, chat_id: int, message_id: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO telegram_messages (request_id, chat_id, message_id, closed)"
                " VALUES (?, ?, ?, 0)",
                (request_id, chat_id, message_id),
            )

    def messages_to_close(self) -> list[tuple[Request, int, int]]:
        """Telegram messages still showing buttons for a request that is no longer pending."""
        self.expire_due()
        rows = (
            self._conn()
            .execute(
                f"SELECT {', '.join('r.' + c.strip() for c in _REQUEST_COLS.split(','))}, m.chat_id, m.message_id"
                " FROM telegram_messages m JOIN requests r ON r.id = m.request_id"
                " WHERE m.closed = 0 AND r.status != 'pending'"
            )
            .fetchall()
        )
        return [(Request(*r[:11]), r[11], r[12]) for r in rows]

    def messages_to_refresh(self) -> list[tuple[Request, int, int, int]]:
        """Open Telegram messages of pending requests whose count of approvals changed since they were shown
        (a tap, the operator's CLI in another process), with that count."""
        rows = (
            self._conn()
            .execute(
                f"SELECT {', '.join('r.' + c.strip() for c in _REQUEST_COLS.split(','))}, m.chat_id, m.message_id,"
                " (SELECT COUNT(*) FROM votes v WHERE v.request_id = r.id) AS n"
                " FROM telegram_messages m JOIN requests r ON r.id = m.request_id"
                " WHERE m.closed = 0 AND r.status = 'pending' AND n != m.votes_shown"
            )
            .fetchall()
        )
        return [(Request(*r[:11]), r[11], r[12], r[13]) for r in rows]

    def mark_votes_shown(self, request_id: str, votes: int) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE telegram_messages SET votes_shown = ? WHERE request_id = ?", (votes, request_id))

    def telegram_message(self, request_id: str) -> tuple[int, int] | None:
        """(chat id, message id) of the message that shows the request, to bind taps to it."""
        row = (
            self._conn()
            .execute("SELECT chat_id, message_id FROM telegram_messages WHERE request_id = ?", (request_id,))
            .fetchone()
        )
        return (row[0], row[1]) if row else None

    def mark_message_closed(self, request_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE telegram_messages SET closed = 1 WHERE request_id = ?", (request_id,))

    def unposted_pending(self) -> list[Request]:
        """Pending requests that no Telegram message shows yet (Telegram was down)."""
        self.expire_due()
        rows = self._conn().execute(
            f"SELECT {_REQUEST_COLS} FROM requests WHERE status = 'pending'"
            " AND id NOT IN (SELECT request_id FROM telegram_messages) ORDER BY created_at"
        )
        return [Request(*r) for r in rows]


def _retrieval_refusal(req: Request, now: float) -> StoreError | None:
    if req.status == "pending":
        return StoreError("pending", "the request is still waiting for a decision", secret=req.secret)
    if req.status == "denied":
        return StoreError("denied", "the request was denied", secret=req.secret)
    if req.status == "retrieved":
        return StoreError("already_retrieved", "the value was already retrieved; make a new request", secret=req.secret)
    if req.status == "used":
        return StoreError(
            "already_used", "the approved call was already made; ask again for another", secret=req.secret
        )
    if req.status == "cancelled":
        return StoreError("expired", "the request was cancelled by the agent; make a new request", secret=req.secret)
    if req.status == "expired" or req.expires_at <= now:
        return StoreError("expired", "the request expired; make a new request", secret=req.secret)
    return None


def retrieval_refusal(req: Request) -> StoreError | None:
    """Why a retrieval of `req` would be refused now, from a read; None if it may go ahead."""
    return _retrieval_refusal(req, time.time())


def check_secret_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StoreError("invalid_request", f"secret name must match {wire.SECRET_NAME}")
