"""Make an approved call for the agent: the value is injected here and never returned.

The destination is checked against the secret's policy when the call is asked for
(`proxy/calls_api.py`) and again here, at connect time, with the addresses the name resolves
to: a name with any loopback, private, link-local, site-local, multicast, reserved or
metadata address is refused unless the operator allowed private addresses for that
destination. The connection goes to the addresses that were checked, in turn (no second
look-up an attacker's DNS could answer differently), TLS is verified against the system's or
the operator's CA bundle, no redirect is followed, and the request, the answer and the
whole call's time are bounded (`proxy/upstream.py`). Headers that make a server route a
call elsewhere than its URL says (`X-HTTP-Method-Override`, `X-Original-URL`, ...) are
refused unless the secret's policy names them, so an approved GET stays a GET. What comes
back has every rendering of the value the proxy sent removed (`proxy/redact.py`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

from . import redact, upstream
from .config import check_egress_proxy
from .errors import BrokerError
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
# Headers with which a server, or a proxy in front of it, routes a call elsewhere than its method and
# URL say: the approver approved the method and URL. Refused unless the policy names them.
ROUTING_HEADERS = {
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-rewrite-url",
    "x-override-url",
    "x-envoy-original-path",
    "x-forwarded-host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-server",
    "x-forwarded-uri",
    "x-forwarded-path",
    "forwarded",
    "x-host",
    "x-original-host",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-proxy-url",
}
# Cloud metadata endpoints; all but the IPv6 one are also link-local or private, listed to be plain.
METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("100.100.100.200"),
}

Resolver = Callable[[str, int], list[str]]


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
    headers: list[tuple[str, str]]  # the bytes sent, read as Latin-1, after redaction
    body: bytes
    redactions: int
    address: str
    elapsed_seconds: float


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_headers(headers: object, policy: Policy) -> tuple[tuple[str, str], ...]:
    """The agent's headers as (name, value) pairs, or a refusal naming the bad one."""
    if headers is None:
        return ()
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
        raise BrokerError("invalid_request", f"`headers` must be an object of at most {MAX_HEADERS} names")
    injection = policy.injection
    out = []
    for name, value in headers.items():
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}", name):
            raise BrokerError("invalid_request", f"header {name!r}: names are tokens, values strings")
        if not HEADER_VALUE_RE.fullmatch(value):
            raise BrokerError("invalid_request", f"header {name!r}: the value has control characters or is too long")
        if value != value.strip(" \t"):  # HTTP drops it; h11 refuses it, and only after the approval is spent
            raise BrokerError("invalid_request", f"header {name!r}: the value starts or ends with white space")
        lower = name.lower()
        if lower in RESERVED_HEADERS:
            raise BrokerError("invalid_request", f"header {name!r} is set by the proxy, not the agent")
        if (lower in ROUTING_HEADERS or lower.startswith("x-forwarded-")) and lower not in policy.allow_headers:
            raise BrokerError(
                "invalid_request",
                f"header {name!r} makes a server route the call elsewhere than its method and URL say; "
                f"the operator may allow it with `secrets set NAME --allow-header {name}`",
            )
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
    return target, destination, check_headers(headers, policy)


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
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)  # fec0::/10, deprecated but routed inside
        or not ip.is_global
    )


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# Name look-ups block, and redaction of a large answer takes a while; they get threads of their own,
# so a slow resolver or a big answer cannot starve anything else.
_LOOKUPS = ThreadPoolExecutor(4, thread_name_prefix="broker-dns")
_REDACTION = ThreadPoolExecutor(2, thread_name_prefix="broker-redact")


def pick_addresses(target: Target, destination: Destination, addresses: list[str]) -> list[str]:
    """The addresses to try, in order; every address the name has must be allowed, so DNS cannot pick a bad one."""
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
    return addresses


async def _resolve(target: Target, resolve: Resolver) -> list[str]:
    try:
        return await asyncio.get_running_loop().run_in_executor(_LOOKUPS, resolve, target.host_for_connect, target.port)
    except (OSError, UnicodeError) as exc:
        raise BrokerError("upstream_unreachable", f"{target.host} does not resolve: {exc}") from None


@functools.lru_cache(maxsize=8)
def _tls_context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file or None)


def outgoing(
    call: Call, target: Target, headers: Headers, injection: Injection, value: bytes, body: bytes
) -> tuple[upstream.Outgoing, tuple[bytes, ...]]:
    """The request with the value put in, and every rendering of the value it carries (for redaction)."""
    path = target.path_and_query
    out: list[tuple[bytes, bytes]] = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
    renderings: list[bytes] = []
    if injection.kind == "header":
        # Bytes, so a value that is not Latin-1 goes out as its own UTF-8 rather than failing to encode.
        before, _, after = injection.template.partition("{value}")
        line = before.encode() + value + after.encode()
        out.append((injection.name.encode(), line))
        renderings += [line, injection.name.encode() + b": " + line]
    elif injection.kind == "query":
        text = value.decode("utf-8", "surrogateescape")
        param = f"{injection.name}={quote(text, safe='', errors='surrogateescape')}"
        path = target.path + "?" + (f"{target.query}&{param}" if target.query else param)
        renderings += [param.encode(), injection.name.encode() + b"=" + value]
    else:
        user_value = injection.name.encode() + b":" + value
        line = b"Basic " + base64.b64encode(user_value)
        out.append((b"Authorization", line))
        renderings += [user_value, line, b"Authorization: " + line]
    request = upstream.Outgoing(call.method, target.host_for_connect, target.port, path, out, body)
    return request, tuple(renderings)


async def execute(
    policy: Policy, call: Call, body: bytes, value: bytes, limits: Limits, resolve: Resolver = system_resolver
) -> Answer:
    """Make `call` (already approved and claimed) with the value injected, all within the call's deadline."""
    if any(c in value for c in (b"\r", b"\n", b"\x00")):
        raise BrokerError("internal_error", "the stored value has line breaks and cannot go into a call")
    target, destination, headers = check_call(policy, call.method, call.url, dict(call.headers))
    assert policy.injection is not None
    request, renderings = outgoing(call, target, headers, policy.injection, value, body)
    spellings = redact.forms(value, renderings)
    tls = _tls_context(limits.ca_file) if target.scheme == "https" else None
    started = time.monotonic()
    try:
        async with asyncio.timeout(limits.timeout_seconds):
            if limits.egress_proxy:
                # The guest has no DNS and no route but the host's forward proxy, which resolves the name
                # and holds the allow-list (takeover/egress.py); its rules keep inside addresses out too.
                via = check_egress_proxy(limits.egress_proxy)
                addresses: list[str] = []
                address = f"{target.host_for_connect}:{target.port} via {limits.egress_proxy}"
            else:
                via = None
                addresses = pick_addresses(target, destination, await _resolve(target, resolve))
                address = addresses[0]
            reader, writer = await upstream.connect(request, addresses, via, tls)
            try:
                if not via:
                    address = str(writer.get_extra_info("peername", (address,))[0])
                incoming = await upstream.exchange(reader, writer, request, limits.max_response_bytes)
            finally:
                writer.transport.abort()
    except BrokerError as exc:
        # A last line: no detail that reaches the agent may carry the value (upstream.py writes none).
        exc.detail, _ = redact.redact_text(exc.detail, spellings)
        exc.args = (exc.detail,)
        raise
    except TimeoutError:
        raise BrokerError(
            "upstream_timeout", f"the destination did not answer within {limits.timeout_seconds:g} s"
        ) from None
    except ssl.SSLError as exc:
        raise BrokerError("tls_failed", f"TLS with {target.host} failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise BrokerError("upstream_unreachable", f"the call to {target.host} failed: {type(exc).__name__}") from None
    # Off the event loop: a megabyte of escapes costs a few tenths of a second, more under TCG.
    loop = asyncio.get_running_loop()
    body, count = await loop.run_in_executor(_REDACTION, redact.withhold_if_held, incoming.body, spellings)
    fields: list[tuple[bytes, bytes]] = []
    for raw_name, raw_value in incoming.headers:
        name, n = redact.redact_field(raw_name, spellings)
        clean, m = redact.redact_field(raw_value, spellings)
        count += n + m
        fields.append((name, clean))
    answer_headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in _consistent(fields, body, count > 0)]
    return Answer(incoming.status, answer_headers, body, count, address, time.monotonic() - started)


# Headers computed over the body as the destination sent it: after a redaction their values would tell
# the agent the length of what was taken out, or let it test guesses of a short value offline.
BODY_DIGEST_HEADERS = {b"etag", b"content-md5", b"digest", b"content-digest", b"repr-digest"}


def _consistent(headers: list[tuple[bytes, bytes]], body: bytes, changed: bool) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers:
        lower = name.lower()
        if changed and lower in BODY_DIGEST_HEADERS:
            continue
        out.append((name, str(len(body)).encode() if lower == b"content-length" else value))
    return out
