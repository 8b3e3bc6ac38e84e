"""`secret-proxy-agent` (`python -m proxy.agent`): the agent's command for asking for secrets.

get NAME --reason TEXT      ask, wait for a human, print the value once on stdout
exec NAME --reason TEXT --env VAR -- COMMAND...   (or --secret VAR=NAME, repeatable)
                            the same, then run COMMAND with the value in VAR of its environment only,
                            and the value masked in what COMMAND prints (--no-masking: exec it as is)
call NAME --reason TEXT -X METHOD URL [-H 'Name: value'...] [--data @FILE|TEXT] [--fail]
                            ask to use a secret in one call that the proxy makes; the answer's body on
                            stdout, its status and headers on stderr; the value is never seen here
call --id ID                make a call approved earlier (the proxy kept it)
wait ID                     go on waiting for a request: print its value, or make its call
status ID                   one of this agent's requests, as JSON (never a value)
list                        the secrets this agent may ask for, and how each may be used
requests [--status S]       this agent's own requests, newest first
cancel ID                   withdraw a pending request
mcp                         the MCP server over stdio (needs the `mcp` package)

stdout carries the value (or the call's answer) and nothing else; progress, the request id and
errors go to stderr. With --json every command prints one JSON object on stdout instead,
errors included (with the proxy's error code). Exit codes are in errors.py and docs/agent.md.
`--timeout` is a deadline for the whole command (approval.py says how the last step is bounded).
Standard library only, so Debian's python3 runs this with nothing installed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import approval, masked_run
from .config import load_config
from .errors import EXIT_CANNOT_EXECUTE, AgentError, CallFailed, UsageError
from .proxy_http import MAX_REASON_CHARS, REQUEST_ID_RE, SECRET_NAME_RE, STATUSES, ProxyApi

PROG = "secret-proxy-agent"
DEFAULT_TIMEOUT_SECONDS = 600.0  # the proxy's default pending timeout: waiting longer finds it expired
LOOKUP_SECONDS = 30.0  # status, list, requests, cancel: one exchange each


def say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    """The one JSON object of a --json run, on stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Ask the secret proxy for a secret; a human approves "
        "every use. Configure with SECRET_PROXY_URL and SECRET_PROXY_TOKEN_FILE "
        "(or SECRET_PROXY_TOKEN).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout, errors included")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def timed(s: argparse.ArgumentParser) -> None:
        s.add_argument(
            "--timeout",
            type=_seconds,
            default=DEFAULT_TIMEOUT_SECONDS,
            metavar="S",
            help=f"a deadline for the whole command, in seconds (default {DEFAULT_TIMEOUT_SECONDS:g})",
        )

    def asking(name: str, help_text: str, *, name_required: bool = True) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name == "call":  # NAME and URL, or neither (--id): one list, as argparse cannot interleave two optional ones
            s.add_argument("words", metavar="NAME URL", nargs="*", help="the secret's name and the exact URL")
        else:
            s.add_argument(
                "name",
                metavar="NAME",
                nargs=None if name_required else "?",
                help="the secret's name, e.g. openai-api-key",
            )
        s.add_argument(
            "--reason",
            required=name_required,
            help="what you will do with it, where, and why now: the approver reads this",
        )
        timed(s)
        s.add_argument(
            "--ttl",
            type=int,
            metavar="S",
            help="how long an approval stays usable, in seconds (default: the proxy's, 300)",
        )
        return s

    asking("get", "ask for a secret and print its value once on stdout")
    e = asking(
        "exec", "ask for secrets and run COMMAND with each value in one environment variable", name_required=False
    )
    e.add_argument("--env", metavar="VAR", help="the environment variable COMMAND finds NAME's value in")
    e.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="VAR=NAME",
        help="another secret and its variable (repeatable); one approval request per secret",
    )
    e.add_argument("--no-masking", action="store_true", help="do not mask the values in COMMAND's output")
    e.usage = f"{PROG} exec NAME --reason TEXT --env VAR [--secret VAR=NAME]... [--timeout S] -- COMMAND [ARG...]"
    c = asking(
        "call",
        "ask to use a secret in one HTTP call that the proxy makes for you; you get the answer, never the value",
        name_required=False,
    )
    c.add_argument("-X", "--method", default="GET", help="the HTTP method (default GET)")
    c.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'Name: value'",
        help="a header to send (repeatable); the proxy adds the secret's own header itself",
    )
    c.add_argument("--data", metavar="@FILE|TEXT", help="the body: TEXT as is, @FILE read from a file, @- stdin")
    c.add_argument("--id", metavar="ID", help="make the call of an earlier request, once approved (nothing else)")
    c.add_argument("--fail", action="store_true", help="exit 22 when the destination answers HTTP 400 or more")
    c.usage = f"{PROG} call NAME --reason TEXT -X METHOD URL [-H 'Name: value']... [--data @FILE] | call --id ID"
    w = sub.add_parser("wait", help="wait on for a request; print its value, or make its call", parents=[common])
    w.add_argument("id", metavar="ID")
    w.add_argument("--fail", action="store_true", help="(a call) exit 22 when the destination answers HTTP >= 400")
    timed(w)
    s = sub.add_parser("status", help="show one of this agent's requests as JSON", parents=[common])
    s.add_argument("id", metavar="ID")
    sub.add_parser("list", help="the secrets this agent may ask for, and how each may be used", parents=[common])
    r = sub.add_parser("requests", help="this agent's own requests, newest first", parents=[common])
    r.add_argument("--status", choices=STATUSES)
    r.add_argument("--limit", type=int, default=50)
    x = sub.add_parser("cancel", help="withdraw a pending request of this agent", parents=[common])
    x.add_argument("id", metavar="ID")
    sub.add_parser("mcp", help="serve the MCP tools over stdio (needs the mcp package: docs/agent.md)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # exec's COMMAND is everything after the first `--`, taken before argparse sees it (its own
    # remainder handling would swallow exec's options too).
    command: list[str] = []
    if argv[:1] == ["exec"] and "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    p = parser()
    args, extra = p.parse_known_args(argv)
    if args.command == "call" and not any(word.startswith("-") for word in extra):
        args.words += extra  # argparse leaves a URL after options unmatched when NAME may be absent
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    as_json = getattr(args, "json", False)
    try:
        return _run(args, command, time.monotonic() + getattr(args, "timeout", LOOKUP_SECONDS))
    except AgentError as exc:
        if as_json:
            emit(exc.as_json())
        else:
            say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        say(
            "interrupted; a pending request stays open until it expires "
            "(`secret-proxy-agent requests --status pending` lists them)"
        )
        return 130


def _run(args: argparse.Namespace, command: list[str], until: float) -> int:
    if args.command == "mcp":
        return _serve_mcp()
    if args.command == "exec":
        wanted = _exec_secrets(args, command)  # checked before the configuration: usage errors first
        env = masked_run.child_environment(os.environ)
        masked_run.check_command(command, env, list(wanted))
        return _exec(_api(), args, wanted, command, env, until)
    if args.command == "call":
        if args.id is None and len(args.words) != 2:
            raise UsageError("call needs NAME, --reason and URL (or --id ID)", hint=f"{PROG} call --help")
        if args.id is not None and args.words:
            raise UsageError("call --id takes no NAME or URL", hint="the proxy kept the call when it was asked")
        args.name, args.url = args.words or (None, None)
    if args.command in ("get", "call") and args.name is not None:
        _check_asking(args)
    api = _api()
    if args.command == "status":
        emit(api.status(_checked_id(args.id), until))
        return 0
    if args.command == "list":
        return _list(api, args, until)
    if args.command == "requests":
        return _requests(api, args, until)
    if args.command == "cancel":
        return _cancel(api, args, until)
    if args.command == "wait":
        return _finish(api, _checked_id(args.id), args, until)
    if args.command == "call":
        return _call(api, args, until)
    request_id = _ask(api, args, until)
    return _finish(api, request_id, args, until)


def _api() -> ProxyApi:
    config = load_config()
    return ProxyApi(config.url, config.token)


def _checked_id(request_id: str) -> str:
    if not REQUEST_ID_RE.match(request_id):
        raise UsageError(f"not a request id: {request_id!r}", hint="pass the req_... id the proxy gave you")
    return request_id


def _check_asking(args: argparse.Namespace) -> None:
    if not SECRET_NAME_RE.fullmatch(args.name):
        raise UsageError(f"not a secret name: {args.name!r}", hint="names are [A-Za-z0-9_.-], 1-128 characters")
    if args.reason is None or not args.reason.strip() or len(args.reason) > MAX_REASON_CHARS:
        raise UsageError(
            f"--reason must be 1-{MAX_REASON_CHARS} characters",
            hint="say what you will do with the secret, where, and why now",
        )


def _ask(api: ProxyApi, args: argparse.Namespace, until: float, name: str | None = None) -> str:
    name = name or args.name
    request_id = approval.ask(api, name, args.reason, until, args.ttl)
    say(f"asked for {name!r}: request {request_id}; waiting up to {_left(until)} for a human to decide")
    return request_id


def _left(until: float) -> str:
    return f"{max(0.0, until - time.monotonic()):.0f} s"


def _finish(api: ProxyApi, request_id: str, args: argparse.Namespace, until: float) -> int:
    """Wait for a decision on `request_id`, then print its value, or make its call and print the answer."""
    view = approval.wait_for_decision(api, request_id, until, progress=say)
    if approval.is_call(view):
        return _print_answer(api, view, args, until)
    value = approval.value_of_decided(api, view, until)
    say(f"request {request_id} approved by {view.get('decided_by') or 'an approver'}; value retrieved")
    if args.json:
        emit({"status": "approved", "id": request_id, "secret": view.get("secret"), "value": value})
        return 0
    # A terminal gets a newline after the value; a pipe or $(...) gets the value exactly.
    sys.stdout.write(value + ("\n" if sys.stdout.isatty() else ""))
    sys.stdout.flush()
    return 0


def _call(api: ProxyApi, args: argparse.Namespace, until: float) -> int:
    if args.id is not None:
        return _finish(api, _checked_id(args.id), args, until)
    call = call_spec(args.method, args.url, args.header, args.data)
    request_id = approval.ask_call(api, args.name, args.reason, call, until, args.ttl)
    say(
        f"asked to use {args.name!r} in {call['method']} {call['url']}: request {request_id}; waiting up to "
        f"{_left(until)} for a human to decide"
    )
    return _finish(api, request_id, args, until)


def _print_answer(api: ProxyApi, view: dict[str, Any], args: argparse.Namespace, until: float) -> int:
    request_id = str(view.get("id"))
    answer = approval.call_of_decided(api, view, until, progress=say)
    status = answer.get("status")
    say(f"request {request_id} approved; the proxy made the call: HTTP {status}")
    raw = base64.b64decode(answer.get("body_base64", ""))
    failed = getattr(args, "fail", False) and isinstance(status, int) and status >= 400
    if args.json:
        emit(
            {
                "id": request_id,
                **approval.call_result(answer),
                **({"exit_code": CallFailed.exit_code} if failed else {}),
            }
        )
    else:
        for name, value in answer.get("headers", []):
            say(f"  {name}: {value}")
        if answer.get("redactions"):
            say(f"  ({answer['redactions']} occurrence(s) of the secret were removed from the answer)")
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
    if failed:
        if not args.json:
            say(
                f"error: the destination answered HTTP {status} (request {request_id}); "
                f"--fail exits {CallFailed.exit_code}"
            )
        return CallFailed.exit_code
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


def _exec_secrets(args: argparse.Namespace, command: list[str]) -> dict[str, str]:
    """{VAR: NAME} for every secret exec is to put in COMMAND's environment; usage checked before asking."""
    if not command:
        raise UsageError(
            "exec needs a command after --", hint=f"{PROG} exec NAME --reason TEXT --env VAR -- COMMAND [ARG...]"
        )
    wanted: dict[str, str] = {}
    if args.name is not None:
        if args.env is None:
            raise UsageError("exec NAME needs --env VAR", hint="say which environment variable gets the value")
        wanted[args.env] = args.name
    elif args.env is not None:
        raise UsageError("--env VAR needs a NAME", hint=f"{PROG} exec NAME --env VAR ... or --secret VAR=NAME")
    for pair in args.secret:
        var, sep, name = pair.partition("=")
        if not sep or var in wanted:
            raise UsageError(f"not VAR=NAME, or VAR given twice: {pair!r}", hint="write --secret API_KEY=api-key")
        wanted[var] = name
    if not wanted:
        raise UsageError("exec needs a secret", hint="give NAME --env VAR, or --secret VAR=NAME")
    for var, name in wanted.items():
        if not masked_run.ENV_VAR_RE.fullmatch(var):
            raise UsageError(f"not an environment variable name: {var!r}", hint="use letters, digits and _")
        args.name = name
        _check_asking(args)
    return wanted


def _exec(
    api: ProxyApi,
    args: argparse.Namespace,
    wanted: dict[str, str],
    command: list[str],
    env: dict[str, str],
    until: float,
) -> int:
    """Ask for every secret (one request each, all at once), wait for all, then run COMMAND with them.

    Nothing is retrieved until every request is approved: a denial leaves no value anywhere, and
    the requests still pending are withdrawn."""
    ids: dict[str, str] = {}
    views: dict[str, dict[str, Any]] = {}
    try:
        for var, name in wanted.items():
            ids[var] = _ask(api, args, until, name)
        for var, request_id in ids.items():
            views[var] = approval.wait_for_decision(api, request_id, until, progress=say)
            refusal = approval.refusal_of_decided(views[var])
            if refusal is not None:
                raise refusal
    except AgentError:
        _withdraw(api, [rid for var, rid in ids.items() if var not in views], until)
        raise
    values = {var: approval.value_of_decided(api, views[var], until) for var in ids}
    say(f"{len(values)} value(s) retrieved: {', '.join(ids.values())}; running {command[0]!r}")
    masked_run.check_values(values)
    env.update(values)
    sys.stdout.flush()
    sys.stderr.flush()
    if args.no_masking:
        try:
            os.execvpe(command[0], command, env)  # no process but COMMAND holds the values
        except OSError as exc:  # raced away since the check, or not executable
            say(f"error: cannot run {command[0]!r}: {exc.strerror}")
            return EXIT_CANNOT_EXECUTE
    try:
        return masked_run.run_masked(command, env, list(values.values()), sys.stdout.buffer, sys.stderr.buffer)
    except OSError as exc:
        say(f"error: cannot run {command[0]!r}: {exc.strerror}")
        return EXIT_CANNOT_EXECUTE


def _withdraw(api: ProxyApi, request_ids: list[str], until: float) -> None:
    """Best effort: cancel requests nobody will use (exec gave up on its other secrets)."""
    for request_id in request_ids:
        try:
            api.cancel(request_id, approval.step_until(until))
            say(f"withdrew request {request_id}")
        except AgentError:
            pass


def _list(api: ProxyApi, args: argparse.Namespace, until: float) -> int:
    secrets = api.secrets(until)
    if args.json:
        emit({"secrets": secrets})
        return 0
    for s in secrets:
        uses = []
        if s.get("retrieve"):
            uses.append("get/exec")
        if s.get("call"):
            inject = s.get("inject") or {}
            uses.append(
                f"call (into {inject.get('kind')} {inject.get('name')}) to {', '.join(s.get('destinations', []))}"
            )
        print(f"{s.get('name')}\t{'; '.join(uses) or 'no use'}{'' if s.get('retrieve') else ' (broker-only)'}")
    if not secrets:
        say("this agent's scope covers no stored secret; ask the operator")
    return 0


def _requests(api: ProxyApi, args: argparse.Namespace, until: float) -> int:
    found = api.requests(until, args.status, args.limit)
    if args.json:
        emit({"requests": found})
        return 0
    for r in found:
        call = r.get("call")
        what = f"call {call.get('method')} {call.get('url')}" if isinstance(call, dict) else "get"
        print(f"{r.get('id')}\t{r.get('status')}\t{r.get('secret')}\t{what}\t{r.get('created_at')}")
    return 0


def _cancel(api: ProxyApi, args: argparse.Namespace, until: float) -> int:
    request_id = _checked_id(args.id)
    after = api.cancel(request_id, until)
    if args.json:
        emit(after)
    elif after.get("cancelled"):
        say(f"request {request_id} cancelled")
    else:
        say(f"request {request_id} is {after.get('status')}, not pending: left as it is")
    return 0


def _serve_mcp() -> int:
    try:
        from .mcp_server import serve
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "mcp":
            raise UsageError(
                "the MCP server needs the `mcp` package, which is not installed",
                hint="install it next to this tool: pip install 'mcp>=2.3,<3' (docs/agent.md)",
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
