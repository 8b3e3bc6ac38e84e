"""The agent's HTTP API. Reads like docs/api.md, one handler per route."""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import crypto
from . import store as st
from .errors import ApiError
from .openapi import OPENAPI
from .ratelimit import RateLimiter
from .state import ProxyState

if TYPE_CHECKING:
    from . import broker

log = logging.getLogger("proxy")

MAX_WAIT_SECONDS = 60
MAX_REASON_CHARS = 1000
# A waiter also looks again this often, in case a wake-up was lost; wake-ups are the fast path.
WAIT_SLICE_SECONDS = 5.0


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def request_view(req: st.Request) -> dict[str, Any]:
    return {
        "id": req.id,
        "secret": req.secret,
        "status": req.status,
        "reason": req.reason,
        "created_at": iso(req.created_at),
        "expires_at": iso(req.expires_at),
        "decided_at": iso(req.decided_at),
        "decided_by": decider_role(req.decided_by),
    }


def decider_role(actor: str | None) -> str | None:
    """What kind of person decided, not who: an approver's Telegram id is not the agent's business."""
    if actor is None:
        return None
    return {"telegram": "approver", "operator": "operator"}.get(actor.partition(":")[0], "proxy")


def _state(request: HttpRequest) -> ProxyState:
    state: ProxyState = request.app.state.proxy
    return state


def _authorization(request: HttpRequest) -> str:
    # Straight from the ASGI scope: building a Headers object costs more than a poll's lookup.
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            return value.decode("latin-1")
    return ""


def authenticate(request: HttpRequest, state: ProxyState | None = None) -> st.Agent:
    scheme, _, token = _authorization(request).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError("unauthorized", "send Authorization: Bearer <agent token>")
    agent = (state or _state(request)).store.authenticate(token.strip())
    if agent is None:
        raise ApiError("unauthorized", "unknown or revoked agent token")
    return agent


async def _json_body(request: HttpRequest) -> dict[str, Any]:
    if "json" not in request.headers.get("content-type", "application/json"):
        raise ApiError("invalid_request", "send the body as application/json")
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError("invalid_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the body must be a JSON object")
    return body


def _refusal(exc: st.StoreError, headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(exc.code, exc.detail, headers)


async def _within_budget(state: ProxyState, agent: st.Agent, limiter: RateLimiter, action: str) -> None:
    allowed, retry_after = limiter.take(agent.name)
    if not allowed:
        await state.refused(agent, action, "rate_limited")
        raise ApiError(
            "rate_limited", f"too many calls of this kind; retry in {retry_after} s", {"Retry-After": str(retry_after)}
        )


async def _request_id(state: ProxyState, agent: st.Agent, request: HttpRequest, action: str) -> str:
    """The path's id, if it has the shape the proxy issues; anything else is refused before a look-up."""
    request_id: str = request.path_params["id"]
    if not st.REQUEST_ID_RE.fullmatch(request_id):
        await state.refused(agent, action, "malformed_id")
        raise ApiError("malformed_id", "not a request id: ids are req_ followed by 32 characters [A-Za-z0-9_-]")
    return request_id


async def health(request: HttpRequest) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def openapi(request: HttpRequest) -> JSONResponse:
    return JSONResponse(OPENAPI)


def asked_fields(body: dict[str, Any], default_ttl: int, max_ttl: int) -> tuple[str, str, int]:
    """The secret's name, the reason and the time to live of a new request (a retrieval or a call), checked."""
    secret, reason = body.get("secret"), body.get("reason")
    ttl = body.get("ttl_seconds", default_ttl)
    if not isinstance(secret, str) or not st.NAME_RE.fullmatch(secret):
        raise ApiError("invalid_request", "`secret` must be a name matching [A-Za-z0-9_.-]{1,128}")
    if not isinstance(reason, str) or not reason.strip():
        raise ApiError("invalid_request", "`reason` must be a non-empty string")
    if len(reason) > MAX_REASON_CHARS:
        raise ApiError("invalid_request", f"`reason` must be at most {MAX_REASON_CHARS} characters")
    try:
        reason.encode()
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape; SQLite cannot store it
        raise ApiError("invalid_request", "`reason` must be valid Unicode text") from None
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= max_ttl:
        raise ApiError("invalid_request", f"`ttl_seconds` must be an integer from 1 to {max_ttl}")
    return secret, reason, ttl


@dataclass(frozen=True)
class Asked:
    """A new request or call as the agent asked for it: read, authenticated, within the agent's budget."""

    state: ProxyState
    agent: st.Agent
    body: dict[str, Any]
    secret: str
    reason: str
    ttl: int
    refusal: str  # the audit event a refusal of this ask is recorded as


async def read_ask(request: HttpRequest, refusal: str) -> Asked:
    state = _state(request)
    agent = authenticate(request)
    body = await _json_body(request)
    secret, reason, ttl = asked_fields(body, state.settings.default_ttl_seconds, state.settings.max_ttl_seconds)
    await _within_budget(state, agent, state.limits.create, refusal)
    return Asked(state, agent, body, secret, reason, ttl, refusal)


async def record_ask(asked: Asked, call: broker.Call | None = None) -> st.Request:
    """The pending request, committed, and announced to the approvers."""
    state, agent = asked.state, asked.agent
    try:
        req = await state.write(state.store.create_request, agent, asked.secret, asked.reason, asked.ttl, call)
    except st.StoreError as exc:
        await state.refused(agent, asked.refusal, exc.kind, secret=exc.secret)
        headers = {"Retry-After": "60"} if exc.code == "rate_limited" else None
        raise _refusal(exc, headers) from None
    state.announce(req)
    return req


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
    state = _state(request)
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
    await _within_budget(state, agent, state.limits.poll, "status.refused")
    request_id = await _request_id(state, agent, request, "status.refused")
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
    return Response(_rendered_view(req), media_type="application/json")


@functools.lru_cache(maxsize=4096)
def _rendered_view(req: st.Request) -> bytes:
    return json.dumps(request_view(req), separators=(",", ":")).encode()


async def retrieve_secret(request: HttpRequest) -> JSONResponse:
    state = _state(request)
    agent = authenticate(request)
    await _within_budget(state, agent, state.limits.retrieve, "retrieval.refused")
    request_id = await _request_id(state, agent, request, "retrieval.refused")
    # Most refusals are known from a read; only an approved request goes to the writer.
    req = state.store.get_request(request_id)
    refusal = (
        st.StoreError("not_found", "no such request")
        if req is None or req.agent != agent.name
        else st.retrieval_refusal(req)
    )
    try:
        if refusal is not None:
            raise refusal
        name, value = await state.write(state.store.retrieve, agent, request_id)
    except st.StoreError as exc:
        await state.refused(agent, "retrieval.refused", exc.kind, request_id, exc.secret)
        raise _refusal(exc) from None
    except crypto.CryptoError:
        # Nothing was recorded: the request is still approved and can be retrieved once this is fixed.
        log.error("retrieval of %s failed: its value does not decrypt under the master key", request_id)
        await state.refused(agent, "retrieval.refused", "decrypt_failed", request_id, req.secret if req else None)
        raise ApiError("internal_error", "the value could not be decrypted; the request stays approved") from None
    return JSONResponse({"secret": name, "value": value.decode()}, headers={"Cache-Control": "no-store"})


def routes() -> list[Route]:
    from .calls_api import create_call, make_call  # it builds on this module's helpers

    # Status polls first: routes are matched in order and polls are the most frequent call.
    return [
        Route("/v1/requests/{id}", get_request, methods=["GET"]),
        Route("/v1/requests/{id}/secret", retrieve_secret, methods=["GET"]),
        Route("/v1/requests", create_request, methods=["POST"]),
        Route("/v1/calls", create_call, methods=["POST"]),
        Route("/v1/requests/{id}/call", make_call, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
