"""One HTTP/1.1 exchange with a destination, every part of it bounded.

The broker (`proxy/broker.py`) decides where a call may go; this module carries it out:
connect (to checked addresses in turn, or through the host's forward proxy with CONNECT),
TLS verified for the URL's host name, send the request, read the answer. The caller holds
one deadline over all of it, so a destination that trickles its status line, its headers or
its chunk sizes one byte at a time still ends at the deadline (the exchange is async: a slow
call holds no thread). The answer's head is bounded in bytes and in header count, its body in
bytes after decoding. A body sent with a `Content-Encoding` (despite `Accept-Encoding:
identity`) is decoded here, bounded against a decompression bomb, so that redaction reads what
the agent would read; an encoding this module cannot decode, or any `Transfer-Encoding` but
chunked, is refused rather than passed on unread.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import zlib
from dataclasses import dataclass

import h11

from .errors import BrokerError

MAX_HEAD_BYTES = 64 * 1024
MAX_RESPONSE_HEADERS = 100
MAX_INFORMATIONAL = 5
MAX_CONTENT_CODINGS = 3
READ_SIZE = 65536
# Content codings by their registered names: the ones an error may name (RFC 9110 and IANA's registry).
KNOWN_CODINGS = {"br", "compress", "x-compress", "zstd", "dcb", "dcz", "exi", "pack200-gzip", "aes128gcm"}
_CONNECT_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})([^\r\n]{0,80})")


@dataclass(frozen=True)
class Outgoing:
    """The request as it goes on the wire; `host` is the URL's (for SNI, the certificate and `Host`)."""

    method: str
    host: str
    port: int
    target: str  # path and query
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class Incoming:
    status: int
    headers: list[tuple[bytes, bytes]]  # as sent, names in their own case; Content-Encoding dropped if decoded
    body: bytes  # decoded from any Content-Encoding


def _quick_ack(writer: asyncio.StreamWriter) -> None:
    # tinyproxy relays without TCP_NODELAY: its second small write waits for our ACK, which Linux
    # delays by 40 ms unless asked not to. The flag does not stick, so it is set around every read.
    sock = writer.get_extra_info("socket")
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass


async def _open_first(addresses: list[str], port: int, host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the first of `addresses` that accepts one (each was checked already)."""
    last: OSError | None = None
    for address in addresses:
        try:
            return await asyncio.open_connection(address, port)
        except OSError as exc:
            last = exc
    raise BrokerError(
        "upstream_unreachable", f"the call to {host} failed: no address accepted a connection ({type(last).__name__})"
    )


async def _tunnel(proxy: tuple[str, int], host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A CONNECT tunnel through the host's forward proxy, which resolves the name and holds the allow-list."""
    try:
        reader, writer = await asyncio.open_connection(*proxy)
    except OSError as exc:
        raise BrokerError(
            "upstream_unreachable", f"the host's forward proxy at {proxy[0]}:{proxy[1]} is unreachable: {exc.strerror}"
        ) from None
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    _quick_ack(writer)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        raise BrokerError("upstream_unreachable", "the host's forward proxy gave no usable answer to CONNECT") from None
    status = _CONNECT_STATUS.match(head)
    if status is not None and status.group(1) == b"200":
        return reader, writer
    writer.close()
    if status is not None and status.group(1) == b"403":  # tinyproxy's answer for a target its filter does not list
        raise BrokerError(
            "egress_refused",
            f"the host's egress allow-list does not list {host}:{port}; the operator adds it "
            f"with `python -m takeover egress allow https://{authority}`",
        )
    said = f"status {status.group(1).decode()}" if status else "no HTTP status"
    raise BrokerError("upstream_unreachable", f"the host's forward proxy could not reach {host}: {said}")


async def connect(
    out: Outgoing, addresses: list[str], egress_proxy: tuple[str, int] | None, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if egress_proxy is not None:
        reader, writer = await _tunnel(egress_proxy, out.host, out.port)
    else:
        reader, writer = await _open_first(addresses, out.port, out.host)
    if tls is not None:
        try:
            await writer.start_tls(tls, server_hostname=out.host)
        except ssl.SSLError as exc:
            writer.close()
            raise BrokerError("tls_failed", f"TLS with {out.host} failed: {exc.reason or exc}") from None
    return reader, writer


def _request_bytes(conn: h11.Connection, out: Outgoing) -> bytes:
    default = 443 if out.port == 443 else 80
    host = f"[{out.host}]" if ":" in out.host else out.host
    authority = host if out.port == default else f"{host}:{out.port}"
    headers = [(b"Host", authority.encode()), *out.headers, (b"Connection", b"close")]
    if out.body or out.method in ("POST", "PUT", "PATCH"):
        headers.append((b"Content-Length", str(len(out.body)).encode()))
    data = conn.send(h11.Request(method=out.method, target=out.target, headers=headers)) or b""
    if out.body:
        data += conn.send(h11.Data(data=out.body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


def _too_large(limit: int, what: str) -> BrokerError:
    return BrokerError("response_too_large", f"the destination's {what} is over {limit} bytes")


def _decode(body: bytes, codings: list[str], limit: int) -> bytes:
    """`body` with its content codings undone, last applied first; never more than `limit` bytes out."""
    if len(codings) > MAX_CONTENT_CODINGS:
        raise BrokerError("encoded_response", f"the destination's answer is encoded {len(codings)} times over")
    for coding in reversed(codings):
        if coding in ("", "identity"):
            continue
        if coding in ("gzip", "x-gzip"):
            wbits = [zlib.MAX_WBITS | 16]
        elif coding == "deflate":  # RFC 9110's deflate is zlib-wrapped; some servers send it raw
            wbits = [zlib.MAX_WBITS, -zlib.MAX_WBITS]
        else:
            # Only a coding's registered name is repeated: anything else the destination wrote could be the value.
            named = repr(coding) if coding in KNOWN_CODINGS else "a coding it does not know"
            raise BrokerError(
                "encoded_response",
                f"the destination encoded its answer with {named}, which the proxy cannot decode to redact; "
                "it was asked for identity",
            )
        body = _inflate(body, wbits, limit)
    return body


def _inflate(data: bytes, wbits_choices: list[int], limit: int) -> bytes:
    for i, wbits in enumerate(wbits_choices):
        out = bytearray()
        rest = data
        try:
            while rest:  # gzip allows several members one after another
                inflater = zlib.decompressobj(wbits)
                out += inflater.decompress(rest, limit + 1 - len(out))
                if len(out) > limit or inflater.unconsumed_tail:
                    raise _too_large(limit, "answer, decompressed,")
                if not inflater.eof:
                    raise zlib.error("truncated")
                rest = inflater.unused_data
            return bytes(out)
        except zlib.error:
            if i == len(wbits_choices) - 1:
                raise BrokerError(
                    "bad_response", "the destination's answer does not decode as its Content-Encoding says"
                ) from None
    raise AssertionError("unreachable")


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, out: Outgoing, max_body: int
) -> Incoming:
    """Send `out` and read the whole answer; the caller bounds the time."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    writer.write(_request_bytes(conn, out))
    await writer.drain()
    _quick_ack(writer)
    response: h11.Response | None = None
    informational = 0
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                _quick_ack(writer)
                conn.receive_data(await reader.read(READ_SIZE))
            elif isinstance(event, h11.InformationalResponse):
                informational += 1
                if informational > MAX_INFORMATIONAL:
                    raise BrokerError("bad_response", "the destination sent too many 1xx answers")
            elif isinstance(event, h11.Response):
                if len(event.headers) > MAX_RESPONSE_HEADERS:
                    raise BrokerError(
                        "response_too_large", f"the destination's answer has over {MAX_RESPONSE_HEADERS} headers"
                    )
                response = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_body:
                    raise _too_large(max_body, "answer")
                chunks.append(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    except h11.RemoteProtocolError as exc:
        # h11's message quotes the offending line, which may be the value echoed back: never pass it on.
        if response is None and "buffer" in str(exc).lower():
            raise _too_large(MAX_HEAD_BYTES, "answer's head") from None
        if "Transfer-Encoding" in str(exc):
            raise BrokerError(
                "bad_response", "the destination used a Transfer-Encoding other than chunked, which the proxy refuses"
            ) from None
        raise BrokerError(
            "bad_response",
            "the destination's answer is not HTTP/1.1 the proxy accepts (a malformed status line, header or chunk)",
        ) from None
    if response is None:
        raise BrokerError("bad_response", "the destination closed the connection without an answer")
    headers = list(response.headers.raw_items())
    codings = [
        c.strip().lower()
        for name, value in headers
        if name.lower() == b"content-encoding"
        for c in value.decode("latin-1").split(",")
    ]
    body = b"".join(chunks)
    if any(c not in ("", "identity") for c in codings):
        body = _decode(body, codings, max_body)
        # Content-Length is the broker's to set, over the body the agent finally gets (broker._consistent).
        headers = [(n, v) for n, v in headers if n.lower() != b"content-encoding"]
    return Incoming(response.status_code, headers, body)
