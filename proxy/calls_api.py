"""The brokered-call routes: ask to use a secret in one exact call, then have the proxy make it.

`POST /v1/calls` checks the call against the secret's policy (an unlisted destination is
refused here, before anyone is asked and before any connection) and creates a pending
request that shows the approver the call. `POST /v1/requests/{id}/call`, with the same
call and the body itself, claims the approval (once) and makes the call (`proxy/broker.py`); with an
empty body `{}` it makes the call as it was asked and stored, so that an approval outlives the agent
process that asked (a restarted MCP server, a `call` that timed out).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from . import broker, crypto
from . import store as st
from .api_common import authenticate, iso, json_body, read_ask, record_ask, request_id_of, state_of, within_budget
from .errors import ApiError, ProxyError, StoreError
from .policy import Policy
from .state import ProxyState

log = logging.getLogger("proxy")
SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _body(body: dict[str, Any], max_bytes: int, *, hash_allowed: bool) -> tuple[bytes | None, str, int]:
    """(body bytes or None, sha256, size) from `body_base64`, or from `body_sha256` + `body_size`."""
    encoded = body.get("body_base64")
    if encoded is not None:
        if not isinstance(encoded, str):
            raise ApiError("invalid_request", "`body_base64` must be a base64 string")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("invalid_request", "`body_base64` is not valid base64") from None
        if len(data) > max_bytes:
            raise ApiError("too_large", f"the call's body is over {max_bytes} bytes (broker_max_request_bytes)")
        return data, broker.sha256(data), len(data)
    digest, size = body.get("body_sha256"), body.get("body_size")
    if digest is None and size is None:
        return b"", broker.sha256(b""), 0
    if not hash_allowed:
        raise ApiError("invalid_request", "send the call's body itself as `body_base64`")
    if (
        not isinstance(digest, str)
        or not SHA256_RE.fullmatch(digest)
        or isinstance(size, bool)
        or not isinstance(size, int)
        or not 0 <= size <= max_bytes
    ):
        raise ApiError(
            "invalid_request",
            f"`body_sha256` must be 64 lower-case hex digits and `body_size` an integer from 0 to {max_bytes}",
        )
    return None, digest, size


def _checked_call(
    state: ProxyState, body: dict[str, Any], policy: Policy | None, *, hash_allowed: bool
) -> tuple[broker.Call, bytes | None]:
    target, _, headers = broker.check_call(policy, body.get("method"), body.get("url"), body.get("headers"))
    data, digest, size = _body(body, state.settings.broker_max_request_bytes, hash_allowed=hash_allowed)
    return broker.Call(body["method"], body["url"], headers, digest, size), data


def _stored_call(state: ProxyState, request_id: str) -> tuple[broker.Call, bytes]:
    """The call as the agent asked for it, with its body, if it may still be made; checked like a sent one."""
    req, call = state.store.get_request(request_id), state.store.get_call(request_id)
    assert req is not None and call is not None  # make_call looked both up
    refusal = st.retrieval_refusal(req)
    if refusal is not None:  # used, expired, pending, denied: say so rather than "send the body"
        raise refusal
    data = state.store.call_body(request_id)
    if data is None:
        raise ApiError(
            "invalid_request",
            "this call was asked by its body's hash, so the proxy does not hold the body: send the call "
            "with `body_base64`",
        )
    broker.check_call(state.store.get_policy(req.secret), call.method, call.url, dict(call.headers))
    return call, data


async def create_call(request: HttpRequest) -> JSONResponse:
    asked = await read_ask(request, "call.refused")
    state, agent, body, secret = asked.state, asked.agent, asked.body, asked.secret
    if not agent.may_request(secret):
        await state.refused(agent, "call.refused", "forbidden", secret=secret)
        raise ApiError("forbidden", f"agent {agent.name!r} may not use {secret!r}")
    try:
        call, data = _checked_call(state, body, state.store.get_policy(secret), hash_allowed=True)
    except ProxyError as exc:
        await state.refused(agent, "call.refused", exc.code, secret=secret)
        raise
    req = await record_ask(asked, call, data)
    return JSONResponse(
        {
            "id": req.id,
            "status": req.status,
            "secret": req.secret,
            "expires_at": iso(req.expires_at),
            "call": {
                "method": call.method,
                "url": call.url,
                "body_sha256": call.body_sha256,
                "body_size": call.body_size,
            },
        },
        status_code=201,
    )


async def make_call(request: HttpRequest) -> JSONResponse:
    state = state_of(request)
    agent = authenticate(request)
    await within_budget(state, agent, state.limits.call, "call.refused")
    request_id = await request_id_of(state, agent, request, "call.refused")
    body = await json_body(request)
    req = state.store.get_request(request_id)
    if req is None or req.agent != agent.name or state.store.get_call(request_id) is None:
        await state.refused(agent, "call.refused", "not_found", request_id)
        raise ApiError("not_found", "no such call request")
    refusal = st.retrieval_refusal(req)
    if refusal is not None:  # used, expired, denied, pending: known from a read, and refused without a slot
        await state.refused(agent, "call.refused", refusal.kind, request_id, req.secret)
        raise refusal
    slots = state.limits.calls
    full = slots.full(agent.name)
    if full:
        # Refused before the approval is claimed: it stays usable for a later try.
        await state.refused(agent, "call.refused", "too_many_calls", request_id, req.secret)
        raise ApiError(
            "too_many_calls",
            f"this agent already has {slots.per_key} calls under way; try again when one ends"
            if full == "agent"
            else f"the proxy already makes {slots.total} calls; try again shortly",
            {"Retry-After": "1"},
        )
    with slots.hold(agent.name):
        secret, value, policy, call, data = await _claim(state, agent, request_id, req.secret, body)
        return await _attempt(state, agent, request_id, secret, value, policy, call, data)


async def _claim(
    state: ProxyState, agent: st.Agent, request_id: str, secret: str, body: dict[str, Any]
) -> tuple[str, bytes, Policy, broker.Call, bytes]:
    """Use up the approval for exactly this call; everything the agent sent is checked before.

    An empty body means the call as asked: the stored call, checked against the policy again."""
    try:
        if body:
            call, data = _checked_call(state, body, state.store.get_policy(secret), hash_allowed=False)
        else:
            call, data = _stored_call(state, request_id)
        assert data is not None
        secret, value, policy = await _shielded_claim(state, agent, request_id, call)
    except StoreError as exc:
        # An altered call is audited every time, not folded into a count: it is an attempt to be looked at.
        if exc.code == "call_mismatch":
            await state.write(
                state.store.record,
                f"agent:{agent.name}",
                "call.refused",
                request_id,
                secret,
                code=exc.code,
                detail=exc.detail,
            )
        else:
            await state.refused(agent, "call.refused", exc.kind, request_id, exc.secret)
        raise
    except ProxyError as exc:  # the call itself refused (broker.check_call), or its body
        await state.refused(agent, "call.refused", exc.code, request_id, secret)
        raise
    except crypto.CryptoError:
        log.error("call %s: the value does not decrypt under the master key", request_id)
        raise ApiError("internal_error", "the value could not be decrypted") from None
    return secret, value, policy, call, data


async def _shielded_claim(
    state: ProxyState, agent: st.Agent, request_id: str, call: broker.Call
) -> tuple[str, bytes, Policy]:
    """The claim, shielded: a handler cancelled while it commits (the proxy shutting down) must not leave
    `call.started` without its end; once committed, the end is recorded as `call.failed` (cancelled)."""
    task = asyncio.ensure_future(state.write(state.store.claim_call, agent, request_id, call))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: _abandoned(state, agent, request_id, t))
        raise


def _abandoned(state: ProxyState, agent: st.Agent, request_id: str, claim: asyncio.Future[Any]) -> None:
    if claim.cancelled() or claim.exception() is not None:
        return  # nothing was claimed: the approval stays
    secret = claim.result()[0]
    record = state.write(state.store.record, f"agent:{agent.name}", "call.failed", request_id, secret, code="cancelled")
    asyncio.ensure_future(record)


async def _attempt(
    state: ProxyState,
    agent: st.Agent,
    request_id: str,
    secret: str,
    value: bytes,
    policy: Policy,
    call: broker.Call,
    data: bytes,
) -> JSONResponse:
    """Make the claimed call; whatever happens, it ends in `call.completed` or `call.failed` in the audit."""
    limits = broker.Limits(
        state.settings.broker_max_request_bytes,
        state.settings.broker_max_response_bytes,
        state.settings.broker_timeout_seconds,
        state.settings.broker_ca_file,
        state.settings.egress_proxy,
    )
    target = call.target
    audit = {
        "method": call.method,
        "host": target.host,
        "port": target.port,
        "path": target.path,
        "request_size": call.body_size,
        "request_sha256": call.body_sha256,
    }

    async def failed(code: str) -> None:
        state.metrics.calls.labels(code).inc()
        # Shielded: an agent that hangs up mid-call must not leave `call.started` without its end.
        record = state.write(
            state.store.record, f"agent:{agent.name}", "call.failed", request_id, secret, code=code, **audit
        )
        await asyncio.shield(record)

    try:
        answer = await broker.execute(policy, call, data, value, limits, state.resolver)
    except ProxyError as exc:
        await failed(exc.code)
        raise
    except asyncio.CancelledError:
        await failed("cancelled")
        raise
    except Exception as exc:
        log.error("call %s failed inside the proxy: %s", request_id, type(exc).__name__)
        await failed("internal_error")
        raise ApiError("internal_error", "the call failed inside the proxy; see its log") from None
    finally:
        del value
    state.metrics.calls.labels(f"{answer.status // 100}xx").inc()
    await state.write(
        state.store.record,
        f"agent:{agent.name}",
        "call.completed",
        request_id,
        secret,
        status=answer.status,
        address=answer.address,
        response_size=len(answer.body),
        response_sha256=broker.sha256(answer.body),
        redactions=answer.redactions,
        elapsed_ms=round(answer.elapsed_seconds * 1000),
        **audit,
    )
    return JSONResponse(
        {
            "status": answer.status,
            "headers": [list(h) for h in answer.headers],
            "body_base64": base64.b64encode(answer.body).decode(),
            "redactions": answer.redactions,
        },
        headers={"Cache-Control": "no-store"},
    )
