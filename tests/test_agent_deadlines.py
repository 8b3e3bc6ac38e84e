"""The agent's tools against a proxy that misbehaves: one that accepts and never answers, one killed while
the agent waits, one that answers 429 or 5xx. `--timeout` (and the MCP server's wait) is a deadline for
the whole command, every error names the request once there is one, and nothing a human approved is lost."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession

from proxy.agent import errors
from tests.agent_helpers import (
    DROP,
    ScriptedProxy,
    SilentProxy,
    agent_env,
    decide,
    outcome,
    pending_ids,
    request_id_from,
    run_agent,
    start_agent,
    token_file,
    with_mcp_server,
)
from tests.proxy_helpers import SECRET_VALUE, Proxy, start_server

REQUEST_ID = "req_" + "scripted" * 4  # the shape the proxy issues


@pytest.fixture
def token_path(tmp_path: Path, proxy_data: Proxy) -> Path:
    return token_file(tmp_path, proxy_data.token)


@pytest.mark.parametrize("args", [["get", "api-key", "--reason", "r"], ["wait", REQUEST_ID]])
def test_a_proxy_that_never_answers_is_given_up_on_at_the_timeout(token_path: Path, args: list[str]) -> None:
    silent = SilentProxy()
    try:
        started = time.monotonic()
        result = run_agent(agent_env(silent.url, token_path), *args, "--timeout", "3")
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert result.returncode == errors.EXIT_TIMED_OUT, result.stderr
    assert 2.5 <= elapsed < 6.5, elapsed  # 3 s, and a poll held to the deadline comes back within 1 s more
    assert "before the deadline" in result.stderr and "what to do:" in result.stderr
    if args[0] == "wait":
        assert f"secret-proxy-agent wait {REQUEST_ID}" in result.stderr


def test_an_mcp_tool_against_a_proxy_that_never_answers_answers_by_the_wait(token_path: Path) -> None:
    silent = SilentProxy()

    async def play(session: ClientSession) -> Any:
        started = time.monotonic()
        result = await session.call_tool(
            "run_with_secret", {"name": "api-key", "reason": "r", "env_var": "KEY", "command": ["true"]}
        )
        return result, time.monotonic() - started

    try:
        result, elapsed = with_mcp_server(agent_env(silent.url, token_path, SECRET_PROXY_MCP_WAIT="3"), play)
    finally:
        silent.close()
    assert result.is_error and "before the deadline" in result.content[0].text
    assert elapsed < 6.5, elapsed


def test_a_proxy_killed_mid_wait_leaves_the_request_named_and_wait_picks_it_up(
    proxy_data: Proxy, token_path: Path
) -> None:
    server = start_server(proxy_data.settings)
    try:
        started = time.monotonic()
        agent = start_agent(agent_env(server.url, token_path), "get", "api-key", "--reason", "r", "--timeout", "6")
        seen: list[str] = []
        request_id = request_id_from(agent, seen)
        server.process.kill()  # the VM dies, say
        out, err = agent.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        server.stop()
    stderr = "".join(seen) + err
    assert agent.returncode == errors.EXIT_UNREACHABLE, stderr
    assert elapsed < 6 + 3, elapsed
    last = stderr.strip().splitlines()[-1]
    assert request_id in last and f"secret-proxy-agent wait {request_id}" in last  # the error itself names it

    again = start_server(proxy_data.settings)  # the proxy is back; the request outlived it
    try:
        decide(proxy_data.settings.data_dir, request_id)
        resumed = run_agent(agent_env(again.url, token_path), "wait", request_id, "--timeout", "20")
    finally:
        again.stop()
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == SECRET_VALUE


def test_an_mcp_tool_whose_proxy_is_killed_mid_wait_names_the_request(proxy_data: Proxy, token_path: Path) -> None:
    server = start_server(proxy_data.settings)
    data_dir = proxy_data.settings.data_dir

    async def play(session: ClientSession) -> Any:
        call = asyncio.ensure_future(
            session.call_tool(
                "run_with_secret",
                {"name": "api-key", "reason": "r", "env_var": "KEY", "command": ["true"]},
            )
        )
        while not (ids := await asyncio.to_thread(pending_ids, data_dir)):
            await asyncio.sleep(0.2)
        server.process.kill()
        return await call, ids[0]

    try:
        result, request_id = with_mcp_server(agent_env(server.url, token_path, SECRET_PROXY_MCP_WAIT="5"), play)
    finally:
        server.stop()
    assert result.is_error
    text = result.content[0].text
    assert request_id in text and "cannot reach the proxy" in text and "what to do:" in text


def _approved_call_proxy(*make: tuple[int, dict, dict]) -> ScriptedProxy:
    view = {
        "id": REQUEST_ID,
        "status": "approved",
        "secret": "api-call",
        "call": {"method": "GET", "url": "https://api.example.com/v1/items"},
    }
    return ScriptedProxy(
        {
            f"GET /v1/requests/{REQUEST_ID}": [(200, view, {})],
            f"POST /v1/requests/{REQUEST_ID}/call": list(make),
        }
    )


def _answer(status: int, body: bytes) -> tuple[int, dict, dict]:
    reply = {"status": status, "headers": [["Content-Type", "text/plain"]], "body_base64": base64.b64encode(body)}
    return 200, {**reply, "body_base64": reply["body_base64"].decode(), "redactions": 0}, {}


TOO_MANY = (429, {"error": "too_many_calls", "detail": "4 calls under way"}, {"Retry-After": "1"})


def test_a_429_while_making_an_approved_call_is_waited_out_and_the_call_made_by_its_id(token_path: Path) -> None:
    proxy = _approved_call_proxy(TOO_MANY, _answer(200, b"made"))
    try:
        result = run_agent(agent_env(proxy.url, token_path), "wait", REQUEST_ID, "--timeout", "20")
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == "made"
    posts = [body for method, _, body in proxy.seen if method == "POST"]
    assert posts == [b"{}", b"{}"]  # by id, twice: the 429 spent nothing
    assert "asking again in 1 s" in result.stderr


def test_an_mcp_server_makes_an_approved_call_by_its_id_through_a_429(token_path: Path) -> None:
    proxy = _approved_call_proxy(TOO_MANY, _answer(200, b"made"))

    async def play(session: ClientSession) -> Any:
        return await session.call_tool("wait_for_decision", {"id": REQUEST_ID})

    try:
        result = outcome(with_mcp_server(agent_env(proxy.url, token_path), play))
    finally:
        proxy.close()
    assert result["status"] == "done" and result["body"] == "made" and result["id"] == REQUEST_ID


def test_call_fail_exits_22_on_an_http_error_and_json_says_so(token_path: Path) -> None:
    proxy = _approved_call_proxy(_answer(404, b"no such item"))
    try:
        plain = run_agent(agent_env(proxy.url, token_path), "call", "--id", REQUEST_ID, "--fail")
        as_json = run_agent(agent_env(proxy.url, token_path), "call", "--id", REQUEST_ID, "--fail", "--json")
        lenient = run_agent(agent_env(proxy.url, token_path), "call", "--id", REQUEST_ID)
    finally:
        proxy.close()
    assert plain.returncode == errors.EXIT_CALL_FAILED and plain.stdout == "no such item"
    assert "HTTP 404" in plain.stderr and REQUEST_ID in plain.stderr
    answer = json.loads(as_json.stdout)
    assert as_json.returncode == 22 and answer["http_status"] == 404 and answer["exit_code"] == 22
    assert lenient.returncode == 0


def test_a_5xx_of_a_brokered_call_carries_the_proxys_code_and_detail(token_path: Path) -> None:
    failed = (504, {"error": "upstream_timeout", "detail": "no whole answer within 30 s"}, {})
    proxy = _approved_call_proxy(failed)
    try:
        result = run_agent(agent_env(proxy.url, token_path), "wait", REQUEST_ID, "--json")
    finally:
        proxy.close()
    error = json.loads(result.stdout)
    assert result.returncode == errors.EXIT_UNREACHABLE
    assert error["error"] == "upstream_timeout" and "no whole answer within 30 s" in error["message"]
    assert error["id"] == REQUEST_ID and "approval is used up" in error["what_to_do"]
    assert len([m for m, _, _ in proxy.seen if m == "POST"]) == 1  # a made call is never made again


DROPPED = (DROP, {}, {})


def test_a_connection_dropped_before_the_call_is_made_costs_nothing_and_the_call_is_made(token_path: Path) -> None:
    proxy = _approved_call_proxy(DROPPED, _answer(200, b"made"))

    async def play(session: ClientSession) -> Any:
        return await session.call_tool("wait_for_decision", {"id": REQUEST_ID})

    try:
        result = outcome(with_mcp_server(agent_env(proxy.url, token_path, SECRET_PROXY_MCP_WAIT="20"), play))
    finally:
        proxy.close()
    assert result["status"] == "done" and result["body"] == "made"


def test_a_connection_dropped_while_the_call_was_made_says_the_answer_is_lost(token_path: Path) -> None:
    used = (410, {"error": "already_used", "detail": "the approved call was already made"}, {})
    proxy = _approved_call_proxy(DROPPED, used)
    try:
        result = run_agent(agent_env(proxy.url, token_path), "wait", REQUEST_ID, "--timeout", "20")
    finally:
        proxy.close()
    assert result.returncode == errors.EXIT_EXPIRED, result.stderr
    assert "the call was made, and its answer is lost" in result.stderr and REQUEST_ID in result.stderr
