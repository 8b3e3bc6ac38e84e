"""A write-only NBD server on one socket: how the agent's flattened disk reaches root's file.

The agent's `qemu-img convert` runs sandboxed as the agent (takeover/agent/sandbox.py)
and writes the disk's raw bytes to this server over a socketpair; the server writes
them into a file root created 0600. The other end is hostile: it may send any bytes.
So the server is small and in Python (no memory bugs to aim at), speaks only what
`qemu-img` needs of the NBD protocol (fixed newstyle, NBD_OPT_GO, simple replies;
WRITE, WRITE_ZEROES, FLUSH, READ, DISC), bounds every length and offset, stops when
the file's allocated bytes would pass a budget (so the agent cannot fill the host's
filesystem), and gives up on a peer that stays silent. Everything else is refused.
Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from dataclasses import dataclass

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP, REP_ERR_INVALID = 1, 3, 2**31 + 1, 2**31 + 3
INFO_EXPORT = 0
TFLAG_HAS_FLAGS, TFLAG_SEND_FLUSH, TFLAG_SEND_WRITE_ZEROES = 1, 4, 64
TRANSMISSION_FLAGS = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_WRITE_ZEROES
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_WRITE_ZEROES = 0, 1, 2, 3, 6

MAX_OPTION_BYTES = 4096
MAX_OPTIONS = 32
MAX_PAYLOAD = 32 * 2**20  # the NBD default maximum; qemu-img never sends more
ZERO_CHUNK = bytes(2**20)


class SinkError(Exception):
    """The peer broke the protocol, stalled, or went over the budget; the file is not to be used."""

    def __init__(self, message: str, *, over_budget: bool = False) -> None:
        super().__init__(message)
        self.over_budget = over_budget


@dataclass(frozen=True)
class SinkResult:
    written: int  # bytes received in WRITE requests
    allocated: int  # bytes the file takes on disk afterwards
    requests: int


def serve_writes(
    sock: socket.socket, fd: int, size: int, *, budget: int, idle_timeout: float, deadline: float
) -> SinkResult:
    """Serve one NBD client on `sock`, exporting `fd` (a file of `size` bytes) until it disconnects.

    `budget` caps the file's allocated bytes; `idle_timeout` caps any one wait for the peer;
    `deadline` (time.monotonic()) caps the whole session. Raises SinkError on anything else.
    """
    conn = _Conn(sock, idle_timeout, deadline)
    _handshake(conn, size)
    written = requests = 0
    while True:
        magic, _flags, kind, handle, offset, length = struct.unpack(">IHHQQI", conn.recv(28))
        requests += 1
        if magic != REQUEST_MAGIC:
            raise SinkError(f"bad NBD request magic {magic:#x}")
        if kind == CMD_DISC:
            break
        if kind == CMD_FLUSH:
            os.fsync(fd)
            conn.reply(handle)
            continue
        if kind not in (CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES):
            conn.reply(handle, errno.EINVAL)
            continue
        if length > MAX_PAYLOAD:
            raise SinkError(f"NBD request of {length} bytes is larger than {MAX_PAYLOAD}")
        data = conn.recv(length) if kind == CMD_WRITE else b""
        if offset + length > size:
            conn.reply(handle, errno.ENOSPC)  # what the protocol says for a write past the end
            continue
        if kind == CMD_READ:
            conn.reply(handle, 0, os.pread(fd, length, offset).ljust(length, b"\0"))
            continue
        if kind == CMD_WRITE:
            written += length
            if data.count(0) != length or _has_data(fd, offset, length):
                _pwrite_all(fd, data, offset)
        else:
            _write_zeroes(fd, offset, length)
        allocated = os.fstat(fd).st_blocks * 512
        if allocated > budget:
            conn.reply(handle, errno.ENOSPC)
            raise SinkError(f"the flattened disk took more than {budget / 2**20:.0f} MiB", over_budget=True)
        conn.reply(handle)
    return SinkResult(written, os.fstat(fd).st_blocks * 512, requests)


class _Conn:
    def __init__(self, sock: socket.socket, idle_timeout: float, deadline: float) -> None:
        self.sock, self.idle_timeout, self.deadline = sock, idle_timeout, deadline

    def recv(self, count: int) -> bytes:
        buf = bytearray()
        while len(buf) < count:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise SinkError("the agent's qemu-img did not finish in time")
            self.sock.settimeout(min(self.idle_timeout, left))
            try:
                chunk = self.sock.recv(min(count - len(buf), 4 * 2**20))
            except TimeoutError:
                raise SinkError(f"the agent's qemu-img sent nothing for {self.idle_timeout:.0f} s") from None
            except OSError as exc:
                raise SinkError(f"the connection to the agent's qemu-img failed: {exc.strerror}") from None
            if not chunk:
                raise SinkError("the agent's qemu-img closed the connection in the middle of a message")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.settimeout(max(0.1, min(self.idle_timeout, self.deadline - time.monotonic())))
        try:
            self.sock.sendall(data)
        except (TimeoutError, OSError) as exc:
            raise SinkError(f"cannot answer the agent's qemu-img: {exc}") from None

    def reply(self, handle: int, error: int = 0, data: bytes = b"") -> None:
        self.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle) + data)

    def option_reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QIII", OPT_REPLY_MAGIC, option, kind, len(data)) + data)


def _handshake(conn: _Conn, size: int) -> None:
    conn.send(NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    (client_flags,) = struct.unpack(">I", conn.recv(4))
    if client_flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        raise SinkError(f"unknown NBD client flags {client_flags:#x}")
    export = struct.pack(">QH", size, TRANSMISSION_FLAGS)
    for _ in range(MAX_OPTIONS):
        magic, option, length = struct.unpack(">QII", conn.recv(16))
        if magic != IHAVEOPT:
            raise SinkError(f"bad NBD option magic {magic:#x}")
        if length > MAX_OPTION_BYTES:
            raise SinkError(f"NBD option of {length} bytes")
        data = conn.recv(length)
        if option == OPT_EXPORT_NAME:
            conn.send(export + (b"" if client_flags & FLAG_NO_ZEROES else bytes(124)))
            return
        if option == OPT_ABORT:
            conn.option_reply(option, REP_ACK)
            raise SinkError("the agent's qemu-img aborted the NBD negotiation")
        if option in (OPT_INFO, OPT_GO):
            if not _valid_info_request(data):
                conn.option_reply(option, REP_ERR_INVALID)
                continue
            conn.option_reply(option, REP_INFO, struct.pack(">H", INFO_EXPORT) + export)
            conn.option_reply(option, REP_ACK)
            if option == OPT_GO:
                return
            continue
        conn.option_reply(option, REP_ERR_UNSUP)  # structured replies, meta contexts, TLS, lists: not here
    raise SinkError(f"more than {MAX_OPTIONS} NBD options")


def _valid_info_request(data: bytes) -> bool:
    if len(data) < 6:
        return False
    name_len: int = struct.unpack(">I", data[:4])[0]
    if 4 + name_len + 2 > len(data):
        return False
    count: int = struct.unpack(">H", data[4 + name_len : 6 + name_len])[0]
    return len(data) == 6 + name_len + 2 * count


def _has_data(fd: int, offset: int, length: int) -> bool:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nothing but a hole from offset on
            return False
        raise


def _write_zeroes(fd: int, offset: int, length: int) -> None:
    # The file starts as one hole; zeros only need writing over data written before.
    if not _has_data(fd, offset, length):
        return
    end = offset + length
    while offset < end:
        n = min(len(ZERO_CHUNK), end - offset)
        _pwrite_all(fd, ZERO_CHUNK[:n], offset)
        offset += n


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SinkError("the host directory's filesystem is full", over_budget=True) from None
            raise
        view, offset = view[n:], offset + n
