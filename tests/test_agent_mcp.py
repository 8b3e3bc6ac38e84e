"""The MCP server (`python -m proxy.agent mcp`), driven by the mcp SDK's own client over stdio,
against a real `proxy serve`; every decision is the operator CLI's, in another process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession

from proxy.agent import errors
from tests.agent_helpers import (
    agent_env,
    decide,
    decide_when_asked,
    outcome,
    pending_ids,
    run_agent,
    token_file,
    with_mcp_server,
)
from tests.proxy_helpers import ROOT, SECRET_VALUE, LiveServer, Proxy, cli
from vm_image.proxy_venv import export_argv, find_uv


@pytest.fixture
def mcp_env(live: LiveServer, proxy_data: Proxy, tmp_path: Path) -> dict[str, str]:
    return agent_env(live.url, token_file(tmp_path, proxy_data.token), SECRET_PROXY_MCP_WAIT="30")


@pytest.fixture
def valued_env(mcp_env: dict) -> dict[str, str]:
    """The server as configured by someone who opted in to values in the model's context."""
    return {**mcp_env, "SECRET_PROXY_MCP_RETURN_VALUES": "1"}


KEPT_OUT = {
    "list_secrets",
    "list_requests",
    "cancel_request",
    "run_with_secret",
    "wait_for_decision",
    "use_secret_in_call",
}


def test_by_default_no_tool_returns_a_value_into_the_models_context(mcp_env: dict, live: LiveServer) -> None:
    async def play(session: ClientSession) -> Any:
        tools = (await session.list_tools()).tools
        asked = await session.call_tool("request_secret", {"name": "api-key", "reason": "r"})
        return tools, asked

    tools, asked = with_mcp_server(mcp_env, play)
    assert {tool.name for tool in tools} == KEPT_OUT
    assert asked.is_error and pending_ids(live.settings.data_dir) == []  # no such tool: nothing asked


def test_the_tools_tell_a_model_that_a_human_approves_and_what_to_write(valued_env: dict) -> None:
    async def play(session: ClientSession) -> Any:
        return (await session.list_tools()).tools, session.initialize_result

    tools, _ = with_mcp_server(valued_env, play)
    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == KEPT_OUT | {"request_secret"}
    assert "run_with_secret" in by_name["request_secret"].description  # the better way, named
    asking = by_name["request_secret"]
    assert "A human approves every use" in asking.description
    assert asking.input_schema["required"] == ["name", "reason"]
    reason_help = asking.input_schema["properties"]["reason"]["description"]
    assert "what you will do with the secret, where, and why now" in reason_help
    assert "wait_for_decision" in asking.description and "pending" in by_name["wait_for_decision"].description


def test_request_secret_returns_the_value_when_a_human_approves_during_the_wait(
    valued_env: dict, live: LiveServer
) -> None:
    approver = decide_when_asked(live.settings.data_dir)

    async def play(session: ClientSession) -> Any:
        return await session.call_tool("request_secret", {"name": "api-key", "reason": "deploy web-api to staging"})

    result = outcome(with_mcp_server(valued_env, play))
    approver.join(5)
    assert result["status"] == "approved" and result["value"] == SECRET_VALUE
    assert result["secret"] == "api-key" and result["id"].startswith("req_")


def test_a_pending_request_is_picked_up_by_wait_for_decision(valued_env: dict, live: LiveServer) -> None:
    valued_env["SECRET_PROXY_MCP_WAIT"] = "1"

    async def play(session: ClientSession) -> Any:
        first = outcome(await session.call_tool("request_secret", {"name": "api-key", "reason": "nightly backup"}))
        assert first["status"] == "pending" and "wait_for_decision" in first["what_to_do"]
        assert pending_ids(live.settings.data_dir) == [first["id"]]
        decide(live.settings.data_dir, first["id"])  # the approver, meanwhile
        second = outcome(await session.call_tool("wait_for_decision", {"id": first["id"]}))
        third = outcome(await session.call_tool("wait_for_decision", {"id": first["id"]}))
        return first, second, third

    first, second, third = with_mcp_server(valued_env, play)
    assert "value" not in first
    assert second == {"status": "approved", "id": first["id"], "secret": "api-key", "value": SECRET_VALUE}
    assert third["status"] == "expired" and "value" not in third  # handed out once


def test_a_denial_returns_no_value(valued_env: dict, live: LiveServer) -> None:
    approver = decide_when_asked(live.settings.data_dir, "deny")

    async def play(session: ClientSession) -> Any:
        return await session.call_tool("request_secret", {"name": "api-key", "reason": "read the billing data"})

    result = outcome(with_mcp_server(valued_env, play))
    approver.join(5)
    assert result["status"] == "denied" and "value" not in result
    assert "do not ask again" in result["what_to_do"]


@pytest.mark.parametrize(
    "arguments,says",
    [
        ({"name": "api-missing", "reason": "r"}, "unknown_secret"),
        ({"name": "db-password", "reason": "r"}, "forbidden"),
    ],
)
def test_a_refusal_is_a_tool_error_that_says_what_to_do(mcp_env: dict, arguments: dict, says: str) -> None:
    async def play(session: ClientSession) -> Any:
        return await session.call_tool("run_with_secret", {**arguments, "env_var": "KEY", "command": ["true"]})

    result = with_mcp_server(mcp_env, play)
    assert result.is_error
    text = result.content[0].text
    assert says in text and "what to do:" in text


def test_a_bad_request_id_is_a_tool_error(mcp_env: dict) -> None:
    async def play(session: ClientSession) -> Any:
        return await session.call_tool("wait_for_decision", {"id": "../../health"})

    result = with_mcp_server(mcp_env, play)
    assert result.is_error and "not a request id" in result.content[0].text


def test_the_mcp_server_names_missing_configuration() -> None:
    result = run_agent({"PATH": "/usr/bin:/bin"}, "mcp", timeout=30)
    assert result.returncode == errors.EXIT_USAGE and "SECRET_PROXY_URL is not set" in result.stderr


def test_the_guest_venv_does_not_get_the_mcp_sdk(tmp_path: Path) -> None:
    """vm_image/proxy_venv.py exports the guest's requirements from uv.lock without extras."""
    uv = find_uv()
    assert uv, "uv is installed by scripts/setup.sh"

    def export(*extra: str) -> set[str]:
        requirements = tmp_path / "requirements.txt"
        subprocess.run([*export_argv(uv, requirements), *extra], capture_output=True, check=True, cwd=ROOT)
        return {line.split("==")[0] for line in requirements.read_text().splitlines() if "==" in line}

    guest = export()
    assert "starlette" in guest and "mcp" not in guest and "pydantic" not in guest
    assert "mcp" in export("--extra", "agent")  # the export can name the SDK: its absence above is the point


def test_run_with_secret_returns_the_commands_output_with_the_value_masked(mcp_env: dict, live: LiveServer) -> None:
    approver = decide_when_asked(live.settings.data_dir)
    child = (
        "import os, sys; print('key', os.environ['API_KEY']); "
        "print(sorted(k for k in os.environ if k.startswith('SECRET_PROXY_')), file=sys.stderr); sys.exit(7)"
    )

    async def play(session: ClientSession) -> Any:
        return await session.call_tool(
            "run_with_secret",
            {
                "name": "api-key",
                "reason": "check the key works against the staging API",
                "env_var": "API_KEY",
                "command": [sys.executable, "-c", child],
            },
        )

    result = outcome(with_mcp_server(mcp_env, play))
    approver.join(5)
    assert result["status"] == "done" and result["exit_code"] == 7
    assert result["stdout"] == "key <concealed by secret-proxy>\n"
    assert result["stderr"] == "[]\n"  # the child got no proxy URL, token or token file
    assert SECRET_VALUE not in json.dumps(result)
    shown = cli(live.settings.data_dir, "requests", "list").stdout.decode()
    assert "run_with_secret runs: " in shown and "-c" in shown  # the approver read which command gets the value
