"""The approval rule the operator writes (`--approval`, `--approvers`): what is accepted and what is refused."""

from __future__ import annotations

import pytest

from proxy.approval import DEFAULT, ApprovalError, ApprovalRule, parse_rule, voter


def test_rules_are_parsed_and_survive_the_store_round_trip():
    for spec, approvers, expected in (
        ("auto", None, ApprovalRule("auto")),
        ("approve", None, DEFAULT),
        ("quorum:2", "1002,1001,1001", ApprovalRule("quorum", 2, (1001, 1002))),
        ("deny", None, ApprovalRule("deny")),
    ):
        rule = parse_rule(spec, approvers, (1001, 1002, 1003))
        assert rule == expected and ApprovalRule.from_json(rule.to_json()) == rule
    assert ApprovalRule.from_json(None) == DEFAULT  # a secret or request from before rules existed


@pytest.mark.parametrize(
    ("spec", "approvers", "says"),
    [
        ("quorum", None, "N from 2"),
        ("quorum:1", None, "N from 2"),
        ("quorum:10", None, "N from 2"),
        ("approve:2", None, "write auto, approve"),
        ("sometimes", None, "write auto, approve"),
        ("approve", "@alice", "user ids"),
        ("deny", "1001", "no meaning"),
        ("approve", "1009", "not in SECRET_PROXY_TELEGRAM_APPROVERS"),
        ("quorum:3", "1001", "cannot be reached"),
    ],
)
def test_a_rule_that_cannot_mean_what_was_meant_is_refused(spec, approvers, says):
    with pytest.raises(ApprovalError, match=says):
        parse_rule(spec, approvers, (1001, 1002, 1003))


@pytest.mark.parametrize("spec", ["approve", "auto", "deny"])
def test_only_a_quorum_may_let_the_operator_decide_alone(spec):
    with pytest.raises(ApprovalError, match="--operator-decides needs --approval quorum:N"):
        parse_rule(spec, operator_decides=True)
    rule = parse_rule("quorum:2", operator_decides=True)
    assert rule.decided_by_alone("operator") and not rule.decided_by_alone("telegram:1001")
    assert not parse_rule("quorum:2").decided_by_alone("operator")
    assert ApprovalRule.from_json(rule.to_json()) == rule


def test_a_rule_stored_before_operator_decides_existed_keeps_the_operator_as_one_approver():
    stored = '{"kind": "quorum", "needed": 2, "approvers": [], "max_grant": 0}'
    assert ApprovalRule.from_json(stored) == ApprovalRule("quorum", 2)
    assert not ApprovalRule.from_json(stored).decided_by_alone("operator")


def test_every_operator_account_is_one_voter_and_each_approver_is_their_own():
    assert voter("operator:root@10.0.0.1") == voter("operator:alice") == "operator"
    assert voter("telegram:1001") != voter("telegram:1002")
    assert ApprovalRule("quorum", 2, (1001,)).allows_approver(1001)
    assert not ApprovalRule("quorum", 2, (1001,)).allows_approver(1002)
    assert DEFAULT.allows_approver(1002)


def test_a_grant_fits_within_the_secrets_longest_grant_only():
    from proxy.grants import FOREVER, GrantError, parse_length, within

    assert [parse_length(t) for t in ("15m", "1h", "forever")] == [900, 3600, FOREVER]
    with pytest.raises(GrantError, match="15m, 1h, forever"):
        parse_length("2h")
    assert within(900, 3600) and within(3600, 3600) and not within(FOREVER, 3600) and not within(900, 0)
    assert within(FOREVER, FOREVER)
    assert parse_rule("approve", max_grant=3600).max_grant == 3600
    with pytest.raises(ApprovalError, match="needs --approval approve"):
        parse_rule("quorum:2", max_grant=3600)


def test_a_rules_count_of_grant_calls_bounds_every_grant_and_needs_grants():
    from proxy.grants import GrantError, calls_within

    assert parse_rule("approve", max_grant=3600, grant_calls=5).grant_calls == 5
    for bad, says in ((0, "N from 1"), (1001, "N from 1")):
        with pytest.raises(ApprovalError, match=says):
            parse_rule("approve", max_grant=3600, grant_calls=bad)
    with pytest.raises(ApprovalError, match="--grant-calls needs --max-grant"):
        parse_rule("approve", grant_calls=5)
    assert calls_within(None, 0) is None and calls_within(3, 0) == 3  # no cap: what was asked
    assert calls_within(None, 5) == 5 and calls_within(2, 5) == 2  # a button asks nothing: the cap
    for asked in (6, 0):
        with pytest.raises(GrantError):
            calls_within(asked, 5)
