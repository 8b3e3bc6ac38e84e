"""The proxy's HTTP API from the agent's side, on http.client (standard library only).

http.client rather than urllib on purpose: urllib would send the bearer token
through any HTTP(S)_PROXY in the environment and would follow a redirect to
another host with the Authorization header still on; here the token goes only
to SECRET_PROXY_URL's host. Replies become plain dicts, failures the errors of
errors.py (the response's own `error` code kept on Refused).

Every exchange has a deadline (`until`, on the monotonic clock), not a per-read timeout: a
proxy that accepts and never answers, or answers a byte at a time, is cut off when it
passes. A timer shuts the socket down then, which wakes a read blocked in any thread.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from .errors import Denied, Expired, Refused, TimedOut, Unreachable, UsageError

# Stdlib copies of proxy/wire.py's rules (this package imports nothing else of `proxy`), pinned equal to
# them by tests/test_agent_wire.py.
REQUEST_ID_RE = re.compile(r"^req_[A-Za-z0-9_-]{32}$")
SECRET_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MAX_REASON_CHARS = 1000
STATUSES = ("pending", "approved", "denied", "expired", "retrieved", "used", "cancelled")  # proxy/store.py
MAX_WAIT_SECONDS = 60  # the API's own bound on ?wait= (docs/api.md)
CONNECT_TIMEOUT_SECONDS = 10.0
MAX_REPLY_BYTES = 4 * 1024 * 1024  # a brokered call's answer, in base64 inside JSON


@dataclass(frozen=True)
class ProxyApi:
    url: str
    token: str

    def ask(self, secret: str, reason: str, until: float, ttl: int | None = None) -> dict[str, Any]:
        """POST /v1/requests: {"id", "status", "secret", "expires_at"}."""
        return self._call("POST", "/v1/requests", until, _asking(secret, reason, ttl))

    def ask_call(
        self, secret: str, reason: str, call: dict[str, Any], until: float, ttl: int | None = None
    ) -> dict[str, Any]:
        """POST /v1/calls: ask to use a secret in one exact call (method, url, headers, body_base64)."""
        return self._call("POST", "/v1/calls", until, {**_asking(secret, reason, ttl), **call})

    def make_call(self, request_id: str, until: float) -> dict[str, Any]:
        """POST /v1/requests/ID/call with `{}`: the proxy makes the approved call as asked (it kept it);
        {"status", "headers", "body_base64", "redactions"}."""
        return self._call("POST", f"/v1/requests/{_checked_id(request_id)}/call", until, {}, request_id)

    def status(self, request_id: str, until: float, wait: float = 0) -> dict[str, Any]:
        """GET /v1/requests/ID, held by the proxy up to `wait` seconds while pending."""
        query = f"?wait={min(wait, MAX_WAIT_SECONDS):.1f}" if wait >= 0.1 else ""
        return self._call("GET", f"/v1/requests/{_checked_id(request_id)}{query}", until, None, request_id)

    def retrieve(self, request_id: str, until: float) -> tuple[str, str]:
        """GET /v1/requests/ID/secret: (name, value), once."""
        body = self._call("GET", f"/v1/requests/{_checked_id(request_id)}/secret", until, None, request_id)
        if not isinstance(body.get("value"), str):
            raise Unreachable("the proxy's answer holds no value", request_id=request_id)
        return str(body.get("secret", "")), body["value"]

    def cancel(self, request_id: str, until: float) -> dict[str, Any]:
        """POST /v1/requests/ID/cancel: the request after; `cancelled` says whether this withdrew it."""
        return self._call("POST", f"/v1/requests/{_checked_id(request_id)}/cancel", until, {}, request_id)

    def requests(self, until: float, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """GET /v1/requests: this agent's own requests, newest first."""
        query = f"?limit={limit}" + (f"&status={quote(status, safe='')}" if status else "")
        found = self._call("GET", f"/v1/requests{query}", until).get("requests")
        return [r for r in found if isinstance(r, dict)] if isinstance(found, list) else []

    def secrets(self, until: float) -> list[dict[str, Any]]:
        """GET /v1/secrets: the secrets this agent may ask for and how each may be used (never a value)."""
        found = self._call("GET", "/v1/secrets", until).get("secrets")
        return [s for s in found if isinstance(s, dict)] if isinstance(found, list) else []

    def _call(
        self,
        method: str,
        path: str,
        until: float,
        body: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        try:
            status, headers, raw = self._exchange(method, path, body, until)
        except (Unreachable, TimedOut) as exc:
            if request_id and not exc.request_id:
                exc.request_id = request_id
                exc.hint = f"{exc.hint}; the request outlives this: then `secret-proxy-agent wait {request_id}`"
            raise
        if 300 <= status < 400:
            raise Unreachable(
                f"the proxy answered with a redirect (HTTP {status}), which is never followed: the "
                "token goes only to SECRET_PROXY_URL",
                request_id=request_id,
                hint="set SECRET_PROXY_URL to the address the proxy itself answers at",
            )
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise Unreachable(
                f"the proxy answered HTTP {status} with something that is not a JSON object",
                hint="check that SECRET_PROXY_URL points at the secret proxy itself",
                request_id=request_id,
            )
        if 200 <= status < 300:
            return parsed
        raise _error_for(status, parsed, headers.get("retry-after"), request_id)

    def _exchange(
        self, method: str, path: str, body: dict[str, Any] | None, until: float
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(self.url)
        host = parts.hostname
        if not host:  # load_config refuses such a URL already; a ProxyApi built by hand might not
            raise UsageError(f"not an http(s) base URL: {self.url!r}", hint="set it like http://127.0.0.1:3737")
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise TimedOut("the deadline passed before the proxy was asked", hint=DEADLINE_HINT)
        connect_timeout = min(CONNECT_TIMEOUT_SECONDS, remaining)
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, parts.port, timeout=connect_timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=connect_timeout)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        watchdog = threading.Timer(remaining, _cut, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            conn.sock.settimeout(max(0.01, until - time.monotonic()))  # each read; the watchdog bounds them all
            conn.request(method, parts.path.rstrip("/") + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_REPLY_BYTES + 1)
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw[:MAX_REPLY_BYTES]
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= until - 0.05:
                raise TimedOut(
                    f"the proxy at {self.url} gave no whole answer before the deadline", hint=DEADLINE_HINT
                ) from None
            raise Unreachable(f"cannot reach the proxy at {self.url}: {_describe(exc)}") from None
        finally:
            watchdog.cancel()
            conn.close()


DEADLINE_HINT = "check the proxy (GET /health); give more time with --timeout"


def _cut(conn: http.client.HTTPConnection) -> None:
    """The deadline: wake whatever read or write is blocked on the connection's socket."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _asking(secret: str, reason: str, ttl: int | None) -> dict[str, Any]:
    return {"secret": secret, "reason": reason, **({"ttl_seconds": ttl} if ttl is not None else {})}


def _checked_id(request_id: str) -> str:
    # The id goes into a URL path: nothing but the shape the proxy hands out.
    if not REQUEST_ID_RE.match(request_id):
        raise UsageError(f"not a request id: {request_id!r}", hint="pass the req_... id the proxy gave you")
    return quote(request_id, safe="")


def _error_for(status: int, body: dict[str, Any], retry_after: str | None, request_id: str | None) -> Exception:
    code = str(body.get("error", f"http_{status}"))
    detail = str(body.get("detail", ""))[:500]
    message = f"the proxy refused: {code} ({detail})" if detail else f"the proxy refused: {code}"
    if status >= 500:
        return Unreachable(
            f"the proxy answered HTTP {status} {code}" + (f" ({detail})" if detail else ""),
            hint=HINTS.get(code, "the proxy's operator can see more in its log; try again later"),
            request_id=request_id,
            code=code,
        )
    if code == "denied":
        return Denied("an approver denied the request", request_id=request_id)
    if code in ("expired", "already_retrieved", "already_used"):
        return Expired(f"the proxy refused: {code} ({detail})", request_id=request_id, code=code)
    seconds = _seconds(retry_after)
    hint = HINTS.get(code, "")
    if seconds is not None:
        hint = f"wait {seconds:g} s (the proxy's Retry-After), then ask again"
    return Refused(message, code=code, retry_after=seconds, hint=hint, request_id=request_id)


HINTS = {
    "unauthorized": "check the agent token (SECRET_PROXY_TOKEN or SECRET_PROXY_TOKEN_FILE); the operator may "
    "have revoked it",
    "forbidden": "this agent may not ask for that secret; ask the operator to widen its scope",
    "unknown_secret": "check the secret's name; the operator stores secrets with `python -m proxy secrets set`",
    "rate_limited": "wait a minute, then ask again",
    "not_found": "check the request id; it must be one of this agent's requests (`secret-proxy-agent requests`)",
    "malformed_id": "pass the req_... id the proxy gave you",
    "destination_not_allowed": "the operator's policy for this secret does not list that URL; use a listed "
    "destination or ask the operator (`python -m proxy secrets show NAME`)",
    "address_not_allowed": "the destination resolves to a private or loopback address the policy does not allow",
    "no_policy": "this secret has no use policy: it cannot be used in calls; ask for it with `get`, or ask the "
    "operator to add a policy",
    "broker_only": "this secret is never handed out; use it with `call` (or the MCP tool use_secret_in_call)",
    "call_mismatch": "make exactly the call that was approved (same method, URL, headers and body), or ask again",
    "too_large": "the call's body is over the proxy's limit (broker_max_request_bytes)",
    "too_many_calls": "this agent has as many calls under way as the proxy allows; the approval is still "
    "unused: make the call again when one ends",
    "bad_response": "the destination's answer was not HTTP the proxy accepts; the approval is used up",
    "upstream_unreachable": "the destination did not answer; the approval is used up: ask again when it is back",
    "upstream_timeout": "the destination gave no whole answer within the proxy's broker_timeout_seconds; the "
    "approval is used up",
    "tls_failed": "the destination's certificate did not verify; the approval is used up",
    "response_too_large": "the destination's answer is over the proxy's broker_max_response_bytes; the approval "
    "is used up",
    "internal_error": "the proxy failed inside; its operator can see why in its log",
    "egress_refused": "the host's allow-list does not list this destination; ask the operator "
    "(`takeover egress allow`)",
    "pending": "wait for the decision (`secret-proxy-agent wait ID`)",
    "encoded_response": "the destination compressed its answer in a way the proxy cannot redact; the approval "
    "is used up",
    "invalid_request": "check the name ([A-Za-z0-9_.-], at most 128) and the reason (1-1000 characters)",
}


def _seconds(raw: str | None) -> float | None:
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
