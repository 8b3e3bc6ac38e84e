"""Per-secret approval rules, end to end: a real proxy process, its python-telegram-bot against the Bot API
emulator, the agent over HTTP and the operator's CLI in another process (docs/telegram.md, "Approval rules").

Alice, Bob and Carol are approvers here; Mallory is in the chat but is not one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from proxy.store import Store
from proxy.telegram_bot import REFUSALS

from .proxy_helpers import SECRET_VALUE, cli
from .telegram_helpers import (
    ALICE,
    BOB,
    CAROL,
    CHAT,
    Rig,
    answer_to,
    message_showing,
    restart_proxy,
    start_rig,
    wait_until_polling,
)

APPROVERS = {"SECRET_PROXY_TELEGRAM_APPROVERS": f"{ALICE},{BOB},{CAROL}"}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = start_rig(tmp_path_factory.mktemp("approval"), APPROVERS)
    wait_until_polling(r)
    yield r
    r.stop()


def store_secret(rig: Rig, name: str, *flags: str) -> None:
    """The operator stores a secret with its approval rule, with the CLI (the agent alice may ask for api-*)."""
    done = cli(rig.data.settings.data_dir, "secrets", "set", name, *flags, stdin=SECRET_VALUE.encode())
    assert done.returncode == 0, done.stderr


def audit(rig: Rig, request_id: str | None = None) -> list:
    with Store(rig.data.settings) as store:
        return [e for e in store.audit_entries() if request_id is None or e.request_id == request_id]


def refusals(rig: Rig, request_id: str, code: str, user: int) -> list:
    return [
        e
        for e in audit(rig, request_id)
        if e.action == "decision.refused" and e.actor == f"telegram:{user}" and e.detail.get("code") == code
    ]


def test_a_2_of_3_quorum_needs_two_distinct_approvers_and_one_approver_twice_counts_once(rig):
    store_secret(rig, "api-quorum", "--approval", "quorum:2")
    rid = rig.ask("ship the release", "api-quorum")
    message = rig.message_for(rid)
    assert "Approval: 2 distinct approvers; one deny ends it" in message["text"]
    assert "Approved so far: nobody yet; 2 more needed" in message["text"]

    assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")) == (
        "Approval counted: 1 of 2. Nothing is approved yet."
    )
    shown = message_showing(rig, message["message_id"], "Approved so far: Alice @alice_ops (id 1001); 1 more needed")
    assert shown.get("reply_markup"), "the buttons stay while the quorum is incomplete"
    assert rig.status(rid) == "pending"
    assert rig.agent().retrieve(rid).body["error"] == "pending"

    # Alice again: her approval counts once, and the refusal is audited.
    assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")) == REFUSALS["already_voted"]
    assert refusals(rig, rid, "already_voted", ALICE)
    assert rig.status(rid) == "pending"

    assert answer_to(rig, rig.emu.tap(CAROL, CHAT, message["message_id"], f"a:{rid}")) == "Approved."
    assert rig.status(rid) == "approved"
    assert rig.agent().retrieve(rid).body["value"] == SECRET_VALUE
    closed = message_showing(rig, message["message_id"], "Approvals: Alice @alice_ops (id 1001), Carol @carol_ops")
    assert "reply_markup" not in closed
    entries = audit(rig, rid)
    assert [e.detail["votes"] for e in entries if e.action == "request.vote"] == [1, 2]
    assert [e.actor for e in entries if e.action == "request.approved"] == [f"telegram:{CAROL}"]


def test_one_deny_ends_a_quorum_denied(rig):
    store_secret(rig, "api-quorum-deny", "--approval", "quorum:2")
    rid = rig.ask("ship it", "api-quorum-deny")
    message = rig.message_for(rid)
    assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")).startswith("Approval counted")
    assert answer_to(rig, rig.emu.tap(BOB, CHAT, message["message_id"], f"d:{rid}")) == "Denied."
    assert rig.status(rid) == "denied"
    assert rig.agent().retrieve(rid).body["error"] == "denied"
    # Carol's late approval changes nothing.
    assert answer_to(rig, rig.emu.tap(CAROL, CHAT, message["message_id"], f"a:{rid}")) == REFUSALS["already_decided"]
    assert rig.status(rid) == "denied"


def test_the_operators_cli_counts_as_one_approver_of_a_quorum(rig):
    store_secret(rig, "api-quorum-cli", "--approval", "quorum:2")
    rid = rig.ask("operator and one approver", "api-quorum-cli")
    message = rig.message_for(rid)
    first = cli(rig.data.settings.data_dir, "approve", rid)
    assert first.returncode == 0 and b"1 of 2" in first.stdout, first.stderr
    # Another operator account (or the same one again) is still the operator: one vote.
    again = cli(
        rig.data.settings.data_dir,
        "approve",
        rid,
        env={**os.environ, "USER": "someone-else", "LOGNAME": "someone-else"},
    )
    assert again.returncode == 1 and b"counts as one approver" in again.stderr
    assert rig.status(rid) == "pending"
    message_showing(rig, message["message_id"], "(CLI); 1 more needed")
    assert answer_to(rig, rig.emu.tap(BOB, CHAT, message["message_id"], f"a:{rid}")) == "Approved."
    assert rig.status(rid) == "approved"
    votes = [e for e in audit(rig, rid) if e.action == "request.vote"]
    assert [e.detail["voter"] for e in votes] == ["operator", f"telegram:{BOB}"]
    shown = cli(rig.data.settings.data_dir, "secrets", "show", "api-quorum-cli")
    assert b"operator: the CLI counts as one approver of the quorum" in shown.stdout


def test_a_quorum_that_lets_the_operator_decide_is_approved_by_the_cli_alone_and_by_no_single_approver(rig):
    store_secret(rig, "api-quorum-op", "--approval", "quorum:2", "--operator-decides")
    shown = cli(rig.data.settings.data_dir, "secrets", "show", "api-quorum-op")
    assert b"operator: the CLI's approval alone decides (--operator-decides)" in shown.stdout, shown.stderr
    rid = rig.ask("the approvers are asleep", "api-quorum-op")
    message = rig.message_for(rid)
    assert "Approval: 2 distinct approvers; or the operator's CLI alone; one deny ends it" in message["text"]
    # An approver is still one of two: only the operator's role decides alone.
    assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")).startswith("Approval counted")
    assert rig.status(rid) == "pending"
    alone = rig.ask("nobody else is around", "api-quorum-op")
    done = cli(rig.data.settings.data_dir, "approve", alone)
    assert done.returncode == 0 and b"by the operator alone" in done.stdout, done.stderr
    assert rig.status(alone) == "approved"
    assert rig.agent().retrieve(alone).body["value"] == SECRET_VALUE
    message_showing(rig, rig.message_for(alone)["message_id"], "✅ Approved by operator:")
    entries = audit(rig, alone)
    assert [(e.detail["voter"], e.detail["decides_alone"]) for e in entries if e.action == "request.vote"] == [
        ("operator", True)
    ]
    assert [e.actor.split(":")[0] for e in entries if e.action == "request.approved"] == ["operator"]


def test_an_auto_secret_is_approved_at_once_audited_and_never_posted(rig):
    store_secret(rig, "api-auto", "--approval", "auto")
    created = rig.agent().ask("api-auto", "read the weather")
    assert created.status == 201 and created.body["status"] == "approved", created.body
    rid = created.body["id"]
    assert rig.agent().status(rid).body["decided_by"] == "proxy"
    assert rig.agent().retrieve(rid).body["value"] == SECRET_VALUE
    assert rig.agent().retrieve(rid).body["error"] == "already_retrieved"
    actions = [(e.actor, e.action, e.detail.get("rule")) for e in audit(rig, rid)]
    assert actions[:2] == [("agent:alice", "request.created", None), ("proxy", "request.approved", "auto")]
    assert not [m for m in rig.emu.messages(CHAT) if rid in m["text"]]


def test_a_deny_secret_is_refused_when_asked_and_audited(rig):
    store_secret(rig, "api-never", "--approval", "deny")
    refused = rig.agent().ask("api-never", "please")
    assert refused.status == 403 and refused.body["error"] == "denied", refused.body
    assert "approval rule is `deny`" in refused.body["detail"]
    assert [e for e in audit(rig) if e.action == "request.refused" and e.secret == "api-never"]
    assert not [m for m in rig.emu.messages(CHAT) if "api-never" in m["text"]]
    # ... and the agent's list says so before it asks: neither retrieval nor a call is open to it.
    listed = httpx.get(f"{rig.url}/v1/secrets", headers={"Authorization": f"Bearer {rig.data.token}"}, timeout=30)
    view = next(v for v in listed.json()["secrets"] if v["name"] == "api-never")
    assert (view["retrieve"], view["call"]) == (False, False)


def test_an_approver_outside_the_secrets_approvers_is_refused_and_audited(rig):
    store_secret(rig, "api-alice-only", "--approval", "approve", "--approvers", str(ALICE))
    rid = rig.ask("only Alice decides this", "api-alice-only")
    message = rig.message_for(rid)
    assert "Only these approvers decide: id 1001 (and the CLI)" in message["text"]
    for tap in (f"a:{rid}", f"d:{rid}"):
        assert (
            answer_to(rig, rig.emu.tap(BOB, CHAT, message["message_id"], tap)) == REFUSALS["not_this_secrets_approver"]
        )
    assert len(refusals(rig, rid, "not_this_secrets_approver", BOB)) == 2
    assert rig.status(rid) == "pending"
    assert rig.emu.message(CHAT, message["message_id"])["text"] == message["text"]
    assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")) == "Approved."
    assert rig.status(rid) == "approved"


def test_a_rule_change_never_widens_a_pending_request(rig):
    store_secret(rig, "api-changed", "--approval", "quorum:2", "--approvers", f"{ALICE},{BOB}")
    rid = rig.ask("asked under a quorum of Alice and Bob", "api-changed")
    message = rig.message_for(rid)
    done = cli(rig.data.settings.data_dir, "secrets", "approval", "api-changed", "--approval", "auto")
    assert done.returncode == 0 and b"keep the rule they were made under" in done.stdout, done.stderr
    shown = cli(rig.data.settings.data_dir, "secrets", "show", "api-changed")
    assert b"approval: auto" in shown.stdout
    # The pending request is still decided under its quorum of Alice and Bob.
    assert rig.status(rid) == "pending"
    assert (
        answer_to(rig, rig.emu.tap(CAROL, CHAT, message["message_id"], f"a:{rid}"))
        == REFUSALS["not_this_secrets_approver"]
    )
    assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")).startswith("Approval counted")
    assert rig.status(rid) == "pending"
    assert answer_to(rig, rig.emu.tap(BOB, CHAT, message["message_id"], f"a:{rid}")) == "Approved."
    # A request made after the change is under the new rule.
    assert rig.agent().ask("api-changed", "after the change").body["status"] == "approved"
    changes = [e for e in audit(rig) if e.action == "secret.approval_set" and e.secret == "api-changed"]
    assert changes and changes[-1].detail["approval"][0].startswith("approval: auto")


def test_broker_only_is_part_of_the_rule_and_no_rule_change_lets_the_value_out_unless_it_says_so(rig):
    def show() -> str:
        done = cli(rig.data.settings.data_dir, "secrets", "show", "api-brokered")
        assert done.returncode == 0, done.stderr
        return done.stdout.decode()

    def asked() -> dict:
        return rig.agent().ask("api-brokered", "may I hold it?").body

    policy = ("--allow", "https://api.example.com/v1/", "--inject", "Authorization: Bearer {value}")
    store_secret(rig, "api-brokered", *policy, "--broker-only")  # the old flag: --retrieval refused
    assert "  approval: approve (one approver)\n  retrieval: refused (brokered calls only; --broker-only)" in show()
    assert asked()["error"] == "broker_only"
    # A new value, and a new approval rule, keep it broker-only: neither says otherwise.
    store_secret(rig, "api-brokered", *policy)
    done = cli(rig.data.settings.data_dir, "secrets", "approval", "api-brokered", "--approval", "quorum:2")
    assert done.returncode == 0 and b"retrieval: refused" in done.stdout, done.stderr
    assert "retrieval: refused" in show() and asked()["error"] == "broker_only"
    # Only --retrieval allowed lets it out; --retrieval refused closes it again, for an approved request too.
    cli(rig.data.settings.data_dir, "secrets", "approval", "api-brokered", "--approval", "approve")
    done = cli(rig.data.settings.data_dir, "secrets", "approval", "api-brokered", "--retrieval", "allowed")
    assert done.returncode == 0 and "retrieval: allowed with approval" in show(), done.stderr
    rid = asked()["id"]
    assert cli(rig.data.settings.data_dir, "approve", rid).returncode == 0
    cli(rig.data.settings.data_dir, "secrets", "approval", "api-brokered", "--retrieval", "refused")
    refused = rig.agent().retrieve(rid)
    assert refused.status == 403 and refused.body["error"] == "broker_only", refused.body
    both = cli(
        rig.data.settings.data_dir, "secrets", "approval", "api-brokered", "--broker-only", "--retrieval", "allowed"
    )
    assert both.returncode == 2 and b"not allowed with argument" in both.stderr
    listed = {s["name"]: s for s in rig.agent().call("GET", "/v1/secrets").body["secrets"]}
    assert listed["api-brokered"]["retrieve"] is False and listed["api-brokered"]["call"] is True
    changes = [e for e in audit(rig) if e.action == "secret.approval_set" and e.secret == "api-brokered"]
    assert "retrieval: refused (brokered calls only; --broker-only)" in changes[-1].detail["approval"]


def test_a_restart_keeps_a_partial_quorum(tmp_path):
    rig = start_rig(tmp_path, APPROVERS)
    try:
        wait_until_polling(rig)
        store_secret(rig, "api-restart", "--approval", "quorum:2")
        rid = rig.ask("approved across a restart", "api-restart")
        message = rig.message_for(rid)
        assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")).startswith(
            "Approval counted"
        )
        message_showing(rig, message["message_id"], "1 more needed")
        restart_proxy(rig)
        assert rig.status(rid) == "pending"
        # The new process knows Alice's approval: hers again counts once, Bob's completes the quorum.
        assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")) == REFUSALS["already_voted"]
        assert rig.status(rid) == "pending"
        assert answer_to(rig, rig.emu.tap(BOB, CHAT, message["message_id"], f"a:{rid}")) == "Approved."
        assert rig.agent().retrieve(rid).body["value"] == SECRET_VALUE
    finally:
        rig.stop()


def test_an_auto_secret_is_still_rate_limited(tmp_path):
    """No human decides an `auto` secret, so the agent's budget is what bounds how often it is handed out."""
    from starlette.testclient import TestClient

    from proxy.app import create_app
    from proxy.approval import ApprovalRule

    from .proxy_helpers import make_settings, provision

    proxy = provision(make_settings(tmp_path, rate_per_minute=6, rate_burst=3))
    with Store(proxy.settings) as store:
        store.set_approval("api-key", ApprovalRule("auto"), "operator:test")
    with TestClient(create_app(proxy.settings)) as client:
        headers = {"Authorization": f"Bearer {proxy.token}"}
        answers = [
            client.post("/v1/requests", json={"secret": "api-key", "reason": "auto"}, headers=headers) for _ in range(4)
        ]
    assert [a.status_code for a in answers] == [201, 201, 201, 429]
    assert [a.json().get("status") for a in answers[:3]] == ["approved"] * 3
    assert answers[3].json()["error"] == "rate_limited"
