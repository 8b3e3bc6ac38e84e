"""`secret-proxy-agent` (`python -m proxy.agent`): the agent's command for asking for secrets.

get NAME --reason TEXT      ask, wait for a human, print the value once on stdout
exec NAME --reason TEXT --env VAR -- COMMAND...
                            the same, then run COMMAND with the value in VAR of its environment only
call NAME --reason TEXT -X METHOD URL [-H 'Name: value'...] [--data @FILE|TEXT]
                            ask to use a secret in one call that the proxy makes; the answer's body on
                            stdout, its status and headers on stderr; the value is never seen here
wait ID                     go on waiting for a request that `get` gave up on; the value on stdout
status ID                   one of this agent's requests, as JSON (never a value)
mcp                         the MCP server over stdio (needs the `agent` extra)

stdout carries the value and nothing else; progress, the request id and errors
go to stderr. Exit codes are in errors.py and docs/agent.md. Standard library
only, so Debian's python3 runs this with nothing installed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from . import approval
from .config import load_config
from .errors import EXIT_CANNOT_EXECUTE, AgentError, CommandNotFound, UsageError
from .proxy_http import ProxyApi

PROG = "secret-proxy-agent"
DEFAULT_TIMEOUT_SECONDS = 600.0  # the proxy's default pending timeout: waiting longer finds it expired
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # the API's secret names (docs/api.md)
MAX_REASON_CHARS = 1000
ENV_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Never handed on to exec's COMMAND: it gets the one value it asked for, not the power to ask for more.
WITHHELD_FROM_CHILD = ("SECRET_PROXY_TOKEN",)


def say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Ask the secret proxy for a secret; a human approves "
        "every use. Configure with SECRET_PROXY_URL and SECRET_PROXY_TOKEN_FILE "
        "(or SECRET_PROXY_TOKEN).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def asking(name: str, help_text: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("name", metavar="NAME", help="the secret's name, e.g. openai-api-key")
        s.add_argument(
            "--reason", required=True, help="what you will do with it, where, and why now: the approver reads this"
        )
        s.add_argument(
            "--timeout",
            type=_seconds,
            default=DEFAULT_TIMEOUT_SECONDS,
            metavar="S",
            help=f"seconds to wait for a decision (default {DEFAULT_TIMEOUT_SECONDS:g})",
        )
        return s

    asking("get", "ask for a secret and print its value once on stdout")
    e = asking("exec", "ask for a secret and run COMMAND with the value in one environment variable")
    e.add_argument("--env", required=True, metavar="VAR", help="the environment variable COMMAND finds it in")
    e.usage = f"{PROG} exec NAME --reason TEXT --env VAR [--timeout S] -- COMMAND [ARG...]"
    c = asking(
        "call", "ask to use a secret in one HTTP call that the proxy makes for you; you get the answer, never the value"
    )
    c.add_argument("-X", "--method", default="GET", help="the HTTP method (default GET)")
    c.add_argument("url", metavar="URL", help="the exact URL, e.g. https://api.example.com/v1/items")
    c.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'Name: value'",
        help="a header to send (repeatable); the proxy adds the secret's own header itself",
    )
    c.add_argument("--data", metavar="@FILE|TEXT", help="the body: TEXT as is, @FILE read from a file, @- stdin")
    c.usage = f"{PROG} call NAME --reason TEXT -X METHOD URL [-H 'Name: value']... [--data @FILE]"
    w = sub.add_parser("wait", help="wait on for a request that `get` stopped waiting for; print its value")
    w.add_argument("id", metavar="ID")
    w.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_SECONDS, metavar="S")
    s = sub.add_parser("status", help="show one of this agent's requests as JSON")
    s.add_argument("id", metavar="ID")
    sub.add_parser("mcp", help="serve the MCP tools over stdio (needs: pip install 'secret-proxy-vm[agent]')")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # exec's COMMAND is everything after the first `--`, taken before argparse sees it (its own
    # remainder handling would swallow exec's options too).
    command: list[str] = []
    if argv[:1] == ["exec"] and "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    args = parser().parse_args(argv)
    try:
        if args.command == "mcp":
            return _serve_mcp()
        api = _api()
        if args.command == "status":
            print(json.dumps(api.status(args.id), sort_keys=True))
            return 0
        if args.command == "wait":
            return _print_value(api, args.id, args.timeout)
        _check_asking(args)
        if args.command == "call":
            return _call(api, args)
        if args.command == "get":
            request_id = _ask(api, args.name, args.reason, args.timeout)
            return _print_value(api, request_id, args.timeout)
        env = _prepare_exec(command, args.env)
        request_id = _ask(api, args.name, args.reason, args.timeout)
        value = _decided_value(api, request_id, args.timeout)
        return _exec(command, env, args.env, value)
    except AgentError as exc:
        say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        say("interrupted; a pending request stays open until it expires")
        return 130


def _api() -> ProxyApi:
    config = load_config()
    return ProxyApi(config.url, config.token)


def _check_asking(args: argparse.Namespace) -> None:
    if not NAME_RE.fullmatch(args.name):
        raise UsageError(f"not a secret name: {args.name!r}", hint="names are [A-Za-z0-9_.-], 1-128 characters")
    if not args.reason.strip() or len(args.reason) > MAX_REASON_CHARS:
        raise UsageError(
            f"--reason must be 1-{MAX_REASON_CHARS} characters",
            hint="say what you will do with the secret, where, and why now",
        )


def _ask(api: ProxyApi, name: str, reason: str, timeout: float) -> str:
    request_id = approval.ask(api, name, reason)
    say(f"asked for {name!r}: request {request_id}; waiting up to {timeout:g} s for a human to decide")
    return request_id


def _decided_value(api: ProxyApi, request_id: str, timeout: float) -> str:
    view = approval.wait_for_decision(api, request_id, timeout, progress=say)
    value = approval.value_of_decided(api, view)
    say(f"request {request_id} approved by {view.get('decided_by') or 'an approver'}; value retrieved")
    return value


def _print_value(api: ProxyApi, request_id: str, timeout: float) -> int:
    value = _decided_value(api, request_id, timeout)
    # A terminal gets a newline after the value; a pipe or $(...) gets the value exactly.
    sys.stdout.write(value + ("\n" if sys.stdout.isatty() else ""))
    sys.stdout.flush()
    return 0


def _call(api: ProxyApi, args: argparse.Namespace) -> int:
    call = call_spec(args.method, args.url, args.header, args.data)
    request_id = approval.ask_call(api, args.name, args.reason, call)
    say(
        f"asked to use {args.name!r} in {call['method']} {call['url']}: request {request_id}; waiting up to "
        f"{args.timeout:g} s for a human to decide"
    )
    view = approval.wait_for_decision(api, request_id, args.timeout, progress=say)
    answer = approval.call_of_decided(api, view, call)
    say(f"request {request_id} approved; the proxy made the call: HTTP {answer.get('status')}")
    for name, value in answer.get("headers", []):
        say(f"  {name}: {value}")
    if answer.get("redactions"):
        say(f"  ({answer['redactions']} occurrence(s) of the secret were removed from the answer)")
    sys.stdout.buffer.write(base64.b64decode(answer.get("body_base64", "")))
    sys.stdout.flush()
    return 0


def call_spec(method: str, url: str, headers: list[str], data: str | None) -> dict[str, Any]:
    """The call as the API takes it, from curl-like arguments; every mistake caught before asking."""
    parsed: dict[str, str] = {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"not a header: {header!r}", hint="write -H 'Name: value'")
        parsed[name.strip()] = value.strip()
    body = b""
    if data is not None:
        if data == "@-":
            body = sys.stdin.buffer.read()
        elif data.startswith("@"):
            try:
                with open(data[1:], "rb") as f:
                    body = f.read()
            except OSError as exc:
                raise UsageError(f"cannot read {data[1:]!r}: {exc.strerror}", hint="check the file after @") from None
        else:
            body = data.encode()
    return {"method": method.upper(), "url": url, "headers": parsed, "body_base64": base64.b64encode(body).decode()}


def _prepare_exec(command: list[str], var: str) -> dict[str, str]:
    """COMMAND's environment, all checked before asking: a value once retrieved cannot be had again."""
    if not command:
        raise UsageError(
            "exec needs a command after --", hint=f"{PROG} exec NAME --reason TEXT --env VAR -- COMMAND [ARG...]"
        )
    if not ENV_VAR_RE.fullmatch(var):
        raise UsageError(f"not an environment variable name: {var!r}", hint="use letters, digits and _")
    env = {k: v for k, v in os.environ.items() if k not in WITHHELD_FROM_CHILD}
    if shutil.which(command[0], path=env.get("PATH", os.defpath)) is None:
        raise CommandNotFound(f"no such command: {command[0]!r}", hint="check COMMAND (searched on PATH)")
    return env


def _exec(command: list[str], env: dict[str, str], var: str, value: str) -> int:
    """Replaces this process with COMMAND, so its exit code is ours and no process holds the value but it."""
    if "\0" in value:
        raise UsageError(
            "the value holds a NUL byte, which no environment variable can carry",
            hint=f"use `{PROG} get` and pass it on stdin instead",
        )
    env[var] = value
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:  # raced away since the check, or not executable
        say(f"error: cannot run {command[0]!r}: {exc.strerror}")
        return EXIT_CANNOT_EXECUTE
    return EXIT_CANNOT_EXECUTE  # not reached: execvpe returns only by raising


def _serve_mcp() -> int:
    try:
        from .mcp_server import serve
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "mcp":
            raise UsageError(
                "the MCP server needs the `mcp` package, which is not installed",
                hint="pip install 'secret-proxy-vm[agent]' (or uv sync --extra agent)",
            ) from None
        raise
    return serve(load_config())


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"not a number of seconds from 0 to 86400: {raw!r}")
    return value
