"""Run a command with secret values in its environment, and mask them in what it prints.

`exec` (by default) and the MCP tool `run_with_secret` run COMMAND as a child with each value
in one environment variable, and pass its stdout and stderr on with every occurrence of a
value replaced by MASK, as `op run` does: a command that echoes its credential, or a debug
log that prints it, does not put it in a terminal's scrollback, a CI log, or a model's
context. Only the exact bytes of each value are masked; a command that encodes a value
(base64, URL-escaping) prints it encoded.

The child's environment is the caller's minus every SECRET_PROXY_* variable: it gets the
values it was given, not the power to ask the proxy for more.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from .errors import CommandNotFound, UsageError

MASK = b"<concealed by secret-proxy>"
ENV_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
CHUNK = 65536
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def child_environment(parent: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without the proxy's URL, token or token file (any SECRET_PROXY_*)."""
    return {k: v for k, v in parent.items() if not k.startswith("SECRET_PROXY_")}


def check_command(command: list[str], env: Mapping[str, str], variables: list[str]) -> None:
    """Refuse, before anything is asked, a command that cannot run or a variable that cannot be set."""
    if not command:
        raise UsageError("no command to run", hint="give the command and its arguments after --")
    for var in variables:
        if not ENV_VAR_RE.fullmatch(var):
            raise UsageError(f"not an environment variable name: {var!r}", hint="use letters, digits and _")
    if shutil.which(command[0], path=env.get("PATH", os.defpath)) is None:
        raise CommandNotFound(f"no such command: {command[0]!r}", hint="check COMMAND (searched on PATH)")


def check_values(values: Mapping[str, str]) -> None:
    for var, value in values.items():
        if "\0" in value:
            raise UsageError(
                f"the value for {var} holds a NUL byte, which no environment variable can carry",
                hint="use `secret-proxy-agent get` and pass it on stdin instead",
            )


class Masker:
    """A stream filter: what goes in comes out with every value replaced by MASK.

    It holds back only the longest tail that could be the start of a value, so a command's
    output comes through at once unless it stops in the middle of what may be a value."""

    def __init__(self, values: list[bytes]) -> None:
        self.values = sorted({v for v in values if v}, key=len, reverse=True)
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        text = self._held + data
        for value in self.values:
            text = text.replace(value, MASK)
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :] if keep else b""
        return text[: len(text) - keep]

    def flush(self) -> bytes:
        out, self._held = self._held, b""
        return out

    def _partial_tail(self, text: bytes) -> int:
        longest = max((len(v) for v in self.values), default=1)
        for size in range(min(len(text), longest - 1), 0, -1):
            tail = text[-size:]
            if any(v.startswith(tail) for v in self.values):
                return size
        return 0


@dataclass
class Capped:
    """A sink that keeps the first `limit` bytes and counts the rest (the MCP tool's output)."""

    limit: int
    data: bytearray
    dropped: int = 0

    def write(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def flush(self) -> None:
        pass


Sink = BinaryIO | Capped


def _pump(source: BinaryIO, sink: Sink, values: list[bytes]) -> None:
    masker = Masker(values)
    fd = source.fileno()
    while chunk := os.read(fd, CHUNK):
        sink.write(masker.feed(chunk))
        sink.flush()
    sink.write(masker.flush())
    sink.flush()


def run_masked(
    command: list[str],
    env: dict[str, str],
    values: list[str],
    out: Sink,
    err: Sink,
    *,
    timeout: float | None = None,
    stdin_null: bool = False,
    cwd: str | None = None,
) -> int:
    """Run `command`, its stdout to `out` and stderr to `err` with `values` masked; its exit code
    (128 + N if a signal N ended it; 124 if `timeout` passed and it was killed, as `timeout(1)` says)."""
    secrets = [v.encode() for v in values]
    child = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL if stdin_null else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=stdin_null,  # the MCP tool's child: its own group, killed whole on a timeout
    )
    assert child.stdout is not None and child.stderr is not None
    pumps = [
        threading.Thread(target=_pump, args=(child.stdout, out, secrets), daemon=True),
        threading.Thread(target=_pump, args=(child.stderr, err, secrets), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in FORWARDED_SIGNALS:  # Ctrl-C or a kill reaches the child, which decides what to do
            previous[sig] = signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    timed_out = False
    try:
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(child)
            code = child.wait()
        deadline = time.monotonic() + 5
        for pump in pumps:  # a grandchild may hold the pipes open: do not wait for it forever
            pump.join(max(0.0, deadline - time.monotonic()))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if timed_out:
        return 124
    return 128 - code if code < 0 else code


def _kill(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        child.kill()
