"""Brokered calls from the agent's tools and with a Telegram approval: `secret-proxy-agent call`, the MCP tool
`use_secret_in_call`, and a tap on the Bot API emulator, each against a real `proxy serve` and a real HTTPS
destination on 127.0.0.1. The value must reach the destination and appear in nothing the agent gets."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import ClientSession

from proxy.policy import build_policy
from proxy.store import Store

from .agent_helpers import (
    REQUEST_ID_RE,
    agent_env,
    decide,
    decide_when_asked,
    outcome,
    run_agent,
    token_file,
    with_mcp_server,
)
from .broker_helpers import Rig
from .broker_upstream import Upstream, make_ca
from .proxy_helpers import SECRET_VALUE
from .telegram_helpers import ALICE, CHAT, start_rig, wait_until_polling


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(tmp_path_factory.mktemp("broker-agent"))
    yield r
    logs = r.stop()
    assert SECRET_VALUE not in logs


@pytest.fixture
def env(rig: Rig, tmp_path: Path) -> dict[str, str]:
    return agent_env(rig.server.url, token_file(tmp_path, rig.data.token), SECRET_PROXY_MCP_WAIT="30")


def test_the_call_command_prints_the_answer_and_never_the_value(rig: Rig, env: dict, tmp_path: Path) -> None:
    body = tmp_path / "release.json"
    body.write_bytes(b'{"tag": "v2"}')
    url = rig.base + "/v1/releases"
    approver = decide_when_asked(rig.data.settings.data_dir)
    result = run_agent(
        env,
        "call",
        "api-call",
        "--reason",
        "publish release v2",
        "-X",
        "POST",
        url,
        "-H",
        "Content-Type: application/json",
        "--data",
        f"@{body}",
    )
    approver.join(5)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/v1/releases" and "HTTP 200" in result.stderr
    assert SECRET_VALUE not in result.stdout + result.stderr
    seen = rig.up.requests[-1]
    assert seen.body == b'{"tag": "v2"}' and seen.headers["Authorization"] == f"Bearer {SECRET_VALUE}"


def test_the_call_command_exits_6_for_an_unlisted_destination(rig: Rig, env: dict) -> None:
    result = run_agent(env, "call", "api-call", "--reason", "r", f"https://localhost:{rig.other.port}/v1/x")
    assert result.returncode == 6 and "destination_not_allowed" in result.stderr
    assert rig.other.connections == 0


def test_get_of_a_broker_only_secret_exits_6_and_says_to_use_call(env: dict) -> None:
    result = run_agent(env, "get", "api-call", "--reason", "r")
    assert result.returncode == 6 and "broker_only" in result.stderr and "call" in result.stderr


def test_the_mcp_tool_makes_the_call_and_returns_the_redacted_answer(rig: Rig, env: dict) -> None:
    approver = decide_when_asked(rig.data.settings.data_dir)

    async def play(session: ClientSession) -> Any:
        return await session.call_tool(
            "use_secret_in_call",
            {"name": "api-call", "reason": "check what the API echoes", "method": "GET", "url": rig.base + "/v1/leak"},
        )

    result = outcome(with_mcp_server(env, play))
    approver.join(5)
    assert result["status"] == "done" and result["http_status"] == 200
    assert result["body"].startswith("[REDACTED: the destination's answer held the secret")
    assert result["redactions"] >= 3 and SECRET_VALUE not in json.dumps(result)


def test_a_telegram_tap_approves_one_call_shown_with_its_destination(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    up = Upstream(ca).start()
    tg = start_rig(tmp_path / "tg", {"SECRET_PROXY_BROKER_CA_FILE": str(ca.ca_file)})
    try:
        wait_until_polling(tg)
        url = f"https://localhost:{up.port}/v1/issues"
        with Store(tg.data.settings) as store:
            store.set_secret(
                "api-gh",
                SECRET_VALUE.encode(),
                "operator:test",
                build_policy([], [f"https://localhost:{up.port}/v1/"], "Authorization: token {value}"),
                broker_only=True,
            )
        http = httpx.Client(base_url=tg.url, headers={"Authorization": f"Bearer {tg.data.token}"}, timeout=30)
        call = {"method": "POST", "url": url, "headers": {}, "body_base64": base64.b64encode(b"hello").decode()}
        created = http.post("/v1/calls", json={"secret": "api-gh", "reason": "file <b>issue</b> #7", **call})
        assert created.status_code == 201, created.text
        rid = created.json()["id"]
        message = tg.message_for(rid)
        text = message["text"]
        for shown in (
            "api-gh",
            "POST",
            f"https://localhost:{up.port}",
            "/v1/issues",
            "5 bytes",
            "2cf24dba5fb0a30e",
            "file <b>issue</b> #7",
            "never sees the value",
        ):
            assert shown in text, shown
        assert not [
            e
            for e in message.get("entities", [])
            if e["type"] == "bold" and "issue" in text[e["offset"] : e["offset"] + e["length"]]
        ]  # the reason's markup is escaped
        tg.emu.tap(ALICE, CHAT, message["message_id"], f"a:{rid}")
        assert http.get(f"/v1/requests/{rid}?wait=10").json()["status"] == "approved"
        made = http.post(f"/v1/requests/{rid}/call", json=call)
        assert made.status_code == 200 and made.json()["status"] == 200, made.text
        assert up.requests[-1].headers["Authorization"] == f"token {SECRET_VALUE}"
        assert SECRET_VALUE not in made.text
        again = http.post(f"/v1/requests/{rid}/call", json=call)
        assert again.json()["error"] == "already_used" and len(up.requests) == 1
        http.close()
    finally:
        tg.stop()  # also checks that the value is nowhere in the proxy's DEBUG log
        up.stop()


def test_a_call_that_timed_out_is_made_by_wait_once_approved_without_a_second_approval(rig: Rig, env: dict) -> None:
    url = rig.base + "/v1/releases"
    timed_out = run_agent(
        env, "call", "api-call", "--reason", "publish v5", "-X", "POST", url, "--data", "{}", "--timeout", "1"
    )
    assert timed_out.returncode == 5, timed_out.stderr
    request_id = REQUEST_ID_RE.search(timed_out.stderr).group(0)
    assert f"secret-proxy-agent wait {request_id}" in timed_out.stderr
    decide(rig.data.settings.data_dir, request_id)
    before = len(rig.up.requests)
    made = run_agent(env, "wait", request_id, "--timeout", "20")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["path"] == "/v1/releases" and len(rig.up.requests) == before + 1
    again = run_agent(env, "call", "--id", request_id)
    assert again.returncode == 4 and "made already" in again.stderr and "expired" not in again.stderr
    assert len(rig.up.requests) == before + 1


def test_a_restarted_mcp_server_makes_a_call_approved_after_the_first_one_gave_up(rig: Rig, env: dict) -> None:
    async def ask(session: ClientSession) -> Any:
        return await session.call_tool(
            "use_secret_in_call",
            {"name": "api-call", "reason": "list releases", "method": "GET", "url": rig.base + "/v1/releases"},
        )

    pending = outcome(with_mcp_server({**env, "SECRET_PROXY_MCP_WAIT": "1"}, ask))
    assert pending["status"] == "pending"
    decide(rig.data.settings.data_dir, pending["id"])

    async def finish(session: ClientSession) -> Any:  # a new server process: it knows nothing of the first
        return await session.call_tool("wait_for_decision", {"id": pending["id"]})

    done = outcome(with_mcp_server(env, finish))
    assert done["status"] == "done" and done["http_status"] == 200 and done["id"] == pending["id"]
    assert json.loads(done["body"])["path"] == "/v1/releases"
