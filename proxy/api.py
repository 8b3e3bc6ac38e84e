"""The agent's HTTP API. Reads like docs/api.md, one handler per route."""

from __future__ import annotations

import functools
import json
import time
from datetime import datetime, timezone

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import store as st
from .errors import ApiError
from .openapi import OPENAPI
from .state import ProxyState

MAX_WAIT_SECONDS = 60
MAX_REASON_CHARS = 1000


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def request_view(req: st.Request) -> dict:
    return {
        "id": req.id,
        "secret": req.secret,
        "status": req.status,
        "reason": req.reason,
        "created_at": iso(req.created_at),
        "expires_at": iso(req.expires_at),
        "decided_at": iso(req.decided_at),
        "decided_by": req.decided_by,
    }


def _state(request: HttpRequest) -> ProxyState:
    return request.app.state.proxy


def _authorization(request: HttpRequest) -> str:
    # Straight from the ASGI scope: building a Headers object costs more than a poll's lookup.
    for name, value in request.scope["headers"]:
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


async def _json_body(request: HttpRequest) -> dict:
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


async def health(request: HttpRequest) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def openapi(request: HttpRequest) -> JSONResponse:
    return JSONResponse(OPENAPI)


async def create_request(request: HttpRequest) -> JSONResponse:
    state = _state(request)
    agent = authenticate(request)
    body = await _json_body(request)
    secret, reason = body.get("secret"), body.get("reason")
    ttl = body.get("ttl_seconds", state.settings.default_ttl_seconds)
    if not isinstance(secret, str) or not st.NAME_RE.match(secret):
        raise ApiError("invalid_request", "`secret` must be a name matching [A-Za-z0-9_.-]{1,128}")
    if not isinstance(reason, str) or not reason.strip():
        raise ApiError("invalid_request", "`reason` must be a non-empty string")
    if len(reason) > MAX_REASON_CHARS:
        raise ApiError("invalid_request", f"`reason` must be at most {MAX_REASON_CHARS} characters")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= state.settings.max_ttl_seconds:
        raise ApiError("invalid_request",
                       f"`ttl_seconds` must be an integer from 1 to {state.settings.max_ttl_seconds}")
    allowed, retry_after, first_refusal = state.limiter.take(agent.name)
    if not allowed:
        if first_refusal:
            await state.write(state.store.record, f"agent:{agent.name}", "request.refused",
                              None, secret, code="rate_limited")
        raise ApiError("rate_limited", f"too many requests; retry in {retry_after} s",
                       {"Retry-After": str(retry_after)})
    try:
        req = await state.write(state.store.create_request, agent, secret, reason, ttl)
    except st.StoreError as exc:
        headers = {"Retry-After": "60"} if exc.code == "rate_limited" else None
        raise _refusal(exc, headers) from None
    state.announce(req)
    return JSONResponse({"id": req.id, "status": req.status, "secret": req.secret,
                         "expires_at": iso(req.expires_at)}, status_code=201)


def _own_request(state: ProxyState, agent: st.Agent, request_id: str) -> st.Request:
    req = state.store.get_request(request_id)
    if req is None or req.agent != agent.name:
        # Another agent's request answers exactly like an unknown one.
        raise ApiError("not_found", "no such request")
    return req


async def get_request(request: HttpRequest) -> JSONResponse:
    state = _state(request)
    agent = authenticate(request, state)
    request_id = request.path_params["id"]
    # Parsing query parameters costs more than the rest of a poll; most polls have none.
    raw_wait = request.query_params.get("wait", "0") if request.scope["query_string"] else "0"
    try:
        wait = float(raw_wait)
    except ValueError:
        raise ApiError("invalid_request", f"`wait` must be a number of seconds up to {MAX_WAIT_SECONDS}") from None
    if not 0 <= wait <= MAX_WAIT_SECONDS:
        raise ApiError("invalid_request", f"`wait` must be a number of seconds up to {MAX_WAIT_SECONDS}")
    req = _own_request(state, agent, request_id)
    if wait and req.status == "pending":
        deadline = time.monotonic() + wait
        while req.status == "pending" and (remaining := deadline - time.monotonic()) > 0:
            await state.changes.wait(min(remaining, state.poll_interval))
            req = _own_request(state, agent, request_id)
    return Response(_rendered_view(req), media_type="application/json")


@functools.lru_cache(maxsize=4096)
def _rendered_view(req: st.Request) -> bytes:
    return json.dumps(request_view(req), separators=(",", ":")).encode()


async def retrieve_secret(request: HttpRequest) -> JSONResponse:
    state = _state(request)
    agent = authenticate(request)
    try:
        name, value = await state.write(state.store.retrieve, agent, request.path_params["id"])
    except st.StoreError as exc:
        raise _refusal(exc) from None
    state.changes.notify()
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise ApiError("internal_error", "the stored value is not UTF-8 text") from None
    return JSONResponse({"secret": name, "value": text}, headers={"Cache-Control": "no-store"})


# Status polls first: routes are matched in order and polls are the most frequent call.
ROUTES = [
    Route("/v1/requests/{id}", get_request, methods=["GET"]),
    Route("/v1/requests/{id}/secret", retrieve_secret, methods=["GET"]),
    Route("/v1/requests", create_request, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
