"""What `qemu-img` says about a disk image, and who may ask it.

A qcow2 header can name a backing file or an external data file by any path,
and qemu-img's parsers are large C code. So root never reads a header the agent
wrote: a file root does not own is read by its owner, in the sandbox
(takeover/agent/sandbox.py), and may sit on a short chain of backing files (a
cloud image's overlay) that its owner can read. Root reads only its own files
(the host's copy, made by root's qemu-img from raw bytes), and those must be a
self-contained qcow2. A root-owned file offered as the agent's disk is refused.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CopyError, DiskFormatError, TakeoverError
from .sandbox import AgentUser, SandboxError, run_as_agent

QEMU_IMG = "qemu-img"
ACCEPTED_FORMATS = ("qcow2", "raw")
MAX_BACKING_FILES = 2  # a cloud image's overlay has one; a longer chain is not what vm_image makes
INFO_TIMEOUT = 120.0
MAX_VIRTUAL_SIZE = 2**40  # 1 TiB: a larger "disk" is not a VM vm_image made
AGENT_HINT = (
    "vm_image makes a qcow2 disk, alone or over one base image (`--base-image`), that the agent's "
    "own user can read; look at the agent's disk with `qemu-img info --backing-chain` as that user"
)


@dataclass(frozen=True)
class BackingFile:
    path: str
    format: str
    actual_size: int


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    snapshots: tuple[str, ...]
    backing: tuple[BackingFile, ...] = ()  # the agent's disk only: its backing files, nearest first
    owner: AgentUser | None = None  # who read it (None: root, for its own file)

    @property
    def chain_allocated(self) -> int:
        return self.actual_size + sum(b.actual_size for b in self.backing)

    def chain_spec(self, path: Path) -> str:
        """A `json:` name for the whole chain with every file and format pinned, for `qemu-img convert`.

        Read this way, qemu-img opens exactly the files checked here, with the formats checked
        here, and no backing file a header might name instead.
        """
        node: dict[str, Any] | None = None
        for link in reversed(self.backing):
            node = _node(link.format, link.path, node)
        return "json:" + json.dumps(_node(self.format, str(path), node))


def _node(fmt: str, path: str, backing: dict[str, Any] | None) -> dict[str, Any]:
    node: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if fmt == "qcow2":
        node["backing"] = backing  # None (JSON null): no backing file, whatever the header says
    return node


def check_virtual_size(size: int, path: object) -> int:
    """The size the agent's disk claims, refused unless it is one vm_image could have made."""
    if not 0 < size <= MAX_VIRTUAL_SIZE:
        raise DiskFormatError(
            f"the agent's disk {path} claims a size of {size} bytes; "
            f"refused (more than 0, at most {MAX_VIRTUAL_SIZE // 2**30} GiB)"
        )
    return size


def inspect_image(path: Path, *, force_share: bool = False, owner: int | None = None) -> ImageInfo:
    """Check `path` and return its facts; raise DiskFormatError (or SandboxError) if it is refused.

    `force_share` reads an image a running QEMU holds locked, and marks the agent's disk
    (step 1's preflight, the checkpoint's confirmation, rollback). `owner` is the agent's uid
    pinned in step 1: the name must still be that user's regular file, not a link, so that a
    name swapped since cannot make the sandbox run as someone else.
    """
    if not str(path).startswith("/"):
        raise DiskFormatError(f"disk path {path} is not absolute")  # a relative "json:" name would be parsed
    try:
        st = os.stat(path) if owner is None else os.lstat(path)
    except OSError as exc:
        raise DiskFormatError(f"cannot stat {path}: {exc.strerror}") from None
    if owner is not None and (not stat.S_ISREG(st.st_mode) or st.st_uid != owner):
        raise DiskFormatError(
            f"the agent's disk {path} is no longer a regular file of uid {owner} (it was in step 1)",
            hint="the agent changed its disk's name since step 1; rerun the takeover",
        )
    if st.st_uid == 0 and not force_share:
        return _inspect_own(path)
    return inspect_agent_disk(path, AgentUser.owner_of(st, f"the agent's disk {path}"), force_share=force_share)


def inspect_host_disk_in_use(path: Path) -> ImageInfo:
    """The host's own disk while the host's VM runs it (`takeover upgrade` sizes the new disk by it)."""
    if os.lstat(path).st_uid != 0:
        raise DiskFormatError(f"{path} is not root's: it is not the host's disk")
    return _inspect_own(path, force_share=True)


def _inspect_own(path: Path, *, force_share: bool = False) -> ImageInfo:
    """Root's own file (the host's copy): qemu-img as root, and only a self-contained qcow2 passes."""
    proc = subprocess.run(
        [QEMU_IMG, "info", "--output=json", "-f", "qcow2", *(["-U"] if force_share else []), "--", str(path)],
        capture_output=True,
        text=True,
        timeout=INFO_TIMEOUT,
    )
    if proc.returncode != 0:
        raise DiskFormatError(f"qemu-img cannot read {path} as qcow2: {proc.stderr.strip()[-300:]}")
    info = _parse(proc.stdout, path)
    _check_level(info, path)
    for key in ("backing-filename", "full-backing-filename", "backing-filename-format"):
        if key in info:
            raise DiskFormatError(
                f"{path} has a backing file ({info[key]!r}); the host's copy must be self-contained",
                hint="rerun `python -m takeover run` to copy the disk again",
            )
    return ImageInfo("qcow2", int(info.get("virtual-size", 0)), int(info.get("actual-size", 0)), _snapshots(info))


def inspect_agent_disk(path: Path, agent: AgentUser, *, force_share: bool = False) -> ImageInfo:
    """Walk the agent's disk and its backing files, each read by `qemu-img info` as the agent, sandboxed.

    The top must be qcow2 (QEMU's snapshots live there); each backing file qcow2 or raw, named by an
    absolute path, at most MAX_BACKING_FILES of them, and readable by the agent's own user.
    """
    info = _agent_info(path, "qcow2", agent, force_share, None)
    top = info
    backing: list[BackingFile] = []
    below = path
    while "full-backing-filename" in info or "backing-filename" in info:
        name = str(info.get("full-backing-filename") or info.get("backing-filename"))
        if len(backing) == MAX_BACKING_FILES:
            raise DiskFormatError(
                f"the agent's disk {path} has more than {MAX_BACKING_FILES} backing files "
                f"(the next is {name!r}); refused",
                hint=AGENT_HINT,
            )
        if not name.startswith("/") or not os.path.isabs(name) or "\0" in name:
            raise DiskFormatError(
                f"{below} names its backing file as {name!r}, not as an absolute path of a file; refused",
                hint=AGENT_HINT,
            )
        fmt = info.get("backing-filename-format")
        if fmt is not None and fmt not in ACCEPTED_FORMATS:
            raise DiskFormatError(
                f"{below} says its backing file {name} is {fmt!r}; only {' and '.join(ACCEPTED_FORMATS)} are accepted",
                hint=AGENT_HINT,
            )
        info = _agent_info(Path(name), fmt, agent, force_share, below)
        backing.append(BackingFile(name, str(info["format"]), int(info.get("actual-size", 0))))
        below = Path(name)
    return ImageInfo(
        "qcow2", int(top.get("virtual-size", 0)), int(top.get("actual-size", 0)), _snapshots(top), tuple(backing), agent
    )


def _agent_info(path: Path, fmt: str | None, agent: AgentUser, force_share: bool, below: Path | None) -> dict[str, Any]:
    argv = [
        QEMU_IMG,
        "info",
        "--output=json",
        *(["-U"] if force_share else []),
        *(["-f", fmt] if fmt else []),
        "--",
        str(path),
    ]
    result = run_as_agent(argv, agent, timeout=INFO_TIMEOUT)
    what = f"the backing file {path} of {below}" if below else f"the agent's disk {path}"
    if result.returncode != 0:
        text = result.error_text()
        if os.strerror(errno.EACCES) in text or os.strerror(errno.EPERM) in text:
            raise DiskFormatError(
                f"{what} cannot be read by the agent's own user (uid {agent.uid}): the host "
                f"reads the agent's disk only with the agent's rights ({text})",
                hint="a disk whose backing file only root can read is not the agent's to "
                "hand over; make the backing file readable by the agent, or rebuild "
                "the image with `vm_image build`",
            )
        if "lock" in text:
            raise CopyError(
                f"{what} is still in use by another process: {text}",
                hint="stop whatever still holds the agent's disk (its QEMU), then rerun `python -m takeover run`",
            )
        raise DiskFormatError(f"qemu-img, run as the agent, cannot read {what}: {text}", hint=AGENT_HINT)
    info = _parse(result.stdout.decode("utf-8", "replace"), path)
    fmt_seen = info.get("format")
    if fmt_seen not in (("qcow2",) if below is None else ACCEPTED_FORMATS):
        raise DiskFormatError(
            f"{what} is {fmt_seen!r}; accepted: {'qcow2' if below is None else ' and '.join(ACCEPTED_FORMATS)}",
            hint=AGENT_HINT,
        )
    _check_level(info, path)
    return info


def _parse(text: str, path: Path) -> dict[str, Any]:
    try:
        info = json.loads(text)
    except ValueError:
        raise TakeoverError(f"qemu-img info printed something that is not JSON for {path}") from None
    if not isinstance(info, dict):
        raise TakeoverError(f"qemu-img info printed something that is not a JSON object for {path}")
    return info


def _check_level(info: dict[str, Any], path: Path) -> None:
    data = (info.get("format-specific") or {}).get("data") or {}
    if not isinstance(data, dict):
        data = {}
    if "data-file" in data or data.get("data-file-raw"):
        raise DiskFormatError(
            f"{path} keeps its data in an external file ({data.get('data-file')!r}); refused", hint=AGENT_HINT
        )
    if data.get("corrupt"):
        raise DiskFormatError(f"{path} is marked corrupt by qemu-img", hint=AGENT_HINT)
    for key in ("virtual-size", "actual-size"):
        if not isinstance(info.get(key, 0), int) or info.get(key, 0) < 0:
            raise DiskFormatError(f"qemu-img reports a {key} of {info.get(key)!r} for {path}")


def _snapshots(info: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(s.get("name")) for s in info.get("snapshots") or [] if isinstance(s, dict))


__all__ = ["ImageInfo", "BackingFile", "inspect_image", "inspect_agent_disk", "SandboxError", "QEMU_IMG"]
