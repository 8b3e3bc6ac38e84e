"""Helpers for the agent's tools' tests: run `secret-proxy-agent` and the MCP server as an agent would,
and decide requests as the operator does (the CLI, in another process)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters, stdio_client

from tests.proxy_helpers import ROOT, cli

REQUEST_ID_RE = re.compile(r"req_[A-Za-z0-9_-]+")


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "agent.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def agent_env(url: str, token_path: Path | None, **extra: str) -> dict[str, str]:
    """The agent's environment: the proxy's URL and token file, a PATH, nothing of the test's secrets."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "SECRET_PROXY_URL": url}
    if token_path is not None:
        env["SECRET_PROXY_TOKEN_FILE"] = str(token_path)
    env.update(extra)
    return env


def agent_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy.agent", *args]


def run_agent(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(agent_argv(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def start_agent(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        agent_argv(*args), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def request_id_from(stderr_line_source: subprocess.Popen, seen: list[str]) -> str:
    """Reads the agent's stderr until it names its request; keeps every line in `seen`."""
    assert stderr_line_source.stderr is not None
    for line in stderr_line_source.stderr:
        seen.append(line)
        found = REQUEST_ID_RE.search(line)
        if found:
            return found.group(0)
    raise AssertionError("the agent never named its request: " + "".join(seen))


def decide(data_dir: Path, request_id: str, decision: str = "approve") -> None:
    """An approver's decision with the operator CLI, in its own process."""
    result = cli(data_dir, decision, request_id)
    assert result.returncode == 0, result.stderr.decode()


def pending_ids(data_dir: Path) -> list[str]:
    listed = cli(data_dir, "requests", "list", "--status", "pending")
    assert listed.returncode == 0, listed.stderr.decode()
    return REQUEST_ID_RE.findall(listed.stdout.decode())


def decide_when_asked(data_dir: Path, decision: str = "approve", timeout: float = 30) -> threading.Thread:
    """A thread that waits for one pending request and decides it with the CLI (for callers that block)."""

    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = pending_ids(data_dir)
            if ids:
                decide(data_dir, ids[0], decision)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


Session = Callable[[ClientSession], Awaitable[Any]]


def with_mcp_server(env: dict[str, str], play: Session) -> Any:
    """Starts the MCP server as an MCP client does (a child on stdio), initializes, and plays `play`."""
    params = StdioServerParameters(command=sys.executable, args=["-m", "proxy.agent", "mcp"], env=env, cwd=ROOT)

    async def run() -> Any:
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=90) as session:
                await session.initialize()
                return await play(session)

    return asyncio.run(run())


def outcome(result: Any) -> dict:
    assert not result.is_error, result.content
    return result.structured_content or json.loads(result.content[0].text)
