"""A destination that misbehaves on purpose, for brokered-call tests: plain HTTP on 127.0.0.1 over raw
sockets, so it can send what no HTTP library would (bytes one at a time, folded headers, a gzip
Transfer-Encoding, the secret it was sent echoed in any spelling or as a header's name).

Every answer is built from the request it got: the secret's header (`Authorization` or `X-Key`) is
echoed back the way the path names, as an echo service, an error page or a debug endpoint would.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import quote

Send = Callable[[bytes], None]


def _json_escaped(text: bytes) -> bytes:
    """Every non-alphanumeric character as \\uXXXX, `/` as `\\/`: spellings JSON encoders use."""
    out = []
    for ch in text.decode("latin-1"):
        out.append(ch if ch.isalnum() else "\\/" if ch == "/" else f"\\u{ord(ch):04X}")
    return "".join(out).encode()


# How the destination spells the header it got, by the path's last segment.
ECHOES: dict[str, Callable[[bytes, bytes], bytes]] = {
    "raw": lambda line, head: line,
    "b64-line": lambda line, head: base64.b64encode(line),
    "b64-head": lambda line, head: base64.b64encode(head),
    "quote": lambda line, head: quote(line).encode(),  # urllib's default keeps / unencoded
    "quote-twice": lambda line, head: quote(quote(line, safe="")).encode(),
    "hex": lambda line, head: binascii.hexlify(line),
    "hex-upper": lambda line, head: binascii.hexlify(line).upper(),
    "upper": lambda line, head: line.upper(),
    "json-escaped": lambda line, head: b'{"seen": "' + _json_escaped(line) + b'"}',
    "json-b64": lambda line, head: b'{"seen": "' + _json_escaped(base64.b64encode(line)) + b'"}',
}


@dataclass
class Seen:
    path: str
    head: bytes


@dataclass
class HostileUpstream:
    """Listens on 127.0.0.1; `release` lets held answers (/hold) go; `held` counts those waiting."""

    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    held: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> HostileUpstream:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def stop(self) -> None:
        self._stop.set()
        self.release.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")), 0
            )
            while len(body) < min(length, 1 << 20):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
            path = head.split(b" ")[1].decode()
            self.requests.append(Seen(path, head))
            for piece, pause in self._answer(path, head, body):
                if pause:
                    time.sleep(pause)
                conn.sendall(piece)
        except OSError:
            pass  # the proxy hung up, as it should at its deadline
        finally:
            conn.close()

    def _answer(self, path: str, head: bytes, body: bytes = b"") -> Iterator[tuple[bytes, float]]:
        name = path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        line = next(
            (h for h in head.split(b"\r\n") if h.lower().startswith((b"authorization:", b"x-key:"))), b"Missing: -"
        )
        value = line.split(b":", 1)[1].strip()
        if name == "not-http":  # a line server that quotes what it could not parse (Redis, SMTP)
            yield b"-ERR unknown command '" + line + b"'\r\n", 0
        elif name == "bad-header":
            yield b"HTTP/1.1 200 OK\r\nX-Echo " + line + b"\r\nContent-Length: 0\r\n\r\n", 0
        elif name == "echo-body":  # an API that stores and returns what it was sent (a note, a gist)
            yield _response(200, body, [("ETag", f'"{hash(body)}"')]), 0
        elif name in ECHOES:
            yield _response(200, ECHOES[name](line, head)), 0
        elif name in ("gzip", "deflate", "deflate-raw", "gzip-twice"):
            body = line
            if name == "gzip":
                body, coding = gzip.compress(body), "gzip"
            elif name == "gzip-twice":
                body, coding = gzip.compress(gzip.compress(body)), "gzip, gzip"
            elif name == "deflate":
                body, coding = zlib.compress(body), "deflate"
            else:
                raw = zlib.compressobj(wbits=-15)
                body, coding = raw.compress(body) + raw.flush(), "deflate"
            yield _response(200, body, [("Content-Encoding", coding)]), 0
        elif name == "br":
            yield _response(200, b"\x8b\x03\x80" + line + b"\x03", [("Content-Encoding", "br")]), 0
        elif name == "te-gzip":
            body = gzip.compress(line)
            chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            yield b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunked, 0
        elif name == "bomb":
            yield _response(200, gzip.compress(b"\0" * (64 << 20), 9), [("Content-Encoding", "gzip")]), 0
        elif name == "header-name":
            # The token part of the value as a header's name (header names are tokens).
            yield _response(200, b"ok", [(value.split(b" ")[-1].decode("latin-1"), "1")]), 0
        elif name == "header-raw":
            yield _response(200, b"ok", [("X-Echo", value.decode("latin-1"))]), 0
        elif name == "folded":
            cut = len(value) // 2
            folded = value[:cut] + b"\r\n " + value[cut:]  # obs-fold: a line that starts with a space continues
            yield b"HTTP/1.1 200 OK\r\nX-Echo: " + folded + b"\r\nContent-Length: 2\r\n\r\nok", 0
        elif name == "big-headers":
            filler = b"X-Filler-%d: " + b"f" * 60_000 + b"\r\n"
            yield b"HTTP/1.1 200 OK\r\n" + b"".join(filler % i for i in range(95)) + b"Content-Length: 0\r\n\r\n", 0
        elif name.startswith("trickle-"):
            yield from _trickled(name)
        elif name == "hold":
            with self._lock:
                self.held += 1
            try:
                self.release.wait(30)
            finally:
                with self._lock:
                    self.held -= 1
            yield _response(200, b"held"), 0
        else:
            yield _response(200, b"fast"), 0


def _response(status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} OK".encode()]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers or []]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _trickled(name: str) -> Iterator[tuple[bytes, float]]:
    """One byte every 0.2 s, in the part of the answer the name says, for up to 60 s."""
    if name == "trickle-status":
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * 10:
            yield bytes([byte]), 0.2
    elif name == "trickle-headers":
        yield b"HTTP/1.1 200 OK\r\n", 0
        for i in range(300):
            yield b"X-Slow-%d: 1\r\n" % i, 0.2
    elif name == "trickle-chunks":
        yield b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0
        for _ in range(300):
            yield b"1\r\nx\r\n", 0.2
