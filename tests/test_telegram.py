"""Approval in Telegram, end to end.

A real proxy process (uvicorn, `python -m proxy serve`) runs the real
python-telegram-bot against the Bot API emulator over HTTP on 127.0.0.1, pointed
there by SECRET_PROXY_TELEGRAM_API_URL. Tests act as the agent (HTTP), as
approvers and strangers (taps and messages through the emulator), and as the
operator (the CLI, another process). Every proxy logs at DEBUG to a file that is
checked for the bot token when it stops.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from proxy.demo import free_port
from proxy.store import Store
from proxy.telegram_bot import REFUSALS

from .proxy_helpers import ROOT, SECRET_VALUE, cli
from .telegram_emulator import BotApiEmulator, EmulatorControl, parse_html
from .telegram_helpers import ALICE, BOB, CHAT, MALLORY, OTHER_CHAT, TOKEN, Rig, start_rig, wait_until_polling


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = start_rig(tmp_path_factory.mktemp("telegram"))
    wait_until_polling(r)
    yield r
    r.stop()


def audit(rig: Rig) -> list:
    with Store(rig.data.settings) as store:
        return store.audit_entries()


def utf16_slice(text: str, offset: int, length: int) -> str:
    return text.encode("utf-16-le")[2 * offset : 2 * (offset + length)].decode("utf-16-le")


def buttons_of(message: dict) -> list[tuple[str, str]]:
    markup = message.get("reply_markup") or {}
    return [(b["text"], b.get("callback_data", "")) for row in markup.get("inline_keyboard", []) for b in row]


def assert_refused(rig: Rig, query_id: str, code: str, user_id: int, request_id: str | None = None) -> dict:
    """The tapping user hears why, and the audit log says who tried what."""
    answer = rig.emu.wait_for(lambda: rig.emu.answer_for(query_id), 10, f"the answer to tap {query_id}")
    assert answer["text"] == REFUSALS[code]
    refusals = [
        e
        for e in audit(rig)
        if e.action == "decision.refused"
        and e.actor == f"telegram:{user_id}"
        and e.detail.get("code") == code
        and (request_id is None or e.request_id == request_id)
    ]
    assert refusals, f"no decision.refused audit entry with code {code} for telegram:{user_id}"
    return refusals[-1].detail


def assert_unchanged(rig: Rig, request_id: str, message_before: dict) -> None:
    assert rig.status(request_id) == "pending"
    after = rig.emu.message(CHAT, message_before["message_id"])
    assert after is not None
    assert after["text"] == message_before["text"] and buttons_of(after) == buttons_of(message_before)
    assert not [
        e for e in audit(rig) if e.request_id == request_id and e.action in ("request.approved", "request.denied")
    ]


# -- the round trip --------------------------------------------------------------------


def test_approval_round_trip_through_telegram(rig):
    agent = rig.agent()
    rid = rig.ask("deploy release 4.2 to production")
    message = rig.message_for(rid)
    assert buttons_of(message) == [("Approve", f"a:{rid}"), ("Deny", f"d:{rid}")]
    assert all(len(data.encode()) <= 64 for _, data in buttons_of(message))
    for shown in ("alice", "api-key", "deploy release 4.2 to production", "Expires:", "UTC"):
        assert shown in message["text"]

    waiter: dict = {}
    thread = threading.Thread(target=lambda: waiter.update(reply=agent.status(rid, wait=20)))
    thread.start()
    time.sleep(0.3)  # the agent is now held in ?wait=
    query = rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")
    thread.join(25)
    assert waiter["reply"].body["status"] == "approved"
    assert waiter["reply"].body["decided_by"] == "approver"  # a role: the approver's Telegram id stays private
    assert rig.emu.wait_for(lambda: rig.emu.answer_for(query), 5)["text"] == "Approved."

    got = agent.retrieve(rid)
    assert got.status == 200 and got.body["value"] == SECRET_VALUE
    again = agent.retrieve(rid)
    assert again.status == 410 and again.body["error"] == "already_retrieved"

    closed = rig.emu.wait_for(
        lambda: "reply_markup" not in (m := rig.emu.message(CHAT, message["message_id"])) and m,
        5,
        "the message to lose its buttons",
    )
    assert "Approved by Alice @alice_ops (id 1001) at " in closed["text"] and "UTC" in closed["text"]
    assert [e.actor for e in audit(rig) if e.request_id == rid and e.action == "request.approved"] == [
        f"telegram:{ALICE}"
    ]


def test_deny_through_telegram(rig):
    agent = rig.agent()
    rid = rig.ask("rotate the staging database")
    message = rig.message_for(rid)
    query = rig.emu.tap(BOB, CHAT, message["message_id"], f"d:{rid}")
    assert agent.status(rid, wait=10).body["status"] == "denied"
    assert rig.emu.wait_for(lambda: rig.emu.answer_for(query), 5)["text"] == "Denied."
    refused = agent.retrieve(rid)
    assert refused.status == 403 and refused.body["error"] == "denied"
    closed = rig.emu.wait_for(
        lambda: "reply_markup" not in (m := rig.emu.message(CHAT, message["message_id"])) and m,
        5,
        "the message to lose its buttons",
    )
    assert "Denied by Bob @bob_sec (id 1002)" in closed["text"]


def test_reason_cannot_forge_formatting_links_or_buttons(rig):
    reason = (
        'urgent 🚀</code></b><b>APPROVE NOW</b> <a href="https://evil.example/">the runbook</a> '
        "<tg-spoiler>x</tg-spoiler> &amp; &lt;i&gt; *bold* _it_ [link](https://evil.example) "
        '{"inline_keyboard":[[{"text":"Approve","url":"https://evil.example"}]]}'
    )
    rid = rig.ask(reason)
    message = rig.message_for(rid)
    text = message["text"]
    assert f"Reason: {reason}\n" in text  # shown verbatim, as plain text
    start = len(text[: text.index(reason)].encode("utf-16-le")) // 2
    end = start + len(reason.encode("utf-16-le")) // 2
    for entity in message["entities"]:
        assert entity["type"] in ("bold", "code"), entity
        assert entity["offset"] + entity["length"] <= start or entity["offset"] >= end, entity
    # The entities after the reason still sit on our fields (offsets are UTF-16 and the reason has an emoji).
    assert utf16_slice(text, message["entities"][-1]["offset"], message["entities"][-1]["length"]) == rid
    assert buttons_of(message) == [("Approve", f"a:{rid}"), ("Deny", f"d:{rid}")]
    assert message["link_preview_options"] == {"is_disabled": True}
    assert rig.emu.sent_params(CHAT, message["message_id"])[0]["parse_mode"] == "HTML"


def test_reason_cannot_forge_lines_or_reorder_text(rig):
    """Newlines, controls and bidirectional overrides in a reason are shown as visible escapes."""
    reason = (
        "routine\nRequest: req_forged\n✅ Approved by Alice @alice_ops\r\tend "
        "\u202egnp.exe\u202c \u2066x\u2069 \u200b \u2028 \x1b[31m"
    )
    rid = rig.ask(reason)
    text = rig.message_for(rid)["text"]
    reason_line = next(line for line in text.split("\n") if line.startswith("Reason: "))
    assert reason_line == (
        "Reason: routine\\nRequest: req_forged\\n✅ Approved by Alice @alice_ops\\r\\tend "
        "\\u202egnp.exe\\u202c \\u2066x\\u2069 \\u200b \\u2028 \\x1b[31m"
    )
    assert len(text.split("\n")) == 6  # title, agent, secret, reason, expires, request: nothing added
    assert not any(ch in text for ch in "\r\t\u202e\u202c\u2066\u2069\u200b\u2028\x1b")


def store_call_secret(rig: Rig) -> None:
    """A broker-only secret for api.example.com that lets the agent send X-HTTP-Method-Override."""
    from proxy.policy import build_policy

    with Store(rig.data.settings) as store:
        policy = build_policy(
            ["https://api.example.com/v1/"], [], "Authorization: Bearer {value}", ["X-HTTP-Method-Override"]
        )
        store.set_secret("api-call-shown", SECRET_VALUE.encode(), "operator:test", policy, broker_only=True)


def test_a_call_request_shows_every_header_with_its_value_and_the_injected_one_masked(rig):
    """The approver approves what is sent: a GET with X-HTTP-Method-Override is shown as such."""
    store_call_secret(rig)
    call = {
        "secret": "api-call-shown",
        "reason": "list the repos",
        "method": "GET",
        "url": "https://api.example.com/v1/repos",
        "headers": {"X-HTTP-Method-Override": "DELETE", "Accept": "application/json"},
    }
    created = httpx.post(
        f"{rig.url}/v1/calls", json=call, headers={"Authorization": f"Bearer {rig.data.token}"}, timeout=30
    )
    assert created.status_code == 201, created.text
    text = rig.message_for(created.json()["id"])["text"]
    lines = text.split("\n")
    start = lines.index("Headers:")
    assert lines[start + 1 : start + 4] == [
        "  Authorization: Bearer •••••• (added by the proxy)",
        "  X-HTTP-Method-Override: DELETE",  # allowed by the policy: shown first, never cut
        "  Accept: application/json",
    ]
    assert SECRET_VALUE not in text


def test_filler_headers_cannot_push_where_the_secret_goes_or_a_routing_header_out_of_the_message(rig):
    """The message is cut to fit Telegram; what it cuts is only the ordinary headers, and it says so."""
    store_call_secret(rig)
    fillers = {f"X-Filler-{i}": "f" * 190 for i in range(12)}
    call = {
        "secret": "api-call-shown",
        "reason": "list the repos",
        "method": "GET",
        "url": "https://api.example.com/v1/repos",
        "headers": {**fillers, "X-HTTP-Method-Override": "DELETE"},
    }
    created = httpx.post(
        f"{rig.url}/v1/calls", json=call, headers={"Authorization": f"Bearer {rig.data.token}"}, timeout=30
    )
    assert created.status_code == 201, created.text
    text = rig.message_for(created.json()["id"])["text"]
    assert "Authorization: Bearer •••••• (added by the proxy)" in text
    assert "X-HTTP-Method-Override: DELETE" in text
    assert "more headers: see `python -m proxy requests list`" in text


# -- refusals --------------------------------------------------------------------------


def test_stranger_tap_is_refused_and_audited(rig):
    rid = rig.ask()
    message = rig.message_for(rid)
    query = rig.emu.tap(MALLORY, CHAT, message["message_id"], f"a:{rid}")
    detail = assert_refused(rig, query, "not_an_approver", MALLORY, rid)
    assert detail["chat_id"] == CHAT and detail["message_id"] == message["message_id"]
    assert rig.emu.answer_for(query)["show_alert"] is True
    assert_unchanged(rig, rid, message)


def test_tap_in_another_chat_is_refused_and_audited(rig):
    rid = rig.ask()
    message = rig.message_for(rid)
    # The same buttons on a message of this bot elsewhere (an old deployment, another group).
    elsewhere = rig.emu.post_as_bot(OTHER_CHAT, message["text"], message["reply_markup"])
    query = rig.emu.tap(ALICE, OTHER_CHAT, elsewhere["message_id"], f"a:{rid}")
    assert assert_refused(rig, query, "wrong_chat", ALICE, rid)["chat_id"] == OTHER_CHAT
    assert_unchanged(rig, rid, message)


def test_tap_on_decided_request_is_refused_and_audited(rig):
    rid = rig.ask()
    message = rig.message_for(rid)
    first = rig.emu.tap(ALICE, CHAT, message["message_id"], f"d:{rid}")
    assert rig.emu.wait_for(lambda: rig.emu.answer_for(first), 5)["text"] == "Denied."
    # Bob's client still showed the buttons; his approval must not overturn Alice's denial.
    second = rig.emu.tap(BOB, CHAT, message["message_id"], f"a:{rid}")
    assert assert_refused(rig, second, "already_decided", BOB, rid)["status"] == "denied"
    assert rig.status(rid) == "denied"
    assert rig.agent().retrieve(rid).status == 403


def test_unparsable_callback_data_is_refused_and_audited(rig):
    rid = rig.ask()
    message = rig.message_for(rid)
    for data in ("approve", f"x:{rid}", "a:req_short", f"a:{rid} ", f"a:{rid}:again", "a:" + "🙂" * 15):
        query = rig.emu.tap(ALICE, CHAT, message["message_id"], data)
        assert assert_refused(rig, query, "bad_callback", ALICE)["data"] == data
    assert_unchanged(rig, rid, message)


def test_unknown_request_id_is_refused_and_audited(rig):
    rid = rig.ask()
    message = rig.message_for(rid)
    ghost = "req_" + "A" * 32
    query = rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{ghost}")
    assert_refused(rig, query, "unknown_request", ALICE, ghost)
    assert_unchanged(rig, rid, message)


def test_callback_data_for_another_request_is_refused_and_audited(rig):
    shown = rig.ask("the request Alice reads")
    hidden = rig.ask("the request a forged tap names")
    shown_message, hidden_message = rig.message_for(shown), rig.message_for(hidden)
    # A modified client sends the other request's data with a tap on this message.
    query = rig.emu.tap(ALICE, CHAT, shown_message["message_id"], f"a:{hidden}")
    assert_refused(rig, query, "message_mismatch", ALICE, hidden)
    assert_unchanged(rig, hidden, hidden_message)
    assert_unchanged(rig, shown, shown_message)


# -- the chat follows decisions made elsewhere ------------------------------------------------


def test_cli_decision_closes_the_message(rig):
    rid = rig.ask("decided by the operator")
    message = rig.message_for(rid)
    done = cli(rig.data.settings.data_dir, "approve", rid)  # another process writing the same database
    assert done.returncode == 0, done.stderr
    closed = rig.emu.wait_for(
        lambda: "reply_markup" not in (m := rig.emu.message(CHAT, message["message_id"])) and m,
        5,
        "the message to lose its buttons",
    )
    assert "✅ Approved by operator:" in closed["text"] and "(CLI)" in closed["text"]


def test_pending_lists_pending_requests_only_for_approvers(rig):
    waiting = [rig.ask("first of two"), rig.ask("second of two")]
    decided = rig.ask("decided already")
    rig.message_for(decided)
    assert cli(rig.data.settings.data_dir, "deny", decided).returncode == 0

    def reply_to(chat: int, user: int, text: str) -> str:
        asked = rig.emu.send_text(user, chat, text)
        reply = rig.emu.wait_for(
            lambda: next((m for m in rig.emu.messages(chat) if m["message_id"] > asked), None),
            10,
            f"the bot's reply to {text!r}",
        )
        return reply["text"]

    listing = reply_to(CHAT, ALICE, "/pending")
    assert all(rid in listing for rid in waiting) and decided not in listing
    assert "first of two" in listing and "pending request" in listing
    assert "second of two" in reply_to(CHAT, BOB, "/pending@secret_proxy_test_bot")

    assert reply_to(CHAT, MALLORY, "/pending") == "Only approvers can list pending requests."
    assert reply_to(OTHER_CHAT, ALICE, "/pending") == "Pending requests are listed only in the approvers' chat."
    assert reply_to(ALICE, ALICE, "/pending") == "Pending requests are listed only in the approvers' chat."
    refusals = [e for e in audit(rig) if e.action == "pending.refused"]
    assert {(e.actor, e.detail["code"]) for e in refusals} >= {
        (f"telegram:{MALLORY}", "not_an_approver"),
        (f"telegram:{ALICE}", "wrong_chat"),
    }


def test_expiry_closes_the_message_and_later_taps_are_refused(tmp_path):
    rig = start_rig(tmp_path, {"SECRET_PROXY_PENDING_TIMEOUT_SECONDS": "2"})
    try:
        rid = rig.ask("nobody will answer in time")
        message = rig.message_for(rid)
        closed = rig.emu.wait_for(
            lambda: "reply_markup" not in (m := rig.emu.message(CHAT, message["message_id"])) and m,
            8,
            "expiry to remove the buttons",
        )
        assert "⌛ Expired undecided at" in closed["text"]
        # A client that still shows the old buttons.
        query = rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")
        assert assert_refused(rig, query, "expired", ALICE, rid)["status"] == "expired"
        assert rig.status(rid) == "expired"
    finally:
        rig.stop()


# -- Telegram away ---------------------------------------------------------------------------


def test_telegram_down_then_back_posts_what_it_missed_and_the_api_keeps_answering(tmp_path):
    rig = start_rig(tmp_path)
    try:
        wait_until_polling(rig)
        agent = rig.agent()
        rig.emu.go_down("unreachable")
        started = time.monotonic()
        missed = rig.ask("asked while Telegram was down")
        assert agent.health().status == 200 and rig.status(missed) == "pending"
        assert time.monotonic() - started < 2.0
        by_cli = rig.ask("decided with the CLI while Telegram was down")
        assert cli(rig.data.settings.data_dir, "deny", by_cli).returncode == 0
        time.sleep(1.5)  # several failed attempts to post and to poll
        assert rig.status(missed) == "pending"

        rig.emu.come_back()
        message = rig.message_for(missed, timeout=15)
        assert not [m for m in rig.emu.messages(CHAT) if by_cli in m["text"]]  # nothing left to decide there
        query = rig.emu.tap(ALICE, CHAT, message["message_id"], f"a:{missed}")  # polling is back too
        assert rig.status(missed, wait=20) == "approved"
        assert rig.emu.wait_for(lambda: rig.emu.answer_for(query), 5)["text"] == "Approved."
    finally:
        rig.stop()


def test_a_hanging_telegram_never_slows_the_api(tmp_path):
    rig = start_rig(tmp_path)
    try:
        wait_until_polling(rig)
        rig.emu.go_down("hang")  # connections accepted, never answered
        asked = []
        for n in range(3):
            started = time.monotonic()
            asked.append(rig.ask(f"asked while Telegram hangs ({n})"))
            assert rig.agent().health().status == 200
            assert time.monotonic() - started < 2.0  # blocked on Telegram, it would take its 10 s timeout
        rig.emu.come_back()
        for rid in asked:
            rig.message_for(rid, timeout=15)
    finally:
        rig.stop()


def test_telegram_down_at_start_does_not_hold_up_the_proxy(tmp_path):
    rig = start_rig(tmp_path, down="error")  # start_rig returns once /health answers
    try:
        rid = rig.ask("asked before the bot ever reached Telegram")
        time.sleep(1.0)
        assert rig.emu.calls() == []  # every call met the 502 front end
        rig.emu.come_back()
        rig.message_for(rid, timeout=15)
    finally:
        rig.stop()


def test_a_rejected_token_is_reported_without_leaking_it(tmp_path):
    wrong = "111222333:AAwrong-token-that-must-not-be-logged-xyz"
    rig = start_rig(tmp_path, proxy_token=wrong)
    try:
        rig.emu.wait_for(
            lambda: "cannot start the bot: rejected the bot token" in rig.logs(), 10, "the rejection to be logged"
        )
        assert rig.agent().health().status == 200
        rig.ask("the HTTP API works without Telegram")
    finally:
        rig.stop()  # checks that neither token is in the logs


# -- the emulator itself speaks the Bot API as Telegram does ----------------------------------


@pytest.fixture
def emu() -> Iterator[BotApiEmulator]:
    e = BotApiEmulator(TOKEN)
    e.add_chat(CHAT, "supergroup", "Approvers")
    e.start("127.0.0.1", 0)
    yield e
    e.stop()


def test_emulator_envelopes_tokens_and_body_encodings(emu):
    with httpx.Client(base_url=emu.url, timeout=5) as http:
        wrong = http.post("/bot1:nope/getMe")
        assert wrong.status_code == 401
        assert wrong.json() == {"ok": False, "error_code": 401, "description": "Unauthorized"}
        assert http.get(f"/bot{TOKEN}/noSuchMethod").json()["error_code"] == 404
        me = http.get(f"/bot{TOKEN}/getMe").json()
        assert me["ok"] is True and me["result"]["is_bot"] is True and me["result"]["id"] == 987654321

        markup = {"inline_keyboard": [[{"text": "Approve", "callback_data": "a:1"}]]}
        as_json = http.post(
            f"/bot{TOKEN}/sendMessage",
            json={"chat_id": CHAT, "text": "<b>hi</b>", "parse_mode": "HTML", "reply_markup": markup},
        ).json()["result"]
        as_form = http.post(
            f"/bot{TOKEN}/sendMessage",
            data={"chat_id": str(CHAT), "text": "<b>hi</b>", "parse_mode": "HTML", "reply_markup": json.dumps(markup)},
        ).json()["result"]
        for sent in (as_json, as_form):
            assert sent["text"] == "hi" and sent["entities"] == [{"type": "bold", "offset": 0, "length": 2}]
            assert sent["reply_markup"] == markup
        assert as_form["message_id"] == as_json["message_id"] + 1

        bad = http.post(f"/bot{TOKEN}/sendMessage", json={"chat_id": CHAT, "text": "<x>no</x>", "parse_mode": "HTML"})
        assert bad.status_code == 400 and "can't parse entities" in bad.json()["description"]
        lost = http.post(f"/bot{TOKEN}/sendMessage", json={"chat_id": 42, "text": "hi"}).json()
        assert lost == {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}
        too_big = {"inline_keyboard": [[{"text": "A", "callback_data": "x" * 65}]]}
        assert (
            "BUTTON_DATA_INVALID"
            in http.post(
                f"/bot{TOKEN}/sendMessage", json={"chat_id": CHAT, "text": "hi", "reply_markup": too_big}
            ).json()["description"]
        )

        edit = {"chat_id": CHAT, "message_id": as_json["message_id"], "text": "done"}
        edited = http.post(f"/bot{TOKEN}/editMessageText", json=edit).json()["result"]
        assert "reply_markup" not in edited and "edit_date" in edited  # no markup given: buttons go
        same = http.post(f"/bot{TOKEN}/editMessageText", json=edit).json()
        assert same["error_code"] == 400 and "message is not modified" in same["description"]

        emu.go_down("error")
        assert http.get(f"/bot{TOKEN}/getMe").status_code == 502
        emu.come_back()
        assert http.get(f"/bot{TOKEN}/getMe").json()["ok"] is True


def test_emulator_long_polls_with_offsets_and_answers_callbacks(emu):
    with httpx.Client(base_url=emu.url, timeout=10) as http:
        sent = http.post(f"/bot{TOKEN}/sendMessage", json={"chat_id": CHAT, "text": "x"}).json()["result"]
        threading.Timer(0.3, emu.tap, args=(ALICE, CHAT, sent["message_id"], "a:1")).start()
        started = time.monotonic()
        updates = http.post(f"/bot{TOKEN}/getUpdates", data={"timeout": "5"}).json()["result"]
        assert 0.2 < time.monotonic() - started < 3
        query = updates[0]["callback_query"]
        assert query["from"]["id"] == ALICE and query["data"] == "a:1"
        assert query["message"]["message_id"] == sent["message_id"] and query["message"]["chat"]["id"] == CHAT
        assert query["chat_instance"] and isinstance(query["id"], str)

        # Without confirming (no offset), the same update comes again; with offset it is gone.
        assert http.post(f"/bot{TOKEN}/getUpdates").json()["result"] == updates
        offset = updates[-1]["update_id"] + 1
        assert http.post(f"/bot{TOKEN}/getUpdates", data={"offset": str(offset)}).json()["result"] == []

        # allowed_updates filters and persists.
        emu.send_text(ALICE, CHAT, "/pending")
        only_taps = http.post(
            f"/bot{TOKEN}/getUpdates", data={"offset": str(offset), "allowed_updates": '["callback_query"]'}
        ).json()
        assert only_taps["result"] == []

        answered = http.post(
            f"/bot{TOKEN}/answerCallbackQuery", data={"callback_query_id": query["id"], "text": "ok"}
        ).json()
        assert answered == {"ok": True, "result": True} and emu.answer_for(query["id"])["text"] == "ok"
        twice = http.post(f"/bot{TOKEN}/answerCallbackQuery", data={"callback_query_id": query["id"]}).json()
        assert twice["error_code"] == 400


def test_emulator_html_matches_telegram_rules():
    text, entities = parse_html('a &lt;b&gt; <b>bold <i>both</i></b> 🙂<a href="https://x.example/">l</a>')
    assert text == "a <b> bold both 🙂l"
    assert entities == [
        {"type": "bold", "offset": 6, "length": 9},
        {"type": "italic", "offset": 11, "length": 4},
        {"type": "text_link", "offset": 18, "length": 1, "url": "https://x.example/"},
    ]
    for broken in ("<b>open", "</b>", "a < b", "<script>x</script>"):
        with pytest.raises(Exception, match="can't parse entities"):
            parse_html(broken)


def test_emulator_runs_in_another_process_with_a_control_api(tmp_path):
    api_port, control_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.telegram_emulator",
            "--token",
            TOKEN,
            "--host",
            "127.0.0.1",
            "--port",
            str(api_port),
            "--control-port",
            str(control_port),
            "--chat",
            str(CHAT),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert b"Bot API at" in process.stdout.readline()
        control = EmulatorControl(f"http://127.0.0.1:{control_port}")
        api = f"http://127.0.0.1:{api_port}/bot{TOKEN}"
        with httpx.Client(timeout=5) as http:
            sent = http.post(f"{api}/sendMessage", json={"chat_id": CHAT, "text": "hello"}).json()["result"]
            assert control.messages(CHAT)[0]["text"] == "hello"
            query = control.tap(ALICE, CHAT, sent["message_id"], "a:1")
            update = http.post(f"{api}/getUpdates", data={"timeout": "2"}).json()["result"][0]
            assert update["callback_query"]["id"] == query
            http.post(f"{api}/answerCallbackQuery", data={"callback_query_id": query, "text": "done"})
            assert control.answer_for(query)["text"] == "done"
            control.go_down("unreachable")
            with pytest.raises(httpx.ConnectError):
                http.post(f"{api}/getMe")
            control.come_back()
            assert http.post(f"{api}/getMe").json()["ok"] is True
    finally:
        process.terminate()
        process.wait(10)
