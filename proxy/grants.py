"""Time-boxed grants: an approver's "yes, for a while" to one agent and one secret.

During a grant, the same agent's requests for the same secret are approved when they are made,
each audited with the grant it used. A grant for brokered use covers only what the approver saw:
the method and the destination prefix (scheme, host, port and the path up to its last `/`) of the
approved call, never "any call with this secret", and optionally a number of calls. A grant ends at
its time, when revoked (CLI, `/grants` in the chat), when the agent's token is revoked, or when the
secret's value, use policy or approval rule changes (proxy/store.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .broker import Call

# The lengths an approver may choose, in seconds; FOREVER is "until revoked". The secret's approval
# rule caps them (`--max-grant`); the default cap is 0: "once", as before grants existed.
FOREVER = -1
LENGTHS = {"15m": 15 * 60, "1h": 60 * 60, "forever": FOREVER}
LENGTH_NAMES = {15 * 60: "15 min", 60 * 60: "1 h", FOREVER: "until revoked"}


MAX_CALLS = 1000  # the largest count a secret's rule may set for its grants (`--grant-calls`)


class GrantError(ValueError):
    """A grant length that cannot be given; the message says which can."""


@dataclass(frozen=True)
class Grant:
    id: str
    agent: str
    secret: str
    method: str | None  # for brokered use: the approved call's method; None for retrievals
    url_prefix: str | None  # for brokered use: scheme://host:port/path/up/to/last/slash/
    calls_left: int | None  # None: no count
    created_at: float
    expires_at: float | None  # None: until revoked
    granted_by: str
    request_id: str
    ended_at: float | None
    ended_why: str | None

    def covers(self, call: Call | None) -> bool:
        """Whether a new request (to retrieve, or to make `call`) is what this grant approved."""
        if self.method is None:
            return call is None
        if call is None or call.method != self.method or not self.url_prefix:
            return False
        url, prefix = call_prefix(call, whole=True), self.url_prefix
        return url == prefix or url.startswith(prefix if prefix.endswith("/") else prefix + "/")

    def shows(self) -> str:
        length = "until revoked" if self.expires_at is None else f"until {self.expires_at:.0f} (unix time)"
        scope = f"{self.method} {self.url_prefix}…" if self.method else "retrievals"
        count = f", {self.calls_left} calls left" if self.calls_left is not None else ""
        return f"{self.id}: {self.agent} / {self.secret}: {scope}{count}, {length}"


def call_prefix(call: Call, *, whole: bool = False) -> str:
    """The destination a grant for `call` covers: its scheme, host, port and path up to the last `/`, or the
    whole path when that would be `/` (a grant for `POST /graphql` must not cover every path of the host);
    `whole`: the full path, to match a later call against a prefix. The query is not part of it."""
    t = call.target
    folder = t.path[: t.path.rfind("/") + 1]
    path = t.path if whole or folder == "/" else folder
    return f"{t.scheme}://{t.host}:{t.port}{path}"


def parse_length(text: str) -> int:
    if text not in LENGTHS:
        raise GrantError(f"a grant lasts {', '.join(LENGTHS)}; got {text!r}")
    return LENGTHS[text]


def within(length: int, max_grant: int) -> bool:
    """Whether the secret's cap (`max_grant`, seconds or FOREVER; 0 allows none) allows a grant of `length`."""
    if max_grant == FOREVER:
        return True
    return length != FOREVER and 0 < length <= max_grant


def calls_within(asked: int | None, cap: int) -> int | None:
    """How many requests a new grant may approve: what was asked (None: no count), within the secret's cap
    (`--grant-calls`; 0: none). Without a count asked, the cap is the count: a Telegram button gives the most
    the rule allows, never more."""
    if asked is not None and asked < 1:
        raise GrantError(f"a grant's count of calls is at least 1; got {asked}")
    if not cap:
        return asked
    if asked is None:
        return cap
    if asked > cap:
        raise GrantError(f"this secret's grants cover at most {cap} calls; got {asked}")
    return asked
