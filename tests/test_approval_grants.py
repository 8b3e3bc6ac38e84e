"""Time-boxed grants, end to end: a real proxy process, its python-telegram-bot against the Bot API emulator,
the agent over HTTP and the operator's CLI in another process (docs/telegram.md, "Grants")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from proxy.store import Store
from proxy.telegram_bot import REFUSALS

from .proxy_helpers import SECRET_VALUE, cli
from .telegram_helpers import (
    ALICE,
    CHAT,
    MALLORY,
    Rig,
    answer_to,
    message_showing,
    restart_proxy,
    start_rig,
    wait_until_polling,
)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = start_rig(tmp_path_factory.mktemp("grants"))
    wait_until_polling(r)
    yield r
    r.stop()


def run(rig: Rig, *args: str, stdin: bytes | None = None) -> str:
    done = cli(rig.data.settings.data_dir, *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def store_secret(rig: Rig, name: str, *flags: str) -> None:
    run(rig, "secrets", "set", name, *flags, stdin=SECRET_VALUE.encode())


def audit(rig: Rig) -> list:
    with Store(rig.data.settings) as store:
        return store.audit_entries()


def status_of_new(rig: Rig, secret: str, token: str | None = None) -> str:
    created = rig.agent(token).ask(secret, "the next one")
    assert created.status == 201, created.body
    return created.body["status"]


def reply_to(rig: Rig, user: int, text: str) -> dict:
    asked = rig.emu.send_text(user, CHAT, text)
    return rig.emu.wait_for(
        lambda: next((m for m in rig.emu.messages(CHAT) if m["message_id"] > asked), None), 10, f"the reply to {text}"
    )


def test_a_grant_approves_the_next_request_at_once_and_stops_when_an_approver_ends_it(rig):
    store_secret(rig, "api-grant", "--approval", "approve", "--max-grant", "1h")
    rid = rig.ask("deploy all afternoon", "api-grant")
    message = rig.message_for(rid)
    labels = [b["text"] for row in message["reply_markup"]["inline_keyboard"] for b in row]
    assert labels == ["Approve", "Deny", "Approve for 15 min", "Approve for 1 h"]  # not beyond the secret's cap
    assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"h:{rid}")).startswith("Approved.")
    closed = message_showing(rig, message["message_id"], "🔓 Grant gr_")
    assert "the agent's retrievals of this secret" in closed["text"]
    grant_id = next(e.detail["grant"] for e in audit(rig) if e.action == "grant.started" and e.request_id == rid)

    # The next request is approved when it is made, audited with the grant it used, and never posted.
    created = rig.agent().ask("api-grant", "the next deploy")
    assert created.body["status"] == "approved"
    assert rig.agent().retrieve(created.body["id"]).body["value"] == SECRET_VALUE
    used = [e for e in audit(rig) if e.action == "request.approved" and e.request_id == created.body["id"]]
    assert used[0].actor == "proxy" and used[0].detail["grant"] == grant_id
    assert grant_id in run(rig, "grants", "list")

    # /grants lists it for approvers, with a button that ends it; a stranger's list is refused.
    assert reply_to(rig, MALLORY, "/grants")["text"] == "Only approvers can list grants, in the approvers' chat."
    listing = reply_to(rig, ALICE, "/grants")
    assert grant_id in listing["text"]
    end = next(b for row in listing["reply_markup"]["inline_keyboard"] for b in row if grant_id in b["text"])
    stranger = rig.emu.tap(MALLORY, CHAT, listing["message_id"], end["callback_data"])
    assert answer_to(rig, stranger) == REFUSALS["not_an_approver"]
    assert status_of_new(rig, "api-grant") == "approved"
    assert answer_to(rig, rig.emu.tap(ALICE, CHAT, listing["message_id"], end["callback_data"])).startswith(
        "Grant ended"
    )
    message_showing(rig, message["message_id"], "🔒 Grant ended at ")
    assert status_of_new(rig, "api-grant") == "pending"
    assert grant_id not in run(rig, "grants", "list")


def test_a_forged_button_for_a_longer_grant_is_refused_and_audited(rig):
    store_secret(rig, "api-grant-short", "--approval", "approve", "--max-grant", "15m")
    rid = rig.ask("only a short grant", "api-grant-short")
    message = rig.message_for(rid)
    for letter in ("h", "r"):  # a modified client sends data for buttons the message does not have
        assert (
            answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"{letter}:{rid}"))
            == REFUSALS["grant_not_allowed"]
        )
    assert rig.status(rid) == "pending"
    refused = [e for e in audit(rig) if e.request_id == rid and e.detail.get("code") == "grant_not_allowed"]
    assert len(refused) == 2
    no_grants = rig.ask("a secret without grants", "api-key")
    plain = rig.message_for(no_grants)
    assert (
        answer_to(rig, rig.emu.tap(ALICE, CHAT, plain["message_id"], f"t:{no_grants}")) == REFUSALS["grant_not_allowed"]
    )


def test_a_grant_ends_when_the_value_changes(rig):
    store_secret(rig, "api-grant-value", "--approval", "approve", "--max-grant", "forever")
    rid = rig.ask("until revoked", "api-grant-value")
    assert "granted" in run(rig, "approve", rid, "--for", "forever")
    assert status_of_new(rig, "api-grant-value") == "approved"
    store_secret(rig, "api-grant-value")  # a new value: the rule is kept, the grant ends
    assert status_of_new(rig, "api-grant-value") == "pending"
    ended = [e for e in audit(rig) if e.action == "grant.ended" and e.secret == "api-grant-value"]
    assert ended[-1].detail["why"] == "the secret's value or use policy changed"


def test_a_grant_ends_when_the_agents_token_is_revoked(rig):
    store_secret(rig, "api-grant-agent", "--approval", "approve", "--max-grant", "1h")
    token = run(rig, "agents", "add", "carl", "--secrets", "api-*").strip()
    created = rig.agent(token).ask("api-grant-agent", "carl's first")
    run(rig, "approve", created.body["id"], "--for", "1h")
    assert status_of_new(rig, "api-grant-agent", token) == "approved"
    assert status_of_new(rig, "api-grant-agent") == "pending"  # another agent: not covered
    run(rig, "agents", "revoke", "carl")
    assert "carl" not in run(rig, "grants", "list")
    ended = [e for e in audit(rig) if e.action == "grant.ended" and e.secret == "api-grant-agent"]
    assert ended and ended[-1].detail["why"] == "the agent's token was revoked"
    # The name comes back with a new token: the old grant approves nothing for it.
    token = run(rig, "agents", "add", "carl", "--secrets", "api-*").strip()
    assert status_of_new(rig, "api-grant-agent", token) == "pending"


def test_a_grant_ends_when_the_secret_becomes_a_quorum_and_none_is_given_under_one(rig):
    """Quorum bypass: neither a grant from before the quorum nor the operator's grant stands in for it."""
    store_secret(rig, "api-grant-quorum", "--approval", "approve", "--max-grant", "1h")
    rid = rig.ask("one approver suffices today", "api-grant-quorum")
    run(rig, "approve", rid, "--for", "1h")
    assert status_of_new(rig, "api-grant-quorum") == "approved"
    run(rig, "secrets", "approval", "api-grant-quorum", "--approval", "quorum:2", "--operator-decides")
    pending = rig.ask("now it needs two", "api-grant-quorum")
    assert rig.status(pending) == "pending"
    ended = [e for e in audit(rig) if e.action == "grant.ended" and e.secret == "api-grant-quorum"]
    assert [e.detail["why"] for e in ended] == ["the secret's approval rule changed"]
    # Even the operator, who may decide this quorum alone, approves it once: a grant is refused, no vote counted.
    refused = cli(rig.data.settings.data_dir, "approve", pending, "--for", "1h")
    assert refused.returncode == 1 and b"allows no grant" in refused.stderr, refused.stderr
    with Store(rig.data.settings) as store:
        assert store.votes(pending) == []
    assert grants_of(rig, "api-grant-quorum") == []
    run(rig, "approve", pending)
    assert rig.status(pending) == "approved"
    assert status_of_new(rig, "api-grant-quorum") == "pending"


def test_a_brokered_grant_covers_only_the_approved_method_and_destination_prefix(rig):
    from proxy.policy import build_policy

    with Store(rig.data.settings) as store:
        policy = build_policy(["https://api.example.com/v1/"], [], "Authorization: Bearer {value}")
        store.set_secret("api-grant-call", SECRET_VALUE.encode(), "operator:test", policy, broker_only=True)
    run(rig, "secrets", "approval", "api-grant-call", "--approval", "approve", "--max-grant", "1h")

    def ask(method: str, url: str) -> dict:
        body = {"secret": "api-grant-call", "reason": "repos", "method": method, "url": url}
        created = rig.agent().call("POST", "/v1/calls", body)
        assert created.status == 201, created.body
        return created.body

    first = ask("POST", "https://api.example.com/v1/repos/one")
    run(rig, "approve", first["id"], "--for", "1h", "--calls", "2")
    closed = message_showing(rig, rig.message_for(first["id"])["message_id"], "🔓 Grant")
    assert "<code>" not in closed["text"] and "POST calls to https://api.example.com:443/v1/repos/…" in closed["text"]
    assert ask("GET", "https://api.example.com/v1/repos/two")["status"] == "pending"  # another method
    assert ask("POST", "https://api.example.com/v1/admin/users")["status"] == "pending"  # another path
    assert ask("POST", "https://api.example.com/v1/repos-evil/x")["status"] == "pending"  # not under the prefix
    assert ask("POST", "https://api.example.com/v1/repos/two")["status"] == "approved"
    assert ask("POST", "https://api.example.com/v1/repos/three")["status"] == "approved"
    assert ask("POST", "https://api.example.com/v1/repos/four")["status"] == "pending"  # its 2 calls are used up
    created = [e for e in audit(rig) if e.action == "request.created" and e.secret == "api-grant-call"]
    assert len(created) == 7
    assert all(e.detail["call"]["body_sha256"] and e.detail["call"]["url"] for e in created)


def test_a_telegram_grant_for_calls_gives_the_count_the_secrets_rule_sets_and_says_so(rig):
    store_secret(
        rig,
        "api-grant-count",
        "--allow",
        "https://api.example.com/v1/",
        "--inject",
        "Authorization: Bearer {value}",
        "--approval",
        "approve",
        "--max-grant",
        "1h",
        "--grant-calls",
        "2",
    )
    assert "longest grant: 1 h, at most 2 calls each" in run(rig, "secrets", "show", "api-grant-count")

    def ask(path: str) -> dict:
        body = {"secret": "api-grant-count", "reason": "label issues", "method": "POST", "url": path}
        created = rig.agent().call("POST", "/v1/calls", body)
        assert created.status == 201, created.body
        return created.body

    first = ask("https://api.example.com/v1/issues/1/labels")
    message = rig.message_for(first["id"])
    labels = [b["text"] for row in message["reply_markup"]["inline_keyboard"] for b in row]
    assert labels == ["Approve", "Deny", "Approve for 15 min, 2 calls", "Approve for 1 h, 2 calls"]
    rid = first["id"]
    assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"h:{rid}")).startswith("Approved.")
    closed = message_showing(rig, message["message_id"], "🔓 Grant")
    covers = "POST calls to https://api.example.com:443/v1/issues/1/… of this secret (at most 2 more calls)"
    assert covers in closed["text"]
    assert [ask(f"https://api.example.com/v1/issues/1/{n}")["status"] for n in range(3)] == [
        "approved",
        "approved",
        "pending",
    ]
    message_showing(rig, message["message_id"], "its calls are used up")

    # The CLI may give fewer calls, never more than the rule's count; a refusal is audited.
    second = ask("https://api.example.com/v1/issues/2/labels")["id"]
    refused = cli(rig.data.settings.data_dir, "approve", second, "--for", "1h", "--calls", "3")
    assert refused.returncode == 1 and b"at most 2 calls" in refused.stderr, refused.stderr
    assert [e for e in audit(rig) if e.request_id == second and e.detail.get("code") == "grant_not_allowed"]
    assert rig.status(second) == "pending"
    run(rig, "approve", second, "--for", "1h", "--calls", "1")
    assert [g.calls_left for g in grants_of(rig, "api-grant-count")] == [1]


def grants_of(rig: Rig, secret: str) -> list:
    with Store(rig.data.settings) as store:
        return [g for g in store.list_grants() if g.secret == secret]


def test_a_grant_ends_at_its_time_and_survives_a_restart(tmp_path):
    rig = start_rig(tmp_path)
    try:
        wait_until_polling(rig)
        store_secret(rig, "api-timed", "--approval", "approve", "--max-grant", "15m")
        rid = rig.ask("for a quarter of an hour", "api-timed")
        message = rig.message_for(rid)
        assert answer_to(rig, rig.emu.tap(ALICE, CHAT, message["message_id"], f"t:{rid}")).startswith("Approved.")
        with Store(rig.data.settings) as store:
            (before,) = store.list_grants()
        assert before.expires_at == pytest.approx(before.created_at + 15 * 60)
        restart_proxy(rig)
        assert status_of_new(rig, "api-timed") == "approved"  # the grant is in the database, not in memory
        with Store(rig.data.settings) as store:
            assert store.list_grants() == [before]  # the same end time, to the microsecond
        # Fifteen minutes pass for a store whose clock is that far ahead (nobody waits, and nobody edits the
        # database): its sweep ends the grant, and the running proxy, on the real clock, follows.
        with Store(rig.data.settings, clock=lambda: time.time() + 15 * 60) as later:
            later.expire_due()
        assert status_of_new(rig, "api-timed") == "pending"
        message_showing(rig, message["message_id"], "its time is over")
        assert [e for e in audit(rig) if e.action == "grant.ended" and e.detail["why"] == "its time is over"]
    finally:
        rig.stop()


@dataclass
class Clock:
    """Wall-clock time a test moves by hand (Store's `clock`)."""

    now: float

    def __call__(self) -> float:
        return self.now


def test_a_grant_approves_until_its_last_second_and_a_reopened_store_keeps_its_end_and_count(tmp_path):
    """Expiry to the second, across restarts of the store, without sleeping: the store's own clock moves."""
    from proxy.approval import ApprovalRule

    from .proxy_helpers import make_settings, provision

    proxy = provision(make_settings(tmp_path))
    clock = Clock(1_800_000_000.0)
    with Store(proxy.settings, clock=clock) as store:
        store.set_approval("api-key", ApprovalRule("approve", max_grant=15 * 60), "operator:test")
        first = store.create_request(store.authenticate(proxy.token), "api-key", "a quarter of an hour", 60)
        store.decide(first.id, True, "telegram:1001", 15 * 60, 3)
        (grant,) = store.list_grants()
    assert (grant.expires_at, grant.calls_left) == (clock.now + 15 * 60, 3)

    clock.now += 15 * 60 - 1  # the grant's last second, in a store opened anew (a restart)
    with Store(proxy.settings, clock=clock) as store:
        assert store.list_grants() == [grant]
        agent = store.authenticate(proxy.token)
        assert store.create_request(agent, "api-key", "still inside", 60).status == "approved"
        assert store.list_grants()[0].calls_left == 2
    clock.now += 1  # its end: nothing more is approved, and the end is audited at that time
    with Store(proxy.settings, clock=clock) as store:
        assert store.create_request(store.authenticate(proxy.token), "api-key", "too late", 60).status == "pending"
        assert store.list_grants() == []
        (ended,) = store.list_grants(live_only=False)
        assert (ended.ended_at, ended.ended_why, ended.calls_left) == (clock.now, "its time is over", 2)


def test_a_reopened_store_keeps_a_partial_quorum_until_the_request_expires(tmp_path):
    from proxy.approval import ApprovalRule

    from .proxy_helpers import make_settings, provision

    proxy = provision(make_settings(tmp_path))
    clock = Clock(1_800_000_000.0)
    with Store(proxy.settings, clock=clock) as store:
        store.set_approval("api-key", ApprovalRule("quorum", 2), "operator:test")
        agent = store.authenticate(proxy.token)
        kept = store.create_request(agent, "api-key", "approved across a restart", 60)
        lapsed = store.create_request(agent, "api-key", "left undecided", 60)
        for req in (kept, lapsed):
            assert store.decide(req.id, True, "telegram:1001").vote == "counted"
    clock.now = kept.expires_at - 1
    with Store(proxy.settings, clock=clock) as store:
        assert store.votes(kept.id) == ["telegram:1001"]
        assert store.decide(kept.id, True, "telegram:1001").vote == "repeated"
        assert store.decide(kept.id, True, "telegram:1002").request.status == "approved"
    clock.now = lapsed.expires_at
    with Store(proxy.settings, clock=clock) as store:
        late = store.decide(lapsed.id, True, "telegram:1002")
        assert (late.changed, late.request.status) == (False, "expired")
        assert store.votes(lapsed.id) == ["telegram:1001"]


def test_a_grant_never_stands_in_for_a_quorum_nor_counts_as_a_vote(tmp_path):
    """A grant is one approver's decision: asked under a quorum it is refused before any vote is counted."""
    from proxy.approval import ApprovalRule
    from proxy.errors import StoreError
    from proxy.grants import FOREVER

    from .proxy_helpers import make_settings, provision

    proxy = provision(make_settings(tmp_path))
    with Store(proxy.settings) as store:
        store.set_approval("api-key", ApprovalRule("quorum", 2, (), 0), "operator:test")
        req = store.create_request(store.authenticate(proxy.token), "api-key", "a quorum", 60)
        for actor in ("telegram:1001", "operator:root"):
            with pytest.raises(StoreError) as refused:
                store.decide(req.id, True, actor, FOREVER)
            assert refused.value.kind == "grant_not_allowed"
        assert store.votes(req.id) == [] and store.get_request(req.id).status == "pending"
        assert store.list_grants() == []


def test_a_call_grant_at_the_root_of_a_host_covers_that_path_only():
    """A grant for `POST /graphql` must not become "any POST to this host"."""
    from proxy.broker import Call
    from proxy.grants import Grant, call_prefix

    def call(method: str, url: str) -> Call:
        return Call(method, url, (), "0" * 64, 0)

    approved = call("POST", "https://api.example.com/graphql")
    grant = Grant("gr_x", "a", "s", "POST", call_prefix(approved), None, 0.0, None, "t", "r", None, None)
    assert grant.url_prefix == "https://api.example.com:443/graphql"
    assert grant.covers(call("POST", "https://api.example.com/graphql?op=2"))
    assert grant.covers(call("POST", "https://api.example.com/graphql/sub"))
    for other in (
        "https://api.example.com/v1/repos",
        "https://api.example.com/graphql-admin",
        "https://x.example/graphql",
    ):
        assert not grant.covers(call("POST", other))
    assert not grant.covers(call("GET", "https://api.example.com/graphql")) and not grant.covers(None)
