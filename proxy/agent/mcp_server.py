"""`python -m proxy.agent mcp`: the agent tools over the Model Context Protocol (stdio).

Two tools, each bounded in time so that an MCP client's call timeout never cuts
a decision off: `request_secret` asks and waits up to SECRET_PROXY_MCP_WAIT
seconds; if no human has decided by then it answers `pending` with the request
id, and `wait_for_decision` waits again. A value is returned only for an
approved request (retrieved then, once); refusals come back as tool errors
that say what to do. `use_secret_in_call` asks to use a secret in one exact HTTP call that
the proxy makes: the model gets the answer, never the value; a call still pending is
remembered here, so `wait_for_decision` on its id makes the call once approved.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from . import approval
from .config import AgentConfig
from .errors import AgentError, Denied, Expired, TimedOut
from .proxy_http import ProxyApi

INSTRUCTIONS = """\
Secrets (API keys, passwords, tokens) are kept by a secret proxy. A human approves every single use:
each request_secret call sends your reason to a person, who approves or denies it, usually within minutes.
Ask only for a secret you need now, once per task, and write a reason the person can judge at a glance."""

REASON_GUIDE = """\
Write `reason` for the human who decides: what you will do with the secret, where, and why now,
in one or two plain sentences, e.g. "Deploy web-api to staging: push the image to ghcr.io/acme/web-api
for issue #42". Never vague ("need it", "for the task"), never the value of anything."""

NAME_HELP = "the secret's name as the operator stored it, e.g. openai-api-key ([A-Za-z0-9_.-], at most 128)"
ID_HELP = "the request id (req_...) that request_secret returned with status pending"

REQUEST_SECRET = f"""\
Ask for a secret by name. A human approves every use: your reason is shown to them, and they approve or deny.
Returns {{"status": "approved", "value": ...}} when approved (the value can be fetched only this once: keep it
in memory for this task, never write it into files, logs or messages), {{"status": "denied"}} if the human said
no (do not ask again for the same purpose unless they tell you to), or {{"status": "pending", "id": ...}} if
nobody has decided yet: then call wait_for_decision with that id.
{REASON_GUIDE}"""

WAIT_FOR_DECISION = """\
Wait for a human's decision on a request that request_secret answered with status "pending" (pass its id).
Returns the same shapes as request_secret: approved (with the value, once), denied, expired, or still pending
(call again). Do not create a new request while one is pending: the human would have to decide twice."""


USE_SECRET_IN_CALL = f"""\
Use a secret in one HTTP call that the secret proxy makes for you: you never see the value. The proxy puts the
secret into the call the way the operator configured (e.g. an Authorization header), only toward destinations
the operator listed. A human approves this exact call (method, URL, headers, body) once; a different call needs
a new approval. Returns {{"status": "done", "http_status", "headers", "body"}} (any occurrence of the secret in
the answer is redacted), "denied", or {{"status": "pending", "id"}}: then call wait_for_decision with that id.
Do not put an Authorization header in `headers`: the proxy adds it. `body` is text (e.g. JSON), or "" for none.
{REASON_GUIDE}"""


def build_server(config: AgentConfig) -> MCPServer:
    api = ProxyApi(config.url, config.token)
    server = MCPServer("secret-proxy", instructions=INSTRUCTIONS)
    calls: dict[str, dict[str, Any]] = {}  # call requests of this session still to be made, by id

    # Sync tools: the SDK runs them in a worker thread, so a held long poll never blocks the session.
    @server.tool(description=REQUEST_SECRET)
    def request_secret(
        name: Annotated[str, Field(description=NAME_HELP)], reason: Annotated[str, Field(description=REASON_GUIDE)]
    ) -> dict[str, Any]:
        return _outcome(api, lambda: approval.ask(api, name, reason), config.mcp_wait_seconds, calls)

    @server.tool(description=WAIT_FOR_DECISION)
    def wait_for_decision(id: Annotated[str, Field(description=ID_HELP)]) -> dict[str, Any]:  # noqa: A002 - the model's name
        return _outcome(api, lambda: id, config.mcp_wait_seconds, calls)

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
        try:
            request_id = approval.ask_call(api, name, reason, call)
        except AgentError as exc:
            raise ToolError(str(exc)) from None
        calls[request_id] = call
        return _outcome(api, lambda: request_id, config.mcp_wait_seconds, calls)

    return server


def _call_answer(answer: dict[str, Any]) -> dict[str, Any]:
    raw = base64.b64decode(answer.get("body_base64", ""))
    try:
        body: dict[str, Any] = {"body": raw.decode()}
    except UnicodeDecodeError:
        body = {"body_base64": answer.get("body_base64", "")}
    return {
        "status": "done",
        "http_status": answer.get("status"),
        "headers": answer.get("headers", []),
        "redactions": answer.get("redactions", 0),
        **body,
    }


def _outcome(
    api: ProxyApi, request_id_of: Callable[[], str], wait: float, calls: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """What a tool returns: the decision, or pending; refusals become tool errors (AgentError's text)."""
    try:
        request_id = request_id_of()
        view = approval.wait_for_decision(api, request_id, wait)
        if request_id in calls:
            return _call_answer(approval.call_of_decided(api, view, calls.pop(request_id)))
        value = approval.value_of_decided(api, view)
    except TimedOut as exc:
        return {
            "status": "pending",
            "id": exc.request_id,
            "what_to_do": "no human has decided yet; call wait_for_decision with this id",
        }
    except Denied as exc:
        return {"status": "denied", "id": exc.request_id, "what_to_do": Denied.hint}
    except Expired as exc:
        return {
            "status": "expired",
            "id": exc.request_id,
            "detail": exc.message,
            "what_to_do": "ask again with request_secret if you still need it",
        }
    except AgentError as exc:
        raise ToolError(str(exc)) from None  # an isError result with this text, for the model to act on
    return {"status": "approved", "id": request_id, "secret": view.get("secret"), "value": value}


def serve(config: AgentConfig) -> int:
    build_server(config).run("stdio")
    return 0
