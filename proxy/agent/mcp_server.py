"""`python -m proxy.agent mcp`: the agent tools over the Model Context Protocol (stdio).

What reaches the model's context is the point of this module. By default no secret value does:
`run_with_secret` runs a command with the value in an environment variable and returns its
output with the value masked (masked_run.py), and `use_secret_in_call` has the proxy make one
HTTP call and returns the answer with the value redacted. `request_secret`, which returns a
value itself, exists only when whoever configures the server sets
SECRET_PROXY_MCP_RETURN_VALUES=1: an MCP client keeps tool results in its transcripts.

Every tool is bounded in time so that an MCP client's call timeout never cuts a decision off:
it waits up to SECRET_PROXY_MCP_WAIT seconds, then answers `pending` with the request id. The
server keeps nothing between calls: `wait_for_decision(id)` finds out from the proxy whether a
request is a call (then the proxy makes it, by id) or a retrieval, so a restarted server, or a
429 or a dropped connection on the way, loses no approval. Refusals come back as tool errors
whose text names the request id when there is one and says what to do.
"""

from __future__ import annotations

import base64
import os
import shlex
import time
from collections.abc import Callable
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from . import approval, masked_run
from .config import AgentConfig
from .errors import AgentError, Denied, Expired, TimedOut, UsageError
from .proxy_http import MAX_REASON_CHARS, ProxyApi

MAX_OUTPUT_BYTES = 64 * 1024  # of each of stdout and stderr, returned to the model
DEFAULT_RUN_SECONDS = 120.0
MAX_RUN_SECONDS = 600.0
LOOKUP_SECONDS = 30.0

INSTRUCTIONS = """\
Secrets (API keys, passwords, tokens) are kept by a secret proxy. A human approves every single use:
each request sends your reason to a person, who approves or denies it, usually within minutes.
Ask only for a secret you need now, once per task, and write a reason the person can judge at a glance.
Use list_secrets to see which secrets you may ask for and how each may be used. You never need to see a
value: run_with_secret runs a command with it in an environment variable, use_secret_in_call has the proxy
make an HTTP call with it."""

REASON_GUIDE = """\
Write `reason` for the human who decides: what you will do with the secret, where, and why now,
in one or two plain sentences, e.g. "Deploy web-api to staging: push the image to ghcr.io/acme/web-api
for issue #42". Never vague ("need it", "for the task"), never the value of anything."""

NAME_HELP = "the secret's name as the operator stored it, e.g. openai-api-key ([A-Za-z0-9_.-], at most 128)"
ID_HELP = "the request id (req_...) that an earlier tool call returned"
PENDING = "no human has decided yet; call wait_for_decision with this id (do not ask again)"

LIST_SECRETS = """\
List the secrets you may ask for, and how each may be used: `retrieve` (run_with_secret), `call` (use_secret_in_call,
only to the listed `destinations`; `inject` says where the proxy puts it). Never returns a value."""

LIST_REQUESTS = """\
List your own requests, newest first, with their status (pending, approved, denied, expired, retrieved, used,
cancelled). Use it to find a request id you lost instead of asking again."""

CANCEL_REQUEST = """\
Withdraw one of your pending requests (you no longer need it): the human is told and cannot approve it any more.
A request that is no longer pending is left as it is (`cancelled` false)."""

RUN_WITH_SECRET = f"""\
Run a command with a secret in one environment variable, after a human approves. You never see the value: the
command's stdout and stderr come back with every occurrence of it replaced by <concealed by secret-proxy>.
`command` is an argv list (e.g. ["gh", "release", "create", "v1.2"]; use ["sh", "-c", "..."] for a shell line, and
refer to the variable there as "$VAR"). Returns {{"status": "done", "exit_code", "stdout", "stderr"}}, "denied",
"expired", or {{"status": "pending", "id"}}: then call run_with_secret again with the same arguments and that
`id` (or wait_for_decision first); never a new request for the same purpose.
{REASON_GUIDE}"""

WAIT_FOR_DECISION = """\
Wait for a human's decision on a request a tool answered with status "pending" (pass its id), and finish it:
for a call request (use_secret_in_call) the proxy makes the approved call and you get its answer; for a
retrieval you get "approved" (then run run_with_secret with that id). Also returns denied, expired, or still
pending (call again). Do not create a new request while one is pending: the human would have to decide twice."""

REQUEST_SECRET = f"""\
Ask for a secret by name and get its VALUE into this conversation (prefer run_with_secret, which keeps it out).
A human approves every use: your reason is shown to them. Returns {{"status": "approved", "value": ...}} when
approved (once: keep it in memory for this task, never write it into files, logs or messages), "denied" (do not
ask again for the same purpose unless they tell you to), or {{"status": "pending", "id"}}: call wait_for_decision.
{REASON_GUIDE}"""

USE_SECRET_IN_CALL = f"""\
Use a secret in one HTTP call that the secret proxy makes for you: you never see the value. The proxy puts the
secret into the call the way the operator configured (e.g. an Authorization header), only toward destinations
the operator listed (list_secrets). A human approves this exact call (method, URL, headers, body) once; a
different call needs a new approval. Returns {{"status": "done", "http_status", "headers", "body"}} (any
occurrence of the secret in the answer is redacted), "denied", or {{"status": "pending", "id"}}: then call
wait_for_decision with that id, which makes the approved call.
Do not put an Authorization header in `headers`: the proxy adds it. `body` is text (e.g. JSON), or "" for none.
{REASON_GUIDE}"""


def build_server(config: AgentConfig) -> MCPServer:
    api = ProxyApi(config.url, config.token)
    server = MCPServer("secret-proxy", instructions=INSTRUCTIONS)

    def deadline() -> float:
        return time.monotonic() + config.mcp_wait_seconds

    def lookup() -> float:  # one exchange, no waiting for a human
        return time.monotonic() + LOOKUP_SECONDS

    # Sync tools: the SDK runs them in a worker thread, so a held long poll never blocks the session.
    @server.tool(description=LIST_SECRETS)
    def list_secrets() -> dict[str, Any]:
        return _answer(lambda: {"secrets": api.secrets(lookup())})

    @server.tool(description=LIST_REQUESTS)
    def list_requests(
        status: Annotated[str | None, Field(description="only requests with this status, e.g. pending")] = None,
    ) -> dict[str, Any]:
        return _answer(lambda: {"requests": api.requests(lookup(), status)})

    @server.tool(description=CANCEL_REQUEST)
    def cancel_request(id: Annotated[str, Field(description=ID_HELP)]) -> dict[str, Any]:  # noqa: A002
        return _answer(lambda: api.cancel(id, lookup()))

    @server.tool(description=WAIT_FOR_DECISION)
    def wait_for_decision(id: Annotated[str, Field(description=ID_HELP)]) -> dict[str, Any]:  # noqa: A002 - the model's name
        def finish() -> dict[str, Any]:
            until = deadline()
            view = approval.wait_for_decision(api, id, until)
            if approval.is_call(view):
                return {"id": id, **approval.call_result(approval.call_of_decided(api, view, until))}
            if config.mcp_return_values:
                return _value(api, view, until)
            refusal = approval.refusal_of_decided(view)
            if refusal is not None:
                raise refusal
            return {
                "status": "approved",
                "id": id,
                "secret": view.get("secret"),
                "what_to_do": "call run_with_secret with this id to use it",
            }

        return _outcome(finish)

    @server.tool(description=RUN_WITH_SECRET)
    def run_with_secret(
        name: Annotated[str, Field(description=NAME_HELP)],
        reason: Annotated[str, Field(description=REASON_GUIDE)],
        env_var: Annotated[str, Field(description="the environment variable the command finds the value in")],
        command: Annotated[list[str], Field(description="the command and its arguments (argv)")],
        cwd: Annotated[str | None, Field(description="the working directory (default: the server's)")] = None,
        timeout_seconds: Annotated[
            float, Field(description=f"kill the command after this long (at most {MAX_RUN_SECONDS:g})")
        ] = DEFAULT_RUN_SECONDS,
        id: Annotated[  # noqa: A002
            str | None, Field(description="the id of an earlier run_with_secret that answered pending")
        ] = None,
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            env = masked_run.child_environment(os.environ)
            masked_run.check_command(command, env, [env_var])
            until = deadline()
            request_id = id or approval.ask(api, name, reason_with_command(reason, command), until)
            view = approval.wait_for_decision(api, request_id, until)
            if view.get("secret") != name or approval.is_call(view):
                raise UsageError(
                    f"request {request_id} is not a retrieval of {name!r}",
                    hint="pass the id that run_with_secret returned for this secret, or no id",
                )
            value = approval.value_of_decided(api, view, until)
            masked_run.check_values({env_var: value})
            out, err = (
                masked_run.Capped(MAX_OUTPUT_BYTES, bytearray()),
                masked_run.Capped(MAX_OUTPUT_BYTES, bytearray()),
            )
            code = masked_run.run_masked(
                command,
                {**env, env_var: value},
                [value],
                out,
                err,
                timeout=min(max(1.0, timeout_seconds), MAX_RUN_SECONDS),
                stdin_null=True,
                cwd=cwd,
            )
            del value
            return {
                "status": "done",
                "id": request_id,
                "exit_code": code,
                "stdout": out.data.decode(errors="replace"),
                "stderr": err.data.decode(errors="replace"),
                **({"stdout_bytes_dropped": out.dropped} if out.dropped else {}),
                **({"stderr_bytes_dropped": err.dropped} if err.dropped else {}),
                **({"what_to_do": "the command ran out of time and was killed"} if code == 124 else {}),
            }

        return _outcome(run, pending_hint="call run_with_secret again with the same arguments and this id")

    @server.tool(description=USE_SECRET_IN_CALL)
    def use_secret_in_call(
        name: Annotated[str, Field(description=NAME_HELP)],
        reason: Annotated[str, Field(description=REASON_GUIDE)],
        method: Annotated[str, Field(description="GET, POST, PUT, PATCH, DELETE, HEAD")],
        url: Annotated[str, Field(description="the exact https URL, query string included")],
        headers: Annotated[dict[str, str] | None, Field(description="headers to send")] = None,
        body: Annotated[str, Field(description="the request body as text; empty for none")] = "",
    ) -> dict[str, Any]:
        call = {
            "method": method.upper(),
            "url": url,
            "headers": headers or {},
            "body_base64": base64.b64encode(body.encode()).decode(),
        }

        def make() -> dict[str, Any]:
            until = deadline()
            request_id = approval.ask_call(api, name, reason, call, until)
            view = approval.wait_for_decision(api, request_id, until)
            return {"id": request_id, **approval.call_result(approval.call_of_decided(api, view, until))}

        return _outcome(make)

    if config.mcp_return_values:

        @server.tool(description=REQUEST_SECRET)
        def request_secret(
            name: Annotated[str, Field(description=NAME_HELP)],
            reason: Annotated[str, Field(description=REASON_GUIDE)],
        ) -> dict[str, Any]:
            def get() -> dict[str, Any]:
                until = deadline()
                request_id = approval.ask(api, name, reason, until)
                return _value(api, approval.wait_for_decision(api, request_id, until), until)

            return _outcome(get)

    return server


def reason_with_command(reason: str, command: list[str]) -> str:
    """The reason the approver reads, with the command the value will be given to (cut to the API's limit)."""
    shown = f"\n[run_with_secret runs: {shlex.join(command)}]"
    if len(reason) + len(shown) > MAX_REASON_CHARS:
        room = MAX_REASON_CHARS - len(reason) - len("\n[run_with_secret runs: …]")
        shown = f"\n[run_with_secret runs: {shlex.join(command)[: max(0, room)]}…]" if room > 20 else ""
    return reason + shown


def _value(api: ProxyApi, view: dict[str, Any], until: float) -> dict[str, Any]:
    value = approval.value_of_decided(api, view, until)
    return {"status": "approved", "id": view.get("id"), "secret": view.get("secret"), "value": value}


def _answer(look: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return look()
    except AgentError as exc:
        raise ToolError(str(exc)) from None


def _outcome(finish: Callable[[], dict[str, Any]], pending_hint: str = PENDING) -> dict[str, Any]:
    """What a tool returns: the result, or the decision that stops it, or pending; refusals become tool
    errors (AgentError's text, which names the request id once there is one)."""
    try:
        return finish()
    except TimedOut as exc:
        if exc.request_id is None:
            raise ToolError(str(exc)) from None
        return {"status": "pending", "id": exc.request_id, "what_to_do": pending_hint}
    except Denied as exc:
        return {"status": "denied", "id": exc.request_id, "what_to_do": Denied.hint}
    except Expired as exc:
        return {"status": "expired", "id": exc.request_id, "detail": exc.message, "what_to_do": exc.hint}
    except AgentError as exc:
        raise ToolError(str(exc)) from None  # an isError result with this text, for the model to act on


def serve(config: AgentConfig) -> int:
    build_server(config).run("stdio")
    return 0
