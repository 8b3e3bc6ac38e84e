"""The proxy's HTTP API from the agent's side, on http.client (standard library only).

http.client rather than urllib on purpose: urllib would send the bearer token
through any HTTP(S)_PROXY in the environment and would follow a redirect to
another host with the Authorization header still on; here the token goes only
to SECRET_PROXY_URL's host. Replies become plain dicts, failures the errors of
errors.py (the response's own `error` code kept on Refused).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from .errors import Denied, Expired, Refused, Unreachable, UsageError

REQUEST_ID_RE = re.compile(r"^req_[A-Za-z0-9_-]{32}$")  # proxy/wire.py REQUEST_ID, pinned by a test
MAX_WAIT_SECONDS = 60  # the API's own bound on ?wait= (docs/api.md)
READ_TIMEOUT_SECONDS = MAX_WAIT_SECONDS + 15
CONNECT_TIMEOUT_SECONDS = 10.0
MAX_REPLY_BYTES = 4 * 1024 * 1024  # a brokered call's answer, in base64 inside JSON


@dataclass(frozen=True)
class ProxyApi:
    url: str
    token: str
    timeout: float = READ_TIMEOUT_SECONDS

    def ask(self, secret: str, reason: str) -> dict[str, Any]:
        """POST /v1/requests: {"id", "status", "secret", "expires_at"}."""
        return self._call("POST", "/v1/requests", {"secret": secret, "reason": reason})

    def ask_call(self, secret: str, reason: str, call: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/calls: ask to use a secret in one exact call (method, url, headers, body_base64)."""
        return self._call("POST", "/v1/calls", {"secret": secret, "reason": reason, **call})

    def make_call(self, request_id: str, call: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/requests/ID/call: the proxy makes the approved call; {"status", "headers", "body_base64"}."""
        return self._call("POST", f"/v1/requests/{_checked_id(request_id)}/call", call, request_id=request_id)

    def status(self, request_id: str, wait: float = 0) -> dict[str, Any]:
        """GET /v1/requests/ID, held by the proxy up to `wait` seconds while pending."""
        query = f"?wait={min(wait, MAX_WAIT_SECONDS):.1f}" if wait > 0 else ""
        return self._call("GET", f"/v1/requests/{_checked_id(request_id)}{query}", request_id=request_id)

    def retrieve(self, request_id: str) -> tuple[str, str]:
        """GET /v1/requests/ID/secret: (name, value), once."""
        body = self._call("GET", f"/v1/requests/{_checked_id(request_id)}/secret", request_id=request_id)
        if not isinstance(body.get("value"), str):
            raise Unreachable("the proxy's answer holds no value", request_id=request_id)
        return str(body.get("secret", "")), body["value"]

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        status, headers, raw = self._exchange(method, path, body)
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

    def _exchange(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(self.url)
        host = parts.hostname
        if not host:  # load_config refuses such a URL already; a ProxyApi built by hand might not
            raise UsageError(f"not an http(s) base URL: {self.url!r}", hint="set it like http://127.0.0.1:3737")
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, parts.port, timeout=CONNECT_TIMEOUT_SECONDS, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=CONNECT_TIMEOUT_SECONDS)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.connect()
            conn.sock.settimeout(self.timeout)  # a held ?wait= answers late; connecting should not
            conn.request(method, parts.path.rstrip("/") + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_REPLY_BYTES + 1)
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw[:MAX_REPLY_BYTES]
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"cannot reach the proxy at {self.url}: {_describe(exc)}") from None
        finally:
            conn.close()


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
            f"the proxy failed: HTTP {status} {code}",
            hint="see the proxy's log; try again later",
            request_id=request_id,
        )
    if code == "denied":
        return Denied("an approver denied the request", request_id=request_id)
    if code in ("expired", "already_retrieved", "already_used"):
        return Expired(f"the request is {code.replace('_', ' ')} ({detail})", request_id=request_id)
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
    "not_found": "check the request id; it must be one of this agent's requests",
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
