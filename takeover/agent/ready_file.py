"""The agent's ready file: what `vm_image launch` says about its VM, read as a claim to be checked.

`READY_FOR_TAKEOVER`, a newline, one JSON object (docs/architecture.md). Every field is the
agent's word: step 1 holds each against the kernel (a local agent, steps/find_vm.py) or treats it
as the agent machine's claim (agent/nested_vm.py). Here it is only parsed, bounded and typed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm_image.layout import READY_MARKER

from ..errors import InvalidInput, ReadyFileError
from ..host.regular_file import NotAgentFile, read_regular
from ..models import Endpoint

READY_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class ReadyInfo:
    monitor: Path
    disk: Path
    proxy: Endpoint | None  # the agent's claim; None: take the address its QEMU forwards
    pid: int | None = None
    pidfile: Path | None = None
    setup_key_pub: Path | None = None
    path: Path | None = None
    owner: int | None = None  # the ready file's owner, from fstat of the descriptor it was read through


def read_ready_file(path: Path) -> ReadyInfo:
    """The local agent's ready file, read without following links (`host/regular_file.py`)."""
    try:
        raw, st = read_regular(path, READY_MAX_BYTES)
    except FileNotFoundError:
        raise ReadyFileError(f"no ready file at {path}; the agent's VM has not signalled it is ready") from None
    except NotAgentFile as exc:
        raise ReadyFileError(f"ready file: {exc}") from None
    except OSError as exc:
        # ELOOP: a symlink. The file is the agent's, and we are root: never read through its links.
        raise ReadyFileError(f"cannot open ready file {path} without following links: {exc.strerror}") from None
    return parse_ready(raw, path, st.st_uid)


def parse_ready(raw: bytes, path: Path, owner: int | None) -> ReadyInfo:
    """The ready file's bytes (at most READY_MAX_BYTES, however they were fetched) as a ReadyInfo."""
    if len(raw) > READY_MAX_BYTES:
        raise ReadyFileError(f"ready file {path} is larger than {READY_MAX_BYTES} bytes")
    first, _, rest = raw.decode("utf-8", "replace").partition("\n")
    if first.strip() != READY_MARKER:
        raise ReadyFileError(f"ready file {path} does not start with {READY_MARKER}")
    try:
        data = json.loads(rest)
    except json.JSONDecodeError as exc:
        raise ReadyFileError(f"ready file {path}: the JSON after the first line is invalid ({exc.msg})") from None
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ReadyFileError(f"ready file {path} is not a version 1 ready file")
    try:
        proxy = data.get("proxy")  # absent: the address the agent's QEMU forwards (proxy_address)
        return ReadyInfo(
            monitor=_abs_path(data["monitor"], "monitor"),
            disk=_abs_path(data["disk"], "disk"),
            proxy=Endpoint(str(proxy["host"]), proxy["port"]) if proxy else None,
            pid=bounded_int(data.get("pid"), "pid", 1, 2**22) if data.get("pid") is not None else None,
            pidfile=_abs_path(data["pidfile"], "pidfile") if data.get("pidfile") else None,
            setup_key_pub=_abs_path(data["setup_key_pub"], "setup_key_pub") if data.get("setup_key_pub") else None,
            path=path,
            owner=owner,
        )
    except (KeyError, TypeError, InvalidInput) as exc:
        raise ReadyFileError(f"ready file {path}: missing or invalid field ({exc})") from None


def explicit_ready(monitor: Path, disk: Path, proxy: Endpoint | None = None) -> ReadyInfo:
    """A ReadyInfo from command-line paths, for a VM launched without a ready file."""
    for path, what in ((monitor, "--monitor"), (disk, "--disk")):
        if not str(path).startswith("/"):
            raise InvalidInput(f"{what} must be an absolute path")
    return ReadyInfo(monitor=monitor, disk=disk, proxy=proxy)


def _abs_path(value: Any, what: str) -> Path:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise InvalidInput(f"{what} must be an absolute path")
    return Path(value)


def bounded_int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInput(f"{what} must be an integer from {low} to {high}")
    return value
