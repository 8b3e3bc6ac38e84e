"""`secret-proxy-agent exec` as people use `op run`: the value masked in what the command prints, several
secrets in one run, `--ttl`; against a real `proxy serve`, every approval the operator CLI's."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from proxy.agent import errors
from proxy.agent.masked_run import MASK, Masker
from tests.agent_helpers import (
    agent_env,
    approve_each_when_asked,
    decide,
    decide_when_asked,
    pending_ids,
    request_id_from,
    run_agent,
    start_agent,
    token_file,
)
from tests.proxy_helpers import SECRET_VALUE, LiveServer, Proxy, cli

# Prints the value whole on stdout, and on stderr in two writes with a pause between: a mask must hold
# back the first half until it knows what follows.
ECHO = """
import os, sys, time
v = os.environ["API_KEY"]
print("key is", v, flush=True)
sys.stderr.write("half " + v[:10]); sys.stderr.flush(); time.sleep(0.3)
sys.stderr.write(v[10:] + " done\\n"); sys.stderr.flush()
sys.exit(3)
"""


@pytest.fixture
def env(live: LiveServer, proxy_data: Proxy, tmp_path: Path) -> dict[str, str]:
    return agent_env(live.url, token_file(tmp_path, proxy_data.token))


def test_exec_masks_the_value_in_the_commands_output_and_keeps_its_exit_code(env: dict, live: LiveServer) -> None:
    approver = decide_when_asked(live.settings.data_dir)
    result = run_agent(
        env, "exec", "api-key", "--reason", "smoke test", "--env", "API_KEY", "--", sys.executable, "-c", ECHO
    )
    approver.join(5)
    assert result.returncode == 3, result.stderr  # the command's own code (3 is also "denied": stderr tells)
    assert SECRET_VALUE not in result.stdout + result.stderr
    assert result.stdout == f"key is {MASK.decode()}\n"
    assert f"half {MASK.decode()} done" in result.stderr


def test_exec_no_masking_hands_the_output_on_as_is(env: dict, live: LiveServer) -> None:
    approver = decide_when_asked(live.settings.data_dir)
    result = run_agent(
        env,
        "exec",
        "api-key",
        "--reason",
        "debug the deploy script",
        "--env",
        "API_KEY",
        "--no-masking",
        "--",
        sys.executable,
        "-c",
        ECHO,
    )
    approver.join(5)
    assert result.returncode == 3 and result.stdout == f"key is {SECRET_VALUE}\n"


def test_exec_puts_several_secrets_in_one_run_one_approval_each(env: dict, live: LiveServer) -> None:
    assert cli(live.settings.data_dir, "secrets", "set", "api-second", stdin=b"second-value-123").returncode == 0
    approver = approve_each_when_asked(live.settings.data_dir, 2)
    child = f"import os; print(os.environ['A'] == {SECRET_VALUE!r}, os.environ['B'] == 'second-value-123')"
    result = run_agent(
        env,
        "exec",
        "--secret",
        "A=api-key",
        "--secret",
        "B=api-second",
        "--reason",
        "migrate the database",
        "--",
        sys.executable,
        "-c",
        child,
    )
    approver.join(5)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True True\n"
    assert result.stderr.count("request req_") >= 2  # one request per secret, each named


def test_exec_withdraws_its_other_requests_when_one_is_denied(env: dict, live: LiveServer) -> None:
    assert cli(live.settings.data_dir, "secrets", "set", "api-second", stdin=b"second-value-123").returncode == 0
    agent = start_agent(env, "exec", "--secret", "A=api-key", "--secret", "B=api-second", "--reason", "r", "--", "true")
    first = request_id_from(agent, [])
    decide(live.settings.data_dir, first, "deny")
    _, err = agent.communicate(timeout=30)
    assert agent.returncode == errors.EXIT_DENIED, err
    assert "withdrew request" in err and pending_ids(live.settings.data_dir) == []


def test_ttl_sets_how_long_the_approval_stays_usable(env: dict, live: LiveServer) -> None:
    timed_out = run_agent(env, "get", "api-key", "--reason", "r", "--ttl", "1", "--timeout", "0", "--json")
    error = json.loads(timed_out.stdout)
    assert timed_out.returncode == errors.EXIT_TIMED_OUT and error["error"] == "timed_out"
    decide(live.settings.data_dir, error["id"])
    time.sleep(1.5)  # longer than --ttl 1: the approval has lapsed
    late = run_agent(env, "wait", error["id"], "--json")
    assert late.returncode == errors.EXIT_EXPIRED and json.loads(late.stdout)["error"] == "expired"


def test_the_mask_holds_back_only_what_may_be_the_start_of_a_value() -> None:
    masker = Masker([b"secret-value"])
    assert masker.feed(b"plain text ") == b"plain text "  # nothing held: nothing of it starts the value
    assert masker.feed(b"then secr") == b"then "  # "secr" may be the start
    assert masker.feed(b"et-value and secrets") == MASK + b" and secret"  # the last "s" may start it again
    assert masker.feed(b"; secret-") == b"s; "
    assert masker.flush() == b"secret-"  # the end of the output: what was held goes out as it is
