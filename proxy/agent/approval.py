"""Ask, wait for a human's decision, retrieve once: the flow both agent tools share.

The waiting is the proxy's own long poll (`?wait=`, at most 60 s a call),
repeated until the caller's deadline. While waiting, a 429 is honoured (sleep
Retry-After, then wait again) and a proxy that drops out for a moment is asked
again, because the request outlives both: giving up early would only make the
agent ask a second time and the human approve twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .errors import Denied, Expired, Refused, TimedOut, Unreachable
from .proxy_http import ProxyApi

RECONNECT_PAUSE_SECONDS = 2.0
MIN_POLL_SECONDS = 0.5  # against a proxy that answers `pending` at once instead of holding the call
Progress = Callable[[str], None]


def ask(api: ProxyApi, secret: str, reason: str) -> str:
    """A new request's id."""
    created = api.ask(secret, reason)
    request_id = created.get("id")
    if not isinstance(request_id, str):
        raise Unreachable("the proxy's answer to a new request holds no id")
    return request_id


def ask_call(api: ProxyApi, secret: str, reason: str, call: dict[str, Any]) -> str:
    """A new call request's id."""
    request_id = api.ask_call(secret, reason, call).get("id")
    if not isinstance(request_id, str):
        raise Unreachable("the proxy's answer to a new call request holds no id")
    return request_id


def wait_for_decision(
    api: ProxyApi, request_id: str, timeout: float, progress: Progress = lambda _: None
) -> dict[str, Any]:
    """The request as the proxy shows it once it has left `pending`; TimedOut if still pending at `timeout`."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        started = time.monotonic()
        remaining = max(0.0, deadline - started)
        try:
            view = api.status(request_id, wait=remaining)
        except (Refused, Unreachable) as exc:
            if isinstance(exc, Refused) and exc.code != "rate_limited":
                raise
            pause = RECONNECT_PAUSE_SECONDS
            if isinstance(exc, Refused) and exc.retry_after is not None:
                pause = exc.retry_after
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            progress(f"{exc.message}; asking again in {min(pause, left):.0f} s")
            time.sleep(min(pause, left))
            continue
        if view.get("status") != "pending":
            return view
        if time.monotonic() >= deadline:
            raise TimedOut(
                f"no decision within {timeout:g} s; request {request_id} is still pending",
                hint=f"wait longer with `secret-proxy-agent wait {request_id}`, or ask a human to approve it",
                request_id=request_id,
            )
        if time.monotonic() - started < MIN_POLL_SECONDS:
            time.sleep(max(0.0, min(MIN_POLL_SECONDS, deadline - time.monotonic())))
        else:
            progress(f"still pending ({deadline - time.monotonic():.0f} s left)")


def call_of_decided(api: ProxyApi, view: dict[str, Any], call: dict[str, Any]) -> dict[str, Any]:
    """The answer of an approved call, which the proxy makes now (once); Denied or Expired otherwise."""
    request_id, status = str(view.get("id")), view.get("status")
    if status == "approved":
        return api.make_call(request_id, call)
    if status == "denied":
        raise Denied(f"request {request_id} was denied", request_id=request_id)
    if status == "used":
        raise Expired(f"request {request_id}'s call was made already", request_id=request_id)
    raise Expired(f"request {request_id} expired before it was decided or used", request_id=request_id)


def value_of_decided(api: ProxyApi, view: dict[str, Any]) -> str:
    """The value of an approved request (retrieved now, once); Denied or Expired otherwise."""
    request_id, status = str(view.get("id")), view.get("status")
    if status == "approved":
        return api.retrieve(request_id)[1]
    if status == "denied":
        by = f" ({view['decided_by']})" if view.get("decided_by") else ""
        raise Denied(f"request {request_id} was denied{by}", request_id=request_id)
    if status == "retrieved":
        raise Expired(f"request {request_id}'s value was handed out already", request_id=request_id)
    raise Expired(f"request {request_id} expired before it was decided or used", request_id=request_id)
