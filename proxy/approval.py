"""How much human approval a secret needs: its approval rule, and how a request's votes add up under it.

A rule is per secret, written by the operator with the CLI: `auto` (no human; the request is
approved when it is made, still audited and rate limited), `approve` (the default: one approver),
`quorum N` (N distinct approvers; one deny ends it denied) or `deny` (never). It may name the only
Telegram approvers who may decide it, and says whether the value may be retrieved at all or only
used in brokered calls (`broker_only`, which no later rule change loosens unless it says so:
`changed_rule`). A request keeps a copy of the rule it was created under, so
that changing a secret's rule never widens a request already pending (docs/telegram.md).

Votes are counted per person, never per tap: an approver tapping twice counts once, and the
operator's CLI counts as one approver (`OPERATOR`) whoever runs it, unless the rule says the
operator alone may decide (`operator_decides`): then the CLI's approval approves a quorum by itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from .grants import LENGTH_NAMES, MAX_CALLS

KINDS = ("auto", "approve", "quorum", "deny")
MAX_QUORUM = 9
OPERATOR = "operator"  # the one vote every CLI user shares


class ApprovalError(ValueError):
    """A rule the CLI cannot store; the message says what to write instead."""


@dataclass(frozen=True)
class ApprovalRule:
    kind: str = "approve"  # one of KINDS
    needed: int = 1  # distinct approvals that approve; 1 unless a quorum
    approvers: tuple[int, ...] = ()  # Telegram user ids who may decide; empty: every configured approver
    max_grant: int = 0  # the longest grant an approver may give, seconds (grants.FOREVER: until revoked); 0: none
    # The value is never handed out, only used in brokered calls (`--broker-only`, `--retrieval refused`).
    broker_only: bool = False
    grant_calls: int = 0  # with max_grant: a grant approves at most this many requests (calls); 0: no count
    # A quorum only: the operator's CLI approval decides alone (break-glass for a quorum that cannot gather).
    # Without it the operator is one approver among the N.
    operator_decides: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "needed": self.needed,
                "approvers": list(self.approvers),
                "max_grant": self.max_grant,
                "broker_only": self.broker_only,
                "grant_calls": self.grant_calls,
                "operator_decides": self.operator_decides,
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> ApprovalRule:
        """The stored rule; None (a secret or request from before rules existed) is the default, `approve`."""
        if not text:
            return DEFAULT
        raw = json.loads(text)
        return cls(  # fields added later are absent from rules stored before them: their defaults
            raw["kind"],
            int(raw["needed"]),
            tuple(int(a) for a in raw["approvers"]),
            int(raw.get("max_grant", 0)),
            bool(raw.get("broker_only", False)),
            int(raw.get("grant_calls", 0)),
            bool(raw.get("operator_decides", False)),
        )

    def decided_by_alone(self, who: str) -> bool:
        """Whether the approval of `who` (a `voter`) approves a quorum by itself."""
        return self.kind == "quorum" and self.operator_decides and who == OPERATOR

    def allows_approver(self, user_id: int) -> bool:
        return not self.approvers or user_id in self.approvers

    def show(self) -> str:
        what = {
            "auto": "auto (no human; approved when asked, audited and rate limited)",
            "approve": "approve (one approver)",
            "quorum": f"quorum {self.needed} (distinct approvers; one deny ends it)",
            "deny": "deny (never)",
        }[self.kind]
        return what

    def lines(self) -> list[str]:
        out = [f"approval: {self.show()}"]
        if self.kind != "deny":
            out.append(
                "retrieval: refused (brokered calls only; --broker-only)"
                if self.broker_only
                else "retrieval: allowed with approval"
            )
        if self.approvers and self.kind in ("approve", "quorum"):
            out.append(f"approvers: {', '.join(str(a) for a in self.approvers)} (and the operator's CLI)")
        if self.kind == "quorum":
            out.append(
                "operator: the CLI's approval alone decides (--operator-decides)"
                if self.operator_decides
                else "operator: the CLI counts as one approver of the quorum"
            )
        if self.kind == "approve":
            longest = (
                LENGTH_NAMES.get(self.max_grant, f"{self.max_grant // 60} min")
                if self.max_grant
                else "none (each approval is for one use)"
            )
            calls = f", at most {self.grant_calls} calls each" if self.max_grant and self.grant_calls else ""
            out.append(f"longest grant: {longest}{calls}")
        return out


DEFAULT = ApprovalRule()


def voter(actor: str) -> str:
    """Who a vote counts for: one Telegram user, or the operator role however many people use the CLI."""
    return OPERATOR if actor.startswith("operator:") else actor


def parse_rule(
    spec: str,
    approvers: str | None = None,
    configured: tuple[int, ...] = (),
    max_grant: int = 0,
    operator_decides: bool = False,
    grant_calls: int | None = None,
) -> ApprovalRule:
    """`auto`, `approve`, `quorum:N` or `deny`, with an optional comma-separated subset of `configured`,
    the longest grant (seconds; -1 until revoked) an approver may give, which only `approve` allows, and
    for a quorum whether the operator's CLI alone may decide; `grant_calls` bounds each grant's requests."""
    if max_grant and spec.strip() != "approve":
        raise ApprovalError("--max-grant needs --approval approve: a grant is one approver's decision")
    if grant_calls is not None and not max_grant:
        raise ApprovalError("--grant-calls needs --max-grant: it bounds the calls of a grant")
    if grant_calls is not None and not 1 <= grant_calls <= MAX_CALLS:
        raise ApprovalError(f"--grant-calls N needs N from 1 to {MAX_CALLS}")
    kind, _, count = spec.strip().partition(":")
    if operator_decides and kind != "quorum":
        raise ApprovalError(
            "--operator-decides needs --approval quorum:N; under approve the operator's CLI already decides alone"
        )
    if kind not in KINDS or (count and kind != "quorum"):
        raise ApprovalError(f"--approval {spec!r}: write auto, approve, quorum:N or deny")
    needed = 1
    if kind == "quorum":
        if not count.isdigit() or not 2 <= int(count) <= MAX_QUORUM:
            raise ApprovalError(f"--approval quorum:N needs N from 2 to {MAX_QUORUM} (quorum:1 is `approve`)")
        needed = int(count)
    ids: tuple[int, ...] = ()
    if approvers:
        parts = [p.strip() for p in approvers.split(",") if p.strip()]
        if not parts or not all(p.lstrip("-").isdigit() for p in parts):
            raise ApprovalError("--approvers takes Telegram user ids, comma-separated (numbers, not usernames)")
        ids = tuple(sorted({int(p) for p in parts}))
        if kind not in ("approve", "quorum"):
            raise ApprovalError(f"--approvers has no meaning for --approval {kind}: nobody decides it")
        outside = [i for i in ids if configured and i not in configured]
        if outside:
            raise ApprovalError(
                f"--approvers {outside[0]} is not in SECRET_PROXY_TELEGRAM_APPROVERS; add it there first"
            )
        if needed > len(ids) + 1:  # the operator's CLI is one more approver
            raise ApprovalError(f"quorum:{needed} cannot be reached by {len(ids)} approvers and the operator")
    return ApprovalRule(
        kind, needed, ids, max_grant=max_grant, grant_calls=grant_calls or 0, operator_decides=operator_decides
    )


def changed_rule(current: ApprovalRule, given: ApprovalRule | None, broker_only: bool | None) -> ApprovalRule:
    """A secret's rule after the operator's change: `given` (None: `current` kept), and whether the value may
    be retrieved as `broker_only` says, or else as it was. Rewriting how much approval a secret needs never
    lets a broker-only value out; only `--retrieval allowed` does, and `given` asking for broker-only is kept."""
    rule = given or current
    if broker_only is None:
        broker_only = current.broker_only or rule.broker_only
    return replace(rule, broker_only=broker_only)
