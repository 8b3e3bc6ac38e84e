"""The agent's HTTP API. Reads like docs/api.md, one handler per route."""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from . import broker, crypto, wire
from . import store as st
from .api_common import authenticate, iso, read_ask, record_ask, request_id_of, state_of, within_budget
from .approval import ApprovalRule
from .errors import ApiError, StoreError
from .openapi import OPENAPI
from .policy import Policy
from .state import ProxyState

log = logging.getLogger("proxy")

MAX_WAIT_SECONDS = wire.MAX_WAIT_SECONDS
# A waiter also looks again this often, in case a wake-up was lost; wake-ups are the fast path.
WAIT_SLICE_SECONDS = 5.0
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 500


def request_view(req: st.Request, call: broker.Call | None = None) -> dict[str, Any]:
    """A request as its agent sees it; `call` (method and URL) tells a call request from a retrieval."""
    return {
        "id": req.id,
        "secret": req.secret,
        "status": req.status,
        "reason": req.reason,
        "created_at": iso(req.created_at),
        "expires_at": iso(req.expires_at),
        "decided_at": iso(req.decided_at),
        "decided_by": decider_role(req.decided_by),
        "call": {"method": call.method, "url": call.url} if call else None,
    }


def decider_role(actor: str | None) -> str | None:
    """What kind of person decided, not who: an approver's Telegram id is not the agent's business."""
    if actor is None:
        return None
    return {"telegram": "approver", "operator": "operator", "agent": "agent"}.get(actor.partition(":")[0], "proxy")


async def health(request: HttpRequest) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def openapi(request: HttpRequest) -> JSONResponse:
    return JSONResponse(OPENAPI)


async def create_request(request: HttpRequest) -> JSONResponse:
    req = await record_ask(await read_ask(request, "request.refused"))
    return JSONResponse(
        {"id": req.id, "status": req.status, "secret": req.secret, "expires_at": iso(req.expires_at)}, status_code=201
    )


def _own_request(state: ProxyState, agent: st.Agent, request_id: str) -> st.Request:
    req = state.store.get_request(request_id)
    if req is None or req.agent != agent.name:
        # Another agent's request answers exactly like an unknown one.
        raise ApiError("not_found", "no such request")
    return req


async def get_request(request: HttpRequest) -> Response:
    state = state_of(request)
    agent = authenticate(request, state)
    # Parsing query parameters costs more than the rest of a poll; most polls have none.
    raw_wait = request.query_params.get("wait", "0") if request.scope["query_string"] else "0"
    try:
        wait = float(raw_wait)
    except ValueError:
        raise ApiError("invalid_request", f"`wait` must be a number of seconds up to {MAX_WAIT_SECONDS}") from None
    if not 0 <= wait <= MAX_WAIT_SECONDS:
        raise ApiError("invalid_request", f"`wait` must be a number of seconds up to {MAX_WAIT_SECONDS}")
    # A poll with `?wait=` takes one token, however many wake-ups it sees.
    await within_budget(state, agent, state.limits.poll, "status.refused")
    request_id = await request_id_of(state, agent, request, "status.refused")
    req = _own_request(state, agent, request_id)
    if wait and req.status == "pending":
        waits = state.limits.waits
        if waits.full(agent.name):
            await state.refused(agent, "status.refused", "too_many_waits")
            raise ApiError(
                "rate_limited",
                f"this agent already holds {waits.per_key} waiting calls; wait on fewer requests at once",
                {"Retry-After": "1"},
            )
        with waits.hold(agent.name):
            deadline = time.monotonic() + wait
            while req.status == "pending" and (remaining := deadline - time.monotonic()) > 0:
                await state.changes.wait(request_id, min(remaining, WAIT_SLICE_SECONDS))
                req = _own_request(state, agent, request_id)
    return Response(_rendered_view(req, state.store.get_call(request_id)), media_type="application/json")


@functools.lru_cache(maxsize=4096)
def _rendered_view(req: st.Request, call: broker.Call | None) -> bytes:
    return json.dumps(request_view(req, call), separators=(",", ":")).encode()


async def list_requests(request: HttpRequest) -> JSONResponse:
    """`GET /v1/requests[?status=S&limit=N]`: the agent's own requests, newest first; never another's."""
    state = state_of(request)
    agent = authenticate(request, state)
    await within_budget(state, agent, state.limits.poll, "list.refused")
    status = request.query_params.get("status")
    if status is not None and status not in st.STATUSES:
        raise ApiError("invalid_request", f"`status` must be one of {', '.join(st.STATUSES)}")
    try:
        limit = int(request.query_params.get("limit", str(DEFAULT_LIST_LIMIT)))
    except ValueError:
        limit = -1
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ApiError("invalid_request", f"`limit` must be an integer from 1 to {MAX_LIST_LIMIT}")
    found = await state.write(state.store.agent_requests, agent, status, limit)  # it may record expiries
    return JSONResponse({"requests": [request_view(r, state.store.get_call(r.id)) for r in found]})


async def cancel_request(request: HttpRequest) -> JSONResponse:
    """`POST /v1/requests/{id}/cancel`: withdraw a pending request; anything else is left as it is."""
    state = state_of(request)
    agent = authenticate(request, state)
    await within_budget(state, agent, state.limits.create, "cancel.refused")
    request_id = await request_id_of(state, agent, request, "cancel.refused")
    try:
        decision = await state.write(state.store.cancel, agent, request_id)
    except StoreError as exc:
        await state.refused(agent, "cancel.refused", exc.kind, request_id, exc.secret)
        raise
    # Waiters and the Telegram bot learn of it from the audit entry it committed (state.Changes).
    view = request_view(decision.request, state.store.get_call(request_id))
    return JSONResponse({**view, "cancelled": decision.changed})


async def list_secrets(request: HttpRequest) -> JSONResponse:
    """`GET /v1/secrets`: what this agent may ask for and how each may be used; never a value."""
    state = state_of(request)
    agent = authenticate(request, state)
    await within_budget(state, agent, state.limits.poll, "secrets.refused")
    return JSONResponse({"secrets": [secret_view(n, p, r) for n, p, r in state.store.secrets_in_scope(agent)]})


def secret_view(name: str, policy: Policy | None, rule: ApprovalRule) -> dict[str, Any]:
    """How a secret may be used: retrieved, used in calls (to which destinations, injected how), or both.

    The injection's kind and header or parameter name only: its template may hold fixed text
    the operator chose not to show."""
    never = rule.kind == "deny"  # nothing is ever approved: neither use is open to the agent
    callable_ = not never and policy is not None and bool(policy.destinations) and policy.injection is not None
    return {
        "name": name,
        "retrieve": not rule.broker_only and not never,
        "call": callable_,
        "destinations": [d.show() for d in policy.destinations] if policy and callable_ else [],
        "inject": {"kind": policy.injection.kind, "name": policy.injection.name}
        if policy and policy.injection and callable_
        else None,
    }


async def retrieve_secret(request: HttpRequest) -> JSONResponse:
    state = state_of(request)
    agent = authenticate(request)
    await within_budget(state, agent, state.limits.retrieve, "retrieval.refused")
    request_id = await request_id_of(state, agent, request, "retrieval.refused")
    # Most refusals are known from a read; only an approved request goes to the writer.
    req = state.store.get_request(request_id)
    refusal = (
        StoreError("not_found", "no such request")
        if req is None or req.agent != agent.name
        else st.retrieval_refusal(req)
    )
    try:
        if refusal is not None:
            raise refusal
        name, value = await state.write(state.store.retrieve, agent, request_id)
    except StoreError as exc:
        await state.refused(agent, "retrieval.refused", exc.kind, request_id, exc.secret)
        raise
    except crypto.CryptoError:
        # Nothing was recorded: the request is still approved and can be retrieved once this is fixed.
        log.error("retrieval of %s failed: its value does not decrypt under the master key", request_id)
        await state.refused(agent, "retrieval.refused", "decrypt_failed", request_id, req.secret if req else None)
        raise ApiError("internal_error", "the value could not be decrypted; the request stays approved") from None
    return JSONResponse({"secret": name, "value": value.decode()}, headers={"Cache-Control": "no-store"})
