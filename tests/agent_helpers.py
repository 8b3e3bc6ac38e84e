"""Helpers for the agent's tools' tests: run `secret-proxy-agent` and the MCP server as an agent would,
and decide requests as the operator does (the CLI, in another process)."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import socket
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


class SilentProxy:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers: a proxy that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.accepted: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # kept open, never read from or written to

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


DROP = 0  # a ScriptedProxy reply status: close the connection without answering


class ScriptedProxy:
    """A stand-in proxy on 127.0.0.1 that answers each request with the next of `replies` for its path
    (status, JSON body, headers; status DROP hangs up instead), the last one repeated; every request is
    kept in `seen` (method, path, body)."""

    def __init__(self, replies: dict[str, list[tuple[int, dict, dict]]]) -> None:
        self.replies = replies
        self.seen: list[tuple[str, str, bytes]] = []
        self.times: list[float] = []  # when each came, on the monotonic clock
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.answer()

            def do_POST(self) -> None:  # noqa: N802
                self.answer()

            def answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.seen.append((self.command, self.path, body))
                outer.times.append(time.monotonic())
                key = f"{self.command} {self.path.split('?')[0]}"
                queue = outer.replies[key]
                status, reply, headers = queue.pop(0) if len(queue) > 1 else queue[0]
                if status == DROP:  # a network blip: the connection closes without an answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                raw = json.dumps(reply).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def approve_each_when_asked(data_dir: Path, count: int, timeout: float = 30) -> threading.Thread:
    """A thread that approves, with the CLI, each of the next `count` requests as they come."""

    def run() -> None:
        done: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(done) < count and time.monotonic() < deadline:
            for request_id in pending_ids(data_dir):
                if request_id not in done:
                    decide(data_dir, request_id)
                    done.add(request_id)
            time.sleep(0.2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
