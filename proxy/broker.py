"""Make an approved call for the agent: the value is injected here and never returned.

The destination is checked against the secret's policy when the call is asked for
(`proxy/api.py`) and again here, at connect time, with the address the name resolves
to: a name that resolves to a loopback, private, link-local, multicast, reserved or
metadata address is refused unless the operator allowed private addresses for that
destination. The connection goes to the address that was checked (no second look-up
an attacker's DNS could answer differently), TLS is verified against the system's or
the operator's CA bundle, no redirect is followed, and the request, the response and
the time are bounded. What comes back has the value removed (`proxy/redact.py`).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import redact
from .config import check_egress_proxy
from .policy import Destination, Injection, Policy, PolicyError, Target, parse_url

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MAX_HEADERS = 50
HEADER_VALUE_RE = re.compile(r"[\x20-\x7e\x80-\xff\t]{0,8192}")
# Headers the proxy owns: framing, routing and hop-by-hop ones; the agent may not set them.
RESERVED_HEADERS = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "proxy-authorization",
    "proxy-connection",
    # a compressed answer would carry the value past redaction
    "accept-encoding",
}
# Cloud metadata endpoints; all but the IPv6 one are also link-local or private, listed to be plain.
METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("100.100.100.200"),
}

Resolver = Callable[[str, int], list[str]]


class BrokerError(Exception):
    """A call refused or failed; `code` is the API's error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Call:
    """The exact call an approval covers."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body_sha256: str
    body_size: int

    @property
    def target(self) -> Target:
        return parse_url(self.url)


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int
    max_response_bytes: int
    timeout_seconds: float
    ca_file: str  # "" for the system's bundle
    egress_proxy: str = ""  # the host's forward proxy: a CONNECT tunnel through it, names resolved there


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    redactions: int
    address: str
    elapsed_seconds: float


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_headers(headers: object, injection: Injection | None) -> tuple[tuple[str, str], ...]:
    """The agent's headers as (name, value) pairs, or a refusal naming the bad one."""
    if headers is None:
        return ()
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
        raise BrokerError("invalid_request", f"`headers` must be an object of at most {MAX_HEADERS} names")
    out = []
    for name, value in headers.items():
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}", name):
            raise BrokerError("invalid_request", f"header {name!r}: names are tokens, values strings")
        if not HEADER_VALUE_RE.fullmatch(value):
            raise BrokerError("invalid_request", f"header {name!r}: the value has control characters or is too long")
        lower = name.lower()
        if lower in RESERVED_HEADERS:
            raise BrokerError("invalid_request", f"header {name!r} is set by the proxy, not the agent")
        if (
            injection is not None
            and injection.kind in ("header", "basic")
            and lower == (injection.name.lower() if injection.kind == "header" else "authorization")
        ):
            raise BrokerError("invalid_request", f"header {name!r} is where the proxy puts the secret")
        out.append((name, value))
    return tuple(sorted(out, key=lambda h: (h[0].lower(), h[1])))


Headers = tuple[tuple[str, str], ...]


def check_call(
    policy: Policy | None, method: object, url: object, headers: object
) -> tuple[Target, Destination, Headers]:
    """Refuse a call the policy does not allow, before anyone is asked and before any connection."""
    if policy is None or not policy.destinations or policy.injection is None:
        raise BrokerError(
            "no_policy",
            "this secret has no use policy; the operator must add one with `secrets set NAME --allow URL --inject ...`",
        )
    if method not in METHODS:
        raise BrokerError("invalid_request", f"`method` must be one of {', '.join(METHODS)}")
    try:
        target = parse_url(url)  # type: ignore[arg-type]
    except PolicyError as exc:
        raise BrokerError("invalid_request", f"`url`: {exc}") from None
    destination = policy.destination_for(target)
    if destination is None:
        raise BrokerError(
            "destination_not_allowed",
            f"{target.scheme}://{target.host}:{target.port}{target.path} is not a destination "
            "this secret may be sent to",
        )
    if policy.injection.kind == "query" and any(
        p.partition("=")[0] == policy.injection.name for p in target.query.split("&")
    ):
        raise BrokerError("invalid_request", f"query parameter {policy.injection.name!r} is set by the proxy")
    return target, destination, check_headers(headers, policy.injection)


def blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip in METADATA
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def pick_address(target: Target, destination: Destination, resolve: Resolver) -> str:
    """The address to connect to; every address the name has must be allowed, so DNS cannot pick a bad one."""
    try:
        addresses = resolve(target.host_for_connect, target.port)
    except (OSError, UnicodeError) as exc:
        raise BrokerError("upstream_unreachable", f"{target.host} does not resolve: {exc}") from None
    if not addresses:
        raise BrokerError("upstream_unreachable", f"{target.host} does not resolve")
    if not destination.allow_private:
        bad = [a for a in addresses if blocked(a)]
        if bad:
            raise BrokerError(
                "address_not_allowed",
                f"{target.host} resolves to {bad[0]}, a loopback, private, link-local or metadata "
                "address; the operator must allow private addresses for this destination",
            )
    return addresses[0]


class _PinnedConnection(http.client.HTTPSConnection):
    """HTTP(S) to an address already checked, with TLS verified for the URL's host name."""

    def __init__(self, target: Target, address: str, context: ssl.SSLContext | None, timeout: float) -> None:
        super().__init__(target.host_for_connect, target.port, timeout=timeout, context=context)
        self._address = address
        self._tls = context is not None

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        if self._tls:
            sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
        self.sock = sock


TUNNEL_REFUSED = re.compile(r"Tunnel connection failed: (\d{3})\b.{0,80}")


def _tunnel(target: Target, limits: Limits, context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    """A connection to the forward proxy that CONNECTs to the target; TLS is end to end, for the URL's name."""
    host, port = check_egress_proxy(limits.egress_proxy)
    conn: http.client.HTTPConnection
    if context is not None:
        conn = _QuickAckHTTPS(host, port, timeout=limits.timeout_seconds, context=context)
    else:
        conn = _QuickAckHTTP(host, port, timeout=limits.timeout_seconds)
    conn.set_tunnel(target.host_for_connect, target.port)
    return conn


def _quick_ack(sock: socket.socket | None) -> None:
    # tinyproxy relays without TCP_NODELAY: its second small write waits for our ACK, which Linux
    # delays by 40 ms unless asked not to. The flag does not stick, so it is set after every send.
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass


class _QuickAckHTTP(http.client.HTTPConnection):
    def send(self, data: Any) -> None:
        super().send(data)
        _quick_ack(self.sock)


class _QuickAckHTTPS(_QuickAckHTTP, http.client.HTTPSConnection):
    def connect(self) -> None:  # the TLS handshake's last flight, too
        super().connect()
        _quick_ack(self.sock)


def _failed(target: Target, exc: Exception) -> BrokerError:
    refused = TUNNEL_REFUSED.match(str(exc)) if isinstance(exc, OSError) else None
    if refused is None:
        return BrokerError("upstream_unreachable", f"the call to {target.host} failed: {type(exc).__name__}")
    if refused.group(1) == "403":  # tinyproxy's answer for a target its filter does not list
        return BrokerError(
            "egress_refused",
            f"the host's egress allow-list does not list {target.host}:{target.port}; the operator adds it "
            f"with `python -m takeover egress allow {target.scheme}://{target.host}:{target.port}`",
        )
    return BrokerError(
        "upstream_unreachable", f"the host's forward proxy could not reach {target.host}: {refused.group(0)}"
    )


def _inject(
    target: Target, headers: tuple[tuple[str, str], ...], injection: Injection, value: bytes
) -> tuple[str, list[tuple[str, str | bytes]]]:
    text = value.decode("utf-8", "surrogateescape")
    path = target.path_and_query
    out: list[tuple[str, str | bytes]] = list(headers)
    if injection.kind == "header":
        # Bytes, so a value that is not Latin-1 goes out as its own UTF-8 rather than failing to encode.
        before, _, after = injection.template.partition("{value}")
        out.append((injection.name, before.encode() + value + after.encode()))
    elif injection.kind == "query":
        from urllib.parse import quote

        param = f"{injection.name}={quote(text, safe='', errors='surrogateescape')}"
        path = target.path + "?" + (f"{target.query}&{param}" if target.query else param)
    else:
        token = base64.b64encode(injection.name.encode() + b":" + value).decode()
        out.append(("Authorization", f"Basic {token}"))
    return path, out


def execute(
    policy: Policy, call: Call, body: bytes, value: bytes, limits: Limits, resolve: Resolver = system_resolver
) -> Answer:
    """Make `call` (already approved and claimed) with the value injected; blocking, run it in a thread."""
    if any(c in value for c in (b"\r", b"\n", b"\x00")):
        raise BrokerError("internal_error", "the stored value has line breaks and cannot go into a call")
    target, destination, headers = check_call(policy, call.method, call.url, dict(call.headers))
    assert policy.injection is not None
    started = time.monotonic()
    deadline = started + limits.timeout_seconds
    context = None
    if target.scheme == "https":
        context = ssl.create_default_context(cafile=limits.ca_file or None)
    conn: http.client.HTTPConnection
    if limits.egress_proxy:
        # The guest has no DNS and no route but the host's forward proxy, which resolves the name
        # and holds the allow-list (takeover/egress.py); its rules keep inside addresses out too.
        address = f"{target.host_for_connect}:{target.port} via {limits.egress_proxy}"
        conn = _tunnel(target, limits, context)
    else:
        address = pick_address(target, destination, resolve)
        conn = _PinnedConnection(target, address, context, limits.timeout_seconds)
    path, sent_headers = _inject(target, headers, policy.injection, value)
    spellings = redact.forms(
        value, (policy.injection.name.encode() + b":" + value,) if policy.injection.kind == "basic" else ()
    )
    try:
        conn.putrequest(call.method, path, skip_accept_encoding=True)
        for name, val in sent_headers:
            conn.putheader(name, val)
        if body or call.method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Accept-Encoding", "identity")  # a compressed body could hide the value from redaction
        conn.endheaders(body or None)
        if conn.sock is not None:  # the answer's head, too, within what is left of the deadline
            conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
        response = conn.getresponse()
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    "upstream_timeout", f"the destination did not answer within {limits.timeout_seconds:g} s"
                )
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            chunk = response.read1(65536) if call.method != "HEAD" else b""
            if not chunk:
                break
            size += len(chunk)
            if size > limits.max_response_bytes:
                raise BrokerError(
                    "response_too_large", f"the destination's answer is over {limits.max_response_bytes} bytes"
                )
            chunks.append(chunk)
        raw_headers = response.getheaders()
        status = response.status
    except ssl.SSLError as exc:
        raise BrokerError("tls_failed", f"TLS with {target.host} failed: {exc.reason or exc}") from None
    except TimeoutError:
        raise BrokerError(
            "upstream_timeout", f"the destination did not answer within {limits.timeout_seconds:g} s"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _failed(target, exc) from None
    finally:
        conn.close()
    answer_body, count = redact.redact(b"".join(chunks), spellings)
    answer_headers = []
    for name, val in raw_headers:
        clean, n = redact.redact_text(val, spellings)
        count += n
        answer_headers.append((name, clean))
    return Answer(status, answer_headers, answer_body, count, address, time.monotonic() - started)
