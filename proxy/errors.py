"""Every refusal and failure of the proxy has a stable code, answered as `{"error": CODE, "detail": TEXT}`,
never HTML, with the HTTP status `STATUS[CODE]`. One base, one handler:

    ProxyError(code, detail, headers)   what every one carries; `on_proxy_error` answers it
    ├── ApiError      the HTTP layer refused: bad input, a budget, an id of the wrong shape
    ├── StoreError    the store refused; `kind` is how the audit names it, `secret` the secret involved
    └── BrokerError   a brokered call was refused or failed (proxy/broker.py, proxy/upstream.py)

The CLI prints the same code and detail. The model followed is httpx's `_exceptions.py`: a tree
drawn where it is defined, each name saying what went wrong.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

# Where the handler leaves the code it answered with, for the request counter (proxy/metrics.py).
OUTCOME_KEY = "secret_proxy.outcome"

# The HTTP status each code answers with; the codes are the API's contract.
STATUS = {
    "invalid_request": 400,
    "malformed_id": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "denied": 403,
    "broker_only": 403,
    "no_policy": 403,
    "destination_not_allowed": 403,
    "address_not_allowed": 403,
    "call_mismatch": 403,
    "not_found": 404,
    "unknown_secret": 404,
    "method_not_allowed": 405,
    "pending": 409,
    "expired": 410,
    "already_retrieved": 410,
    "already_used": 410,
    "too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "internal_error": 500,
    "upstream_unreachable": 502,
    "egress_refused": 403,
    "tls_failed": 502,
    "response_too_large": 502,
    "bad_response": 502,
    "encoded_response": 502,
    "too_many_calls": 429,
    "upstream_timeout": 504,
}


class ProxyError(Exception):
    def __init__(self, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers or {}


class ApiError(ProxyError):
    """Refused by the HTTP layer before the store was asked."""


class StoreError(ProxyError):
    """A refusal by the store with a stable code that the API and the CLI report as is.

    `kind` is what the audit log calls it when it differs from the code (a full
    pending queue answers `rate_limited`, audited as `too_many_pending`); `secret`
    names the secret involved, for that entry. Refusals of an agent's call are
    audited by the caller (`proxy/refusals.py`), which counts repeats.
    """

    def __init__(self, code: str, detail: str, *, kind: str | None = None, secret: str | None = None) -> None:
        super().__init__(code, detail)
        self.kind = kind or code
        self.secret = secret


class BrokerError(ProxyError):
    """A brokered call refused or failed."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code, detail)


def error_response(code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=STATUS[code], headers=headers)


async def on_proxy_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProxyError)
    request.scope[OUTCOME_KEY] = exc.code
    return error_response(exc.code, exc.detail, exc.headers)


async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    request.scope[OUTCOME_KEY] = code
    return error_response(code, str(exc.detail))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The exception text may hold anything; the client gets a fixed message.
    return error_response("internal_error", "the proxy hit an internal error; see its log")
