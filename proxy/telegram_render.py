"""What the approvers read in Telegram: a request's message while pending and once decided, and the
/pending list. Telegram's HTML parse mode; every agent-controlled field is escaped (`proxy/shown.py`),
and a brokered call is shown with every header it sends (docs/brokered-calls.md)."""

from __future__ import annotations

import html
from datetime import UTC, datetime

from telegram import User as TelegramUser

from .approval import DEFAULT, ApprovalRule
from .broker import Call
from .grants import LENGTH_NAMES, Grant
from .policy import Policy
from .shown import header_lines, visible
from .store import Request

PENDING_LIST_MAX = 20
PENDING_REASON_CHARS = 200


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def display_name(user: TelegramUser) -> str:
    name = user.full_name or f"user {user.id}"
    return f"{name} @{user.username}" if user.username else name


def _shown(text: str) -> str:
    # Every agent-controlled field is escaped: the agent must not be able to forge markup, links, buttons or lines.
    return html.escape(visible(text))


def _request_lines(req: Request, call: Call | None = None, policy: Policy | None = None) -> list[str]:
    return [
        f"Agent: <code>{_shown(req.agent)}</code>",
        f"Secret: <code>{_shown(req.secret)}</code>",
        *_call_lines(call, policy),
        f"Reason: {_shown(req.reason)}",
    ]


CALL_PATH_CHARS = 600
HEADER_VALUE_CHARS = 200
HEADERS_CHARS = 1800


def _within(lines: list[str], budget: int) -> list[str]:
    kept: list[str] = []
    for line in lines:
        budget -= len(line)
        if budget < 0:
            break
        kept.append(line)
    return kept


def _call_lines(call: Call | None, policy: Policy | None) -> list[str]:
    """What a brokered call will do with the secret: the approver approves exactly this, once."""
    if call is None:
        return []
    target = call.target
    port = "" if (target.scheme, target.port) in (("https", 443), ("http", 80)) else f":{target.port}"
    path = target.path_and_query
    if len(path) > CALL_PATH_CHARS:  # a message holds 4096 characters; the CLI shows the whole URL
        path = f"{path[:CALL_PATH_CHARS]}… ({len(path)} characters; see `python -m proxy requests list`)"
    first, rest = header_lines(call, policy, HEADER_VALUE_CHARS)
    kept = _within(rest, HEADERS_CHARS)
    if len(kept) < len(rest):  # a message holds 4096 characters; the approver is told what is not shown
        kept.append(f"… and {len(rest) - len(kept)} more headers: see `python -m proxy requests list`")
    headers = first + kept  # where the secret goes and the routing headers are never cut
    return [
        "Use: <b>one call made by the proxy</b>; the agent never sees the value",
        f"Call: <code>{_shown(call.method)}</code> to <code>{_shown(target.scheme + '://' + target.host + port)}"
        f"</code>",
        f"Path: <code>{_shown(path)}</code>",
        "Headers:" if headers else "Headers: none",
        *(f"  <code>{html.escape(h)}</code>" for h in headers),
        f"Body: {call.body_size} bytes, SHA-256 <code>{call.body_sha256[:16]}…</code>",
    ]


def rule_lines(rule: ApprovalRule, votes: list[str], names: dict[int, str]) -> list[str]:
    """The request's approval rule and where it stands; nothing for the default rule (one approver, any)."""
    out: list[str] = []
    if rule.kind == "quorum":
        so_far = ", ".join(_who(v, names) for v in votes) or "nobody yet"
        more = rule.needed - len(votes)
        alone = "; or the operator's CLI alone" if rule.operator_decides else ""
        out.append(f"Approval: <b>{rule.needed} distinct approvers</b>{alone}; one deny ends it")
        out.append(f"Approved so far: {so_far}; {more} more needed" if more > 0 else f"Approved by {so_far}")
    if rule.approvers:
        out.append(f"Only these approvers decide: {', '.join(f'id {a}' for a in rule.approvers)} (and the CLI)")
    return out


def render_pending(
    req: Request,
    call: Call | None = None,
    policy: Policy | None = None,
    rule: ApprovalRule = DEFAULT,
    votes: list[str] | None = None,
    names: dict[int, str] | None = None,
) -> str:
    return "\n".join(
        [
            "<b>Secret use request</b>" if call else "<b>Secret request</b>",
            *_request_lines(req, call, policy),
            *rule_lines(rule, votes or [], names or {}),
            f"Expires: {utc(req.expires_at)} if undecided",
            f"Request: <code>{html.escape(req.id)}</code>",
        ]
    )


def render_closed(
    req: Request,
    names: dict[int, str],
    call: Call | None = None,
    policy: Policy | None = None,
    rule: ApprovalRule = DEFAULT,
    votes: list[str] | None = None,
    grant: Grant | None = None,
) -> str:
    if req.status == "cancelled":
        title, outcome = (
            "Withdrawn",
            f"↩️ Withdrawn by the agent at {utc(req.decided_at or req.expires_at)}: nothing to decide",
        )
    elif req.decided_at is not None and req.status == "denied":
        title, outcome = "Denied", f"❌ Denied by {_who(req.decided_by, names)} at {utc(req.decided_at)}"
    elif req.decided_at is not None:
        title, outcome = "Approved", f"✅ Approved by {_who(req.decided_by, names)} at {utc(req.decided_at)}"
    else:
        title, outcome = "Expired", f"⌛ Expired undecided at {utc(req.expires_at)}"
    return "\n".join(
        [
            f"<b>Secret {'use ' if call else ''}request: {title}</b>",
            *_request_lines(req, call, policy),
            f"Request: <code>{html.escape(req.id)}</code>",
            outcome,
            *([f"Approvals: {', '.join(_who(v, names) for v in votes)}"] if rule.kind == "quorum" and votes else []),
            *grant_lines(grant),
        ]
    )


def grant_lines(grant: Grant | None) -> list[str]:
    """What a grant started by this approval covers, and whether it has ended."""
    if grant is None:
        return []
    length = "until revoked" if grant.expires_at is None else f"until {utc(grant.expires_at)}"
    scope = (
        f"<code>{_shown(grant.method)}</code> calls to <code>{_shown(grant.url_prefix or '')}</code>…"
        if grant.method
        else "retrievals"
    )
    # The approver reads how far the grant reaches: what it covers, how many more requests, until when.
    uses = "calls" if grant.method else "retrievals"
    count = f"at most {grant.calls_left} more {uses}" if grant.calls_left is not None else f"any number of {uses}"
    calls = f" ({count})" if grant.ended_at is None else ""
    out = [f"🔓 Grant <code>{html.escape(grant.id)}</code>: the agent's {scope} of this secret{calls}, {length}"]
    if grant.ended_at is not None:
        out.append(f"🔒 Grant ended at {utc(grant.ended_at)}: {html.escape(grant.ended_why or '')}")
    return out


def grant_button_text(seconds: int, calls: int = 0) -> str:
    """A grant button's label: its length, and the count of calls the secret's rule gives every grant."""
    return f"Approve for {LENGTH_NAMES[seconds]}" + (f", {calls} calls" if calls else "")


def render_grants(grants: list[Grant]) -> str:
    if not grants:
        return "No live grants."
    lines = [f"<b>{len(grants)} live grant{'s' if len(grants) != 1 else ''}</b>"]
    for g in grants[:PENDING_LIST_MAX]:
        lines.append(f"\n<code>{_shown(g.agent)}</code> / <code>{_shown(g.secret)}</code>")
        lines.extend(grant_lines(g))
    lines.append("\nEnd one with its button below, or `python -m proxy grants revoke ID`.")
    return "\n".join(lines)


def _who(actor: str | None, names: dict[int, str]) -> str:
    actor = actor or "unknown"
    kind, _, ident = actor.partition(":")
    if kind == "telegram" and ident.isdigit():
        name = names.get(int(ident))
        return f"{html.escape(name)} (id {ident})" if name else f"Telegram user id {ident}"
    if kind == "operator":
        return f"{html.escape(actor)} (CLI)"
    return html.escape(actor)


def render_pending_list(requests: list[Request]) -> str:
    if not requests:
        return "No pending requests."
    lines = [f"<b>{len(requests)} pending request{'s' if len(requests) != 1 else ''}</b>"]
    for req in requests[:PENDING_LIST_MAX]:
        reason = req.reason if len(req.reason) <= PENDING_REASON_CHARS else req.reason[:PENDING_REASON_CHARS] + "…"
        lines.append(
            f"\n<code>{html.escape(req.id)}</code>\n<code>{_shown(req.agent)}</code> asks for "
            f"<code>{_shown(req.secret)}</code>: {_shown(reason)}\n"
            f"expires {utc(req.expires_at)}"
        )
    if len(requests) > PENDING_LIST_MAX:
        lines.append(
            f"\n… and {len(requests) - PENDING_LIST_MAX} more (python -m proxy requests list --status pending)"
        )
    lines.append("\nDecide with the buttons on each request's message.")
    return "\n".join(lines)
