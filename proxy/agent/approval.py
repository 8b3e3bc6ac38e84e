"""Ask, wait for a human's decision, then retrieve once or have the proxy make the call: the flow both
agent tools share, bounded by one deadline.

The waiting is the proxy's own long poll (`?wait=`, at most 60 s a call), repeated until the
caller's deadline. While waiting, and while making an approved call, a 429 is honoured (sleep
Retry-After, then try again) and a proxy that drops out for a moment is asked again, because
the request outlives both: giving up early would only make the agent ask a second time and the
human approve twice. A call is made by its id alone (the proxy kept it when it was asked), so
a `call` that timed out, or an MCP server started again, can still make an approved one.

`until` is a deadline on the monotonic clock. The step under way when it passes may take a
little longer: asking and retrieving STEP_GRACE_SECONDS (so that `--timeout 0` can still ask
once), the brokered call CALL_GRACE_SECONDS (the proxy's own limit on the destination, 30 s
by default, and a margin), because cutting a call off would waste an approval.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

from .errors import AgentError, Denied, Expired, Refused, TimedOut, Unreachable
from .proxy_http import ProxyApi

RECONNECT_PAUSE_SECONDS = 2.0
MIN_POLL_SECONDS = 0.5  # against a proxy that answers `pending` at once instead of holding the call
STEP_GRACE_SECONDS = 3.0
CALL_GRACE_SECONDS = 45.0
HELD_POLL_SLACK_SECONDS = 1.0  # a poll held until the deadline comes back just after it
RETRIED_CODES = ("rate_limited", "too_many_calls")  # 429s: nothing was used, try again after Retry-After
Progress = Callable[[str], None]


def step_until(until: float, grace: float = STEP_GRACE_SECONDS) -> float:
    """The deadline of one step: the caller's, or `grace` from now if that is later."""
    return max(until, time.monotonic() + grace)


def ask(api: ProxyApi, secret: str, reason: str, until: float, ttl: int | None = None) -> str:
    """A new request's id."""
    request_id = api.ask(secret, reason, step_until(until), ttl).get("id")
    if not isinstance(request_id, str):
        raise Unreachable("the proxy's answer to a new request holds no id")
    return request_id


def ask_call(
    api: ProxyApi, secret: str, reason: str, call: dict[str, Any], until: float, ttl: int | None = None
) -> str:
    """A new call request's id."""
    request_id = api.ask_call(secret, reason, call, step_until(until), ttl).get("id")
    if not isinstance(request_id, str):
        raise Unreachable("the proxy's answer to a new call request holds no id")
    return request_id


def _again(exc: AgentError, request_id: str, until: float, progress: Progress, what: str) -> None:
    """Sleep before trying again after a 429 or a dropped connection, or raise if the deadline is too near."""
    pause = RECONNECT_PAUSE_SECONDS
    if isinstance(exc, Refused) and exc.retry_after is not None:
        pause = exc.retry_after
    left = until - time.monotonic()
    if left <= 0:
        exc.request_id = request_id
        exc.hint = f"{what}; then `secret-proxy-agent wait {request_id}`"
        raise exc
    progress(f"{exc.message}; asking again in {min(pause, left):.0f} s")
    time.sleep(min(pause, left))


def wait_for_decision(
    api: ProxyApi, request_id: str, until: float, progress: Progress = lambda _: None
) -> dict[str, Any]:
    """The request as the proxy shows it once it has left `pending`; TimedOut if still pending at `until`."""
    while True:
        started = time.monotonic()
        try:
            # The held poll ends at the deadline; its exchange may take a little longer to come back.
            view = api.status(request_id, until + HELD_POLL_SLACK_SECONDS, wait=until - started)
        except (Refused, Unreachable) as exc:
            if isinstance(exc, Refused) and exc.code not in RETRIED_CODES:
                raise
            _again(exc, request_id, until, progress, "the request may still be pending: check the proxy")
            continue
        if view.get("status") != "pending":
            return view
        if time.monotonic() >= until:
            raise TimedOut(
                f"no decision in time; request {request_id} is still pending",
                hint=f"wait longer with `secret-proxy-agent wait {request_id}`, ask a human to approve it, or "
                f"withdraw it with `secret-proxy-agent cancel {request_id}`",
                request_id=request_id,
            )
        if time.monotonic() - started < MIN_POLL_SECONDS:
            time.sleep(max(0.0, min(MIN_POLL_SECONDS, until - time.monotonic())))
        else:
            progress(f"still pending ({until - time.monotonic():.0f} s left)")


def is_call(view: dict[str, Any]) -> bool:
    """Whether a request asks to make a call (the proxy shows its method and URL) rather than to retrieve."""
    return isinstance(view.get("call"), dict)


def refusal_of_decided(view: dict[str, Any]) -> AgentError | None:
    """Why a request that has left `pending` cannot be used now; None if it is approved."""
    request_id, status = str(view.get("id")), view.get("status")
    if status == "approved":
        return None
    if status == "denied":
        by = f" ({view['decided_by']})" if view.get("decided_by") else ""
        return Denied(f"request {request_id} was denied{by}", request_id=request_id)
    if status == "retrieved":
        return Expired(
            f"request {request_id}'s value was handed out already", request_id=request_id, code="already_retrieved"
        )
    if status == "used":
        return Expired(
            f"request {request_id}'s approved call was made already (status used)",
            request_id=request_id,
            code="already_used",
            hint="ask again for a new call if you need another",
        )
    if status == "cancelled":
        return Expired(f"request {request_id} was cancelled", request_id=request_id, code="cancelled")
    return Expired(f"request {request_id} expired before it was decided or used", request_id=request_id)


def call_of_decided(
    api: ProxyApi, view: dict[str, Any], until: float, progress: Progress = lambda _: None
) -> dict[str, Any]:
    """The answer of an approved call, which the proxy makes now (once), by the request's id.

    A 429 (`too_many_calls` is refused before the approval is claimed) and a dropped connection are
    tried again until the deadline; a retry after a call the proxy did make answers `already_used`."""
    refusal = refusal_of_decided(view)
    if refusal is not None:
        raise refusal
    request_id = str(view.get("id"))
    until = step_until(until, CALL_GRACE_SECONDS)
    dropped = False
    while True:
        try:
            return api.make_call(request_id, until)
        except (Refused, Expired, Unreachable) as exc:
            if isinstance(exc, Expired) and dropped and exc.code == "already_used":
                raise Expired(
                    f"the connection to the proxy dropped while it made request {request_id}'s call: the call was "
                    "made, and its answer is lost",
                    request_id=request_id,
                    code="already_used",
                    hint="check at the destination whether it took effect before asking again",
                ) from None
            if isinstance(exc, Expired) or (isinstance(exc, Refused) and exc.code not in RETRIED_CODES):
                raise
            dropped = dropped or isinstance(exc, Unreachable)
            if isinstance(exc, Unreachable) and exc.code != "unreachable":
                raise  # the proxy answered 5xx: the call was made and failed; the approval is used
            _again(
                exc, request_id, until, progress, "the approval is not used up: make the call when the proxy answers"
            )


def call_result(answer: dict[str, Any]) -> dict[str, Any]:
    """A made call as --json and the MCP tools show it: the body as text, or base64 if it is not UTF-8."""
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


def value_of_decided(api: ProxyApi, view: dict[str, Any], until: float) -> str:
    """The value of an approved request (retrieved now, once); Denied or Expired otherwise."""
    refusal = refusal_of_decided(view)
    if refusal is not None:
        raise refusal
    return api.retrieve(str(view.get("id")), step_until(until))[1]
