"""What an agent can find out and undo with its own tools: `list` (its scope), `requests` (its own),
`cancel`, and `--json` with the proxy's error codes; the same as MCP tools. Against a real `proxy serve`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession

from proxy.agent import errors
from proxy.policy import build_policy
from proxy.store import Store
from proxy.telegram_render import render_closed
from tests.agent_helpers import agent_env, outcome, pending_ids, run_agent, token_file, with_mcp_server
from tests.proxy_helpers import SECRET_VALUE, LiveServer, Proxy, cli
from tests.telegram_helpers import ALICE, CHAT, start_rig, wait_until_polling


@pytest.fixture
def env(live: LiveServer, proxy_data: Proxy, tmp_path: Path) -> dict[str, str]:
    with Store(proxy_data.settings) as store:
        policy = build_policy(["https://api.example.com/v1/"], [], "Authorization: Bearer {value}")
        store.set_secret("api-broker", SECRET_VALUE.encode(), "operator:test", policy, broker_only=True)
    return agent_env(live.url, token_file(tmp_path, proxy_data.token))


def test_list_shows_the_agents_scope_and_how_each_secret_may_be_used(env: dict) -> None:
    plain = run_agent(env, "list")
    assert plain.returncode == 0, plain.stderr
    lines = dict(line.split("\t") for line in plain.stdout.splitlines())
    assert set(lines) == {"api-key", "api-broker"}  # not other-key, not db-password
    assert lines["api-key"] == "get/exec"
    assert "call (into header Authorization) to https://api.example.com:443/v1/" in lines["api-broker"]
    assert "broker-only" in lines["api-broker"] and SECRET_VALUE not in plain.stdout
    as_json = json.loads(run_agent(env, "list", "--json").stdout)
    assert [s["name"] for s in as_json["secrets"]] == ["api-broker", "api-key"]


@pytest.mark.parametrize("secret,code", [("db-password", "forbidden"), ("api-missing", "unknown_secret")])
def test_json_errors_tell_refused_by_scope_from_unknown(env: dict, secret: str, code: str) -> None:
    result = run_agent(env, "get", secret, "--reason", "r", "--json")
    error = json.loads(result.stdout)
    assert result.returncode == errors.EXIT_REFUSED and error["exit_code"] == errors.EXIT_REFUSED
    assert error["status"] == "error" and error["error"] == code and error["what_to_do"]
    assert result.stderr == ""


def test_an_agent_lists_and_cancels_its_own_pending_request(env: dict, live: LiveServer) -> None:
    asked = json.loads(run_agent(env, "get", "api-key", "--reason", "nightly", "--timeout", "0", "--json").stdout)
    request_id = asked["id"]
    listed = run_agent(env, "requests", "--status", "pending", "--json")
    assert [r["id"] for r in json.loads(listed.stdout)["requests"]] == [request_id]

    cancelled = run_agent(env, "cancel", request_id)
    assert cancelled.returncode == 0 and f"request {request_id} cancelled" in cancelled.stderr
    assert pending_ids(live.settings.data_dir) == []
    late = cli(live.settings.data_dir, "approve", request_id)  # the approver, too late
    assert late.returncode != 0 and b"already cancelled" in late.stderr
    waited = run_agent(env, "wait", request_id)
    assert waited.returncode == errors.EXIT_EXPIRED and "cancelled" in waited.stderr and waited.stdout == ""
    with Store(live.settings) as store:
        req = store.get_request(request_id)
        shown = render_closed(req, {})
    assert "Withdrawn by the agent" in shown and "Approved" not in shown  # the Telegram message, edited


def test_the_mcp_server_lists_scope_and_requests_and_cancels(env: dict, live: LiveServer) -> None:
    env = {**env, "SECRET_PROXY_MCP_WAIT": "0"}

    async def play(session: ClientSession) -> Any:
        secrets = outcome(await session.call_tool("list_secrets", {}))
        run = {"name": "api-key", "reason": "r", "env_var": "KEY", "command": ["true"]}
        pending = outcome(await session.call_tool("run_with_secret", run))
        mine = outcome(await session.call_tool("list_requests", {"status": "pending"}))
        cancelled = outcome(await session.call_tool("cancel_request", {"id": pending["id"]}))
        return secrets, pending, mine, cancelled

    secrets, pending, mine, cancelled = with_mcp_server(env, play)
    assert {s["name"] for s in secrets["secrets"]} == {"api-key", "api-broker"}
    assert SECRET_VALUE not in json.dumps(secrets)
    assert pending["status"] == "pending" and "run_with_secret again" in pending["what_to_do"]
    assert [r["id"] for r in mine["requests"]] == [pending["id"]]
    assert cancelled["status"] == "cancelled" and cancelled["cancelled"] is True


def test_a_cancel_edits_the_approvers_telegram_message_and_a_late_tap_changes_nothing(tmp_path: Path) -> None:
    tg = start_rig(tmp_path / "tg")
    try:
        wait_until_polling(tg)
        request_id = tg.ask("rotate the staging key")
        message = tg.message_for(request_id)
        env = agent_env(tg.url, token_file(tmp_path, tg.data.token))
        assert run_agent(env, "cancel", request_id).returncode == 0
        edited = tg.emu.wait_for(
            lambda: next(
                (m for m in tg.emu.messages(CHAT) if request_id in m["text"] and "Withdrawn" in m["text"]), None
            ),
            10,
            "the message edited to say the agent withdrew the request",
        )
        assert edited["message_id"] == message["message_id"] and not edited.get("reply_markup")
        tg.emu.tap(ALICE, CHAT, message["message_id"], f"a:{request_id}")  # a tap on the old buttons, too late
        time.sleep(1)
        assert tg.status(request_id) == "cancelled"
    finally:
        tg.stop()
