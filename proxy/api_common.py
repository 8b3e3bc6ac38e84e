"""What every route of the agent's API does before its own work: find the proxy's state, authenticate the
agent, read a JSON body, check a request id's shape, take from a budget, and read and record an ask.

`proxy/api.py` (retrievals) and `proxy/calls_api.py` (brokered calls) both build on it; neither
imports the other, and `proxy/routes.py` puts their routes in one list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request as HttpRequest

from . import store as st
from . import wire
from .errors import ApiError, StoreError
from .ratelimit import RateLimiter
from .state import ProxyState

if TYPE_CHECKING:
    from . import broker


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def state_of(request: HttpRequest) -> ProxyState:
    state: ProxyState = request.app.state.proxy
    return state


def authorization(request: HttpRequest) -> str:
    # Straight from the ASGI scope: building a Headers object costs more than a poll's lookup.
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            return value.decode("latin-1")
    return ""


def authenticate(request: HttpRequest, state: ProxyState | None = None) -> st.Agent:
    scheme, _, token = authorization(request).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError("unauthorized", "send Authorization: Bearer <agent token>")
    agent = (state or state_of(request)).store.authenticate(token.strip())
    if agent is None:
        raise ApiError("unauthorized", "unknown or revoked agent token")
    return agent


async def json_body(request: HttpRequest) -> dict[str, Any]:
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


async def within_budget(state: ProxyState, agent: st.Agent, limiter: RateLimiter, action: str) -> None:
    allowed, retry_after = limiter.take(agent.name)
    if not allowed:
        await state.refused(agent, action, "rate_limited")
        raise ApiError(
            "rate_limited", f"too many calls of this kind; retry in {retry_after} s", {"Retry-After": str(retry_after)}
        )


async def request_id_of(state: ProxyState, agent: st.Agent, request: HttpRequest, action: str) -> str:
    """The path's id, if it has the shape the proxy issues; anything else is refused before a look-up."""
    request_id: str = request.path_params["id"]
    if not st.REQUEST_ID_RE.fullmatch(request_id):
        await state.refused(agent, action, "malformed_id")
        raise ApiError("malformed_id", f"not a request id: ids match {wire.REQUEST_ID}")
    return request_id


def asked_fields(body: dict[str, Any], default_ttl: int, max_ttl: int) -> tuple[str, str, int]:
    """The secret's name, the reason and the time to live of a new request (a retrieval or a call), checked."""
    secret, reason = body.get("secret"), body.get("reason")
    ttl = body.get("ttl_seconds", default_ttl)
    if not isinstance(secret, str) or not st.NAME_RE.fullmatch(secret):
        raise ApiError("invalid_request", f"`secret` must be a name matching {wire.SECRET_NAME}")
    if not isinstance(reason, str) or not reason.strip():
        raise ApiError("invalid_request", "`reason` must be a non-empty string")
    if len(reason) > wire.MAX_REASON_CHARS:
        raise ApiError("invalid_request", f"`reason` must be at most {wire.MAX_REASON_CHARS} characters")
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
    state = state_of(request)
    agent = authenticate(request)
    body = await json_body(request)
    secret, reason, ttl = asked_fields(body, state.settings.default_ttl_seconds, state.settings.max_ttl_seconds)
    await within_budget(state, agent, state.limits.create, refusal)
    return Asked(state, agent, body, secret, reason, ttl, refusal)


async def record_ask(asked: Asked, call: broker.Call | None = None, body: bytes | None = None) -> st.Request:
    """The pending request (with its call and the call's body, if any), committed, and announced to the approvers."""
    state, agent = asked.state, asked.agent
    try:
        req = await state.write(state.store.create_request, agent, asked.secret, asked.reason, asked.ttl, call, body)
    except StoreError as exc:
        await state.refused(agent, asked.refusal, exc.kind, secret=exc.secret)
        if exc.code == "rate_limited":
            exc.headers = {"Retry-After": "60"}
        raise
    state.announce(req)
    return req
