"""`secret-proxy-agent` (python -m proxy.agent) against a real `proxy serve` on loopback.

Every exit code in docs/agent.md is produced here by the situation it names; a
human's decision is always the operator CLI in another process; `exec` is
checked for the value turning up anywhere but the child's environment.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from proxy.agent import errors
from proxy.demo import free_port
from tests.agent_helpers import (
    REQUEST_ID_RE,
    ScriptedProxy,
    agent_argv,
    agent_env,
    decide,
    decide_when_asked,
    pending_ids,
    request_id_from,
    run_agent,
    start_agent,
    token_file,
)
from tests.proxy_helpers import ROOT, SECRET_VALUE, LiveServer, Proxy, cli, start_server

FLAKY_ID = "req_" + "flaky" * 6 + "fl"  # the shape the proxy issues: 32 characters after req_


@pytest.fixture
def token_path(tmp_path: Path, proxy_data: Proxy) -> Path:
    return token_file(tmp_path, proxy_data.token)


@pytest.fixture
def env(live: LiveServer, token_path: Path) -> dict[str, str]:
    return agent_env(live.url, token_path)


# -- get --------------------------------------------------------------------------------------
def test_get_prints_the_value_once_after_a_cli_approval(env: dict, live: LiveServer, proxy_data: Proxy) -> None:
    agent = start_agent(env, "get", "api-key", "--reason", "deploy web-api to staging", "--timeout", "30")
    seen: list[str] = []
    request_id = request_id_from(agent, seen)
    decide(live.settings.data_dir, request_id)
    out, err = agent.communicate(timeout=30)
    stderr = "".join(seen) + err
    assert agent.returncode == errors.EXIT_OK, stderr
    assert out == SECRET_VALUE  # the value, exactly, and nothing else
    assert request_id in stderr and "approved" in stderr
    assert SECRET_VALUE not in stderr and proxy_data.token not in stderr

    again = run_agent(env, "wait", request_id)  # the value is handed out once
    assert again.returncode == errors.EXIT_EXPIRED, again.stderr
    assert again.stdout == "" and "handed out already" in again.stderr


def test_get_exits_3_when_an_approver_denies(env: dict, live: LiveServer) -> None:
    agent = start_agent(env, "get", "api-key", "--reason", "rotate the key", "--timeout", "30")
    request_id = request_id_from(agent, [])
    decide(live.settings.data_dir, request_id, "deny")
    out, err = agent.communicate(timeout=30)
    assert agent.returncode == errors.EXIT_DENIED, err
    assert out == "" and "denied" in err


def test_get_exits_5_when_nobody_decides_in_time_and_wait_picks_it_up(env: dict, live: LiveServer) -> None:
    started = time.monotonic()
    timed_out = run_agent(env, "get", "api-key", "--reason", "nightly backup", "--timeout", "1.5")
    assert timed_out.returncode == errors.EXIT_TIMED_OUT, timed_out.stderr
    assert 1.5 <= time.monotonic() - started < 15
    assert timed_out.stdout == ""
    request_id = REQUEST_ID_RE.search(timed_out.stderr).group(0)
    assert f"secret-proxy-agent wait {request_id}" in timed_out.stderr  # says how to go on

    status = run_agent(env, "status", request_id)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "pending"
    decide(live.settings.data_dir, request_id)
    resumed = run_agent(env, "wait", request_id, "--timeout", "10")
    assert resumed.returncode == errors.EXIT_OK, resumed.stderr
    assert resumed.stdout == SECRET_VALUE
    assert json.loads(run_agent(env, "status", request_id).stdout)["status"] == "retrieved"


def test_get_exits_4_when_the_request_expires_undecided(proxy_data: Proxy, token_path: Path) -> None:
    server = start_server(proxy_data.settings, {"SECRET_PROXY_PENDING_TIMEOUT_SECONDS": "2"})
    try:
        result = run_agent(agent_env(server.url, token_path), "get", "api-key", "--reason", "r", "--timeout", "20")
    finally:
        server.stop()
    assert result.returncode == errors.EXIT_EXPIRED, result.stderr
    assert result.stdout == "" and "expired" in result.stderr


@pytest.mark.parametrize("secret,code", [("api-missing", "unknown_secret"), ("db-password", "forbidden")])
def test_get_exits_6_when_the_proxy_refuses(env: dict, secret: str, code: str) -> None:
    result = run_agent(env, "get", secret, "--reason", "needed for the task")
    assert result.returncode == errors.EXIT_REFUSED, result.stderr
    assert code in result.stderr and "what to do:" in result.stderr and result.stdout == ""


def test_a_wrong_token_exits_6_and_is_never_printed(live: LiveServer, tmp_path: Path) -> None:
    wrong = "agt_" + "x" * 40
    result = run_agent(agent_env(live.url, None, SECRET_PROXY_TOKEN=wrong), "get", "api-key", "--reason", "r")
    assert result.returncode == errors.EXIT_REFUSED
    assert "unauthorized" in result.stderr and wrong not in result.stderr + result.stdout


def test_rate_limited_asking_exits_6_and_says_when_to_retry(proxy_data: Proxy, token_path: Path) -> None:
    server = start_server(proxy_data.settings, {"SECRET_PROXY_RATE_BURST": "1", "SECRET_PROXY_RATE_PER_MINUTE": "1"})
    try:
        env = agent_env(server.url, token_path)
        first = run_agent(env, "get", "api-key", "--reason", "first", "--timeout", "0")
        second = run_agent(env, "get", "api-key", "--reason", "second", "--timeout", "0")
    finally:
        server.stop()
    assert first.returncode == errors.EXIT_TIMED_OUT, first.stderr
    assert second.returncode == errors.EXIT_REFUSED, second.stderr
    assert "rate_limited" in second.stderr and "Retry-After" in second.stderr


def test_unreachable_proxy_exits_7(token_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_agent(agent_env(closed, token_path), "get", "api-key", "--reason", "r")
    assert result.returncode == errors.EXIT_UNREACHABLE
    assert "cannot reach the proxy" in result.stderr and "SECRET_PROXY_URL" in result.stderr


def test_a_proxy_that_answers_429_while_waiting_is_waited_for(tmp_path: Path, token_path: Path) -> None:
    """The proxy may rate-limit status calls too: the wait honours Retry-After instead of giving up."""
    proxy = ScriptedProxy(
        {
            f"GET /v1/requests/{FLAKY_ID}": [
                (429, {"error": "rate_limited", "detail": "slow down"}, {"Retry-After": "1"}),
                (200, {"id": FLAKY_ID, "status": "approved", "secret": "api-key"}, {}),
            ],
            f"GET /v1/requests/{FLAKY_ID}/secret": [(200, {"secret": "api-key", "value": SECRET_VALUE}, {})],
        }
    )
    try:
        result = run_agent(agent_env(proxy.url, token_path), "wait", FLAKY_ID, "--timeout", "20")
    finally:
        proxy.close()
    assert result.returncode == errors.EXIT_OK, result.stderr
    assert result.stdout == SECRET_VALUE
    assert proxy.times[1] - proxy.times[0] >= 0.9  # it slept as long as Retry-After said
    assert "asking again in 1 s" in result.stderr


class Recorder(http.server.BaseHTTPRequestHandler):
    """A listener that notes every request it gets, and answers with a redirect to `target` if the server has one."""

    def do_GET(self) -> None:  # noqa: N802
        self.server.seen.append((self.path, self.headers.get("Authorization")))  # type: ignore[attr-defined]
        target = getattr(self.server, "target", None)
        self.send_response(307 if target else 502)
        if target:
            self.send_header("Location", target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def recorder(target: str | None = None) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.seen = []  # type: ignore[attr-defined]
    server.target = target  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_token_goes_only_to_the_proxy_url_not_to_a_proxy_or_a_redirect(token_path: Path, proxy_data: Proxy) -> None:
    elsewhere = recorder()  # stands for an HTTP proxy in the environment, and for a redirect's target
    redirecting = recorder(target=f"http://127.0.0.1:{elsewhere.server_port}")
    try:
        hop = f"http://127.0.0.1:{elsewhere.server_port}"
        env = agent_env(
            f"http://127.0.0.1:{redirecting.server_port}",
            token_path,
            HTTP_PROXY=hop,
            http_proxy=hop,
            HTTPS_PROXY=hop,
            https_proxy=hop,
            ALL_PROXY=hop,
        )
        result = run_agent(env, "status", "req_abcabcabcabcabcabcabcabcabcabcab")
    finally:
        redirecting.shutdown()
        elsewhere.shutdown()
    assert result.returncode == errors.EXIT_UNREACHABLE  # a redirect is not an answer
    assert redirecting.seen == [("/v1/requests/req_abcabcabcabcabcabcabcabcabcabcab", f"Bearer {proxy_data.token}")]
    assert elsewhere.seen == []


# -- bad usage --------------------------------------------------------------------------------
def test_missing_configuration_is_named(tmp_path: Path) -> None:
    no_url = run_agent({"PATH": os.defpath}, "get", "api-key", "--reason", "r")
    assert no_url.returncode == errors.EXIT_USAGE and "SECRET_PROXY_URL is not set" in no_url.stderr
    no_token = run_agent(
        {"PATH": os.defpath, "SECRET_PROXY_URL": "http://127.0.0.1:9"}, "get", "api-key", "--reason", "r"
    )
    assert no_token.returncode == errors.EXIT_USAGE
    assert "SECRET_PROXY_TOKEN" in no_token.stderr and "SECRET_PROXY_TOKEN_FILE" in no_token.stderr
    missing_file = run_agent(agent_env("http://127.0.0.1:9", tmp_path / "nope"), "status", "req_" + "x" * 32)
    assert missing_file.returncode == errors.EXIT_USAGE and str(tmp_path / "nope") in missing_file.stderr


@pytest.mark.parametrize(
    "args,says",
    [
        (["get", "api-key"], "--reason"),
        (["get", "../etc/passwd", "--reason", "r"], "not a secret name"),
        (["get", "api-key", "--reason", "  "], "--reason must be"),
        (["get", "api-key", "--reason", "r", "--timeout", "-1"], "not a number of seconds"),
        (["status", "../v1/requests"], "not a request id"),
        (["exec", "api-key", "--reason", "r", "--env", "V"], "needs a command after --"),
        (["exec", "api-key", "--reason", "r", "--env", "1BAD", "--", "true"], "not an environment variable"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_usage_exits_2_before_asking(env: dict, live: LiveServer, args: list[str], says: str) -> None:
    result = run_agent(env, *args)
    assert result.returncode == errors.EXIT_USAGE, result.stderr
    assert says in result.stderr and result.stdout == ""
    assert pending_ids(live.settings.data_dir) == []  # nothing was asked


def test_exec_of_a_missing_command_exits_127_before_asking(env: dict, live: LiveServer) -> None:
    result = run_agent(env, "exec", "api-key", "--reason", "r", "--env", "V", "--", "no-such-command-xyz")
    assert result.returncode == errors.EXIT_NOT_FOUND and "no such command" in result.stderr
    assert pending_ids(live.settings.data_dir) == []  # no request spent on a command that cannot run


# -- exec -------------------------------------------------------------------------------------
CHILD = """
import hashlib, os, sys, time
print(hashlib.sha256(os.environ["API_KEY"].encode()).hexdigest(),
      ",".join(sorted(k for k in os.environ if k.startswith("SECRET_PROXY_"))) or "no-proxy-credentials", flush=True)
time.sleep(3)
sys.exit(42)
"""


def everyones_argv() -> dict[int, bytes]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                pass  # gone meanwhile
    return found


def files_holding(value: bytes, roots: list[Path], since: float) -> list[Path]:
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            try:
                if (
                    path.is_file()
                    and not path.is_symlink()
                    and path.stat().st_mtime >= since
                    and path.stat().st_size < 50_000_000
                    and value in path.read_bytes()
                ):
                    hits.append(path)
            except OSError:
                pass
    return hits


@pytest.mark.parametrize("masking", [True, False], ids=["masked", "no-masking"])
@pytest.mark.parametrize("token_in", ["file", "environment"])
def test_exec_puts_the_value_only_in_the_childs_environment(
    tmp_path: Path, live: LiveServer, token_path: Path, proxy_data: Proxy, masking: bool, token_in: str
) -> None:
    # A value of this test's own, so that no other test's files can look like a leak.
    value = "sk-exec-" + os.urandom(16).hex()
    assert cli(live.settings.data_dir, "secrets", "set", "api-exec", stdin=value.encode()).returncode == 0
    started = time.time()
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    credentials = (
        {"SECRET_PROXY_TOKEN": proxy_data.token}
        if token_in == "environment"
        else {"SECRET_PROXY_TOKEN_FILE": str(token_path)}
    )
    env = agent_env(live.url, None, HOME=str(home), TMPDIR=str(work), SECRET_PROXY_MCP_WAIT="30", **credentials)
    agent = subprocess.Popen(
        agent_argv(
            "exec",
            "api-exec",
            "--reason",
            "run the smoke test",
            "--env",
            "API_KEY",
            "--timeout",
            "30",
            *([] if masking else ["--no-masking"]),
            "--",
            sys.executable,
            "-c",
            CHILD,
        ),
        env=env,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert agent.stderr is not None and agent.stdout is not None
    first = agent.stderr.readline().decode()
    decide(live.settings.data_dir, REQUEST_ID_RE.search(first).group(0))

    printed = agent.stdout.readline().decode()  # the child runs now and sleeps
    argvs = everyones_argv()
    out, err = agent.communicate(timeout=30)

    assert agent.returncode == 42, err  # the child's own exit code
    # No SECRET_PROXY_URL, _TOKEN, _TOKEN_FILE: the child cannot ask the proxy for more.
    assert printed.split() == [hashlib.sha256(value.encode()).hexdigest(), "no-proxy-credentials"]
    assert out == b""
    if not masking:
        assert argvs[agent.pid].split(b"\0")[:2] == [sys.executable.encode(), b"-c"]  # the child replaced the agent
    assert [pid for pid, argv in argvs.items() if value.encode() in argv] == []
    assert value.encode() not in first.encode() + err
    scanned = [tmp_path, Path(tempfile.gettempdir()), live.settings.data_dir]
    assert files_holding(value.encode(), scanned, started) == []


def test_exec_runs_nothing_when_denied(env: dict, live: LiveServer, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    agent = start_agent(
        env, "exec", "api-key", "--reason", "r", "--env", "V", "--timeout", "30", "--", "touch", str(marker)
    )
    decide(live.settings.data_dir, request_id_from(agent, []), "deny")
    agent.communicate(timeout=30)
    assert agent.returncode == errors.EXIT_DENIED
    assert not marker.exists()


# -- as a real unprivileged user, with nothing installed --------------------------------------
@pytest.mark.root
def test_the_agent_user_runs_it_with_debians_python_and_nothing_installed(live: LiveServer, proxy_data: Proxy) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as the agent user")
    from scripts.demo import run_as_agent
    from tests.vm_fixtures import ensure_agent_user

    user = ensure_agent_user()
    # Only the package's own files, in a directory the agent can read: no venv, no site-packages.
    with tempfile.TemporaryDirectory(prefix="spvm-agent-tools-") as tmp:
        copy = Path(tmp)
        (copy / "proxy").mkdir()
        shutil.copy(ROOT / "proxy/__init__.py", copy / "proxy")
        shutil.copytree(ROOT / "proxy/agent", copy / "proxy/agent", ignore=shutil.ignore_patterns("__pycache__"))
        token = copy / "token"
        token.write_text(proxy_data.token)
        os.chmod(token, 0o600)
        os.chown(token, user.uid, user.gid)
        for path in [copy, *copy.rglob("*")]:
            if path != token:
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
        approver = decide_when_asked(live.settings.data_dir)
        result = run_as_agent(
            user.name,
            [
                "env",
                f"SECRET_PROXY_URL={live.url}",
                f"SECRET_PROXY_TOKEN_FILE={token}",
                "/usr/bin/python3",
                "-I",
                str(copy / "proxy/agent"),
                "get",
                "api-key",
                "--reason",
                "as the agent user",
                "--timeout",
                "30",
            ],
            timeout=60,
        )
        approver.join(30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SECRET_VALUE
    assert "approved" in result.stderr
