"""Which of the agent's QEMU options a rollback replays: a small allow-list, every path checked.

A rollback starts the agent's QEMU again from the command line the agent
wrote. It runs as the agent (rollback.py), so in principle it reaches only
what the agent could reach by running it itself; but it is root who starts it,
from root's terminal, and an option can name things the agent's own launch
never had: a host device (`-serial /dev/tty`, `-drive file=/dev/sda`), a
terminal (`-monitor stdio`, `-chardev tty`), a program (`guestfwd=...-cmd:`,
`smb=`), a privilege change (`-runas`, `-chroot`, `-run-with`), a config file
that adds options we never saw (`-readconfig`), or an object (`-object`).

So the replay takes only the options `vm_image` itself produces
(vm_image/qemu_command.py `qemu_argv`, both routes), each value in the shape
vm_image writes, and every path must be a file of the agent's: absolute, not
under /dev, /proc or /sys, not a device, and (after following any link) owned
by the agent's uid. Anything else is refused in step 1, before the takeover
changes anything, with the option named. These checks give a clear refusal;
the containment itself is the replay's uid, no new privileges, and its new
session without a terminal (rollback.py), since the agent can swap its own
files after we looked.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UnsafeCommandLine

WORD = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # no slash, comma or '=': names no file and adds no option
SIZE = re.compile(r"[0-9]{1,7}[kKmMgGtT]?")
NUMBER = re.compile(r"[0-9]{1,6}")
SYSTEM_TREES = ("/dev", "/proc", "/sys")
HOSTFWD = re.compile(r"tcp:(?P<host>[0-9.]+):(?P<port>[0-9]{1,5})-(?P<guest>[0-9.]*):(?P<gport>[0-9]{1,5})")


@dataclass
class Checked:
    """What the check learned on the way: the disk images named by -drive (the rollback's disk must be one)."""

    drive_files: list[str] = field(default_factory=list)


Check = Callable[[str, int, Checked], None]


class Refused(Exception):
    """One option value is not replayable; check_options turns it into UnsafeCommandLine with the option."""


def check_options(args: list[str], owner: int) -> Checked:
    """Refuse any option outside the allow-list and any value outside its shape. `args` excludes argv[0]."""
    checked, i = Checked(), 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg == "-":
            # QEMU takes a bare argument as the first hard disk: a file we would not have checked.
            raise UnsafeCommandLine(
                f"the agent's QEMU command line has a bare argument {arg!r}; a rollback does not replay it", hint=_HINT
            )
        option = "-" + arg.lstrip("-")
        if option not in ALLOWED:
            raise UnsafeCommandLine(
                f"the agent's QEMU command line uses {arg!r}, which a rollback does not "
                f"replay (only the options vm_image itself uses are replayed)",
                hint=_HINT,
            )
        check = ALLOWED[option]
        if check is None:
            i += 1
            continue
        if i + 1 >= len(args):
            raise UnsafeCommandLine(f"the agent's QEMU command line ends with {arg!r} and no value", hint=_HINT)
        value = args[i + 1]
        try:
            check(value, owner, checked)
        except Refused as exc:
            raise UnsafeCommandLine(
                f"the agent's QEMU command line has {arg} {value!r}: {exc}; a rollback does not replay it", hint=_HINT
            ) from None
        i += 2
    return checked


_HINT = (
    "stop the agent's VM and start it again with `python -m vm_image launch` (its own, plain command line: "
    "files in the agent's state directory, no host devices or terminals), then rerun the takeover"
)


# -- value shapes ---------------------------------------------------------------------------------


def _word(pattern: re.Pattern[str] = WORD, choices: frozenset[str] | None = None) -> Check:
    def check(value: str, owner: int, checked: Checked) -> None:
        if choices is not None and value not in choices:
            raise Refused(f"only {', '.join(sorted(choices))} is replayed")
        if not pattern.fullmatch(value):
            raise Refused("the value has characters a rollback does not replay")

    return check


def _any_text(value: str, owner: int, checked: Checked) -> None:
    """The guest kernel's command line: read by the guest only, it names nothing on the host."""


def _agent_file(value: str, owner: int, checked: Checked) -> None:
    agent_path(value, owner, may_be_missing=False)


def _agent_output(value: str, owner: int, checked: Checked) -> None:
    agent_path(value, owner, may_be_missing=True)  # a pidfile QEMU creates again


def _props(head: Check | None, keys: dict[str, Check], required: tuple[str, ...] = ()) -> Check:
    """A QEMU `head,key=value,...` option value; `head` is the first element when it has no '='."""

    def check(value: str, owner: int, checked: Checked) -> None:
        if ",," in value:
            # QEMU reads ",," as a literal comma inside a value; we would split it differently.
            raise Refused("',,' (an escaped comma) is not replayed")
        parts = value.split(",")
        if head is not None:
            if "=" in parts[0]:
                raise Refused("it does not start with the expected type")
            head(parts.pop(0), owner, checked)
        seen = set()
        for part in parts:
            key, eq, val = part.partition("=")
            if not eq:
                raise Refused(f"{part!r} is not key=value")
            if key not in keys:
                raise Refused(f"the property {key!r} is not replayed (allowed: {', '.join(sorted(keys))})")
            keys[key](val, owner, checked)
            seen.add(key)
        missing = [k for k in required if k not in seen]
        if missing:
            raise Refused(f"it has no {', '.join(missing)}=")

    return check


def _drive_file(value: str, owner: int, checked: Checked) -> None:
    agent_path(value, owner, may_be_missing=False)
    checked.drive_files.append(value)


def _hostfwd(value: str, owner: int, checked: Checked) -> None:
    match = HOSTFWD.fullmatch(value)
    if not match:
        raise Refused("a forward must read tcp:127.0.0.1:PORT-:PORT")
    try:
        host = ipaddress.IPv4Address(match["host"])
    except ValueError:
        raise Refused(f"{match['host']!r} is not an IPv4 address") from None
    del host  # any IPv4 literal: the replay runs as the agent with no capabilities, so it can listen only
    # where the agent itself could (the host's own forwards are decided in step 1, not here).
    if not 1024 <= int(match["port"]) <= 65535 or not 1 <= int(match["gport"]) <= 65535:
        raise Refused("a forward's host port must be 1024-65535 (the agent cannot bind lower ones itself)")


def _chardev(kinds: frozenset[str]) -> Check:
    """-serial / -qmp / -monitor: only a file or unix socket of the agent's, or nothing; never a terminal."""
    unix = _props(
        None, {"server": _word(choices=frozenset({"on", "off"})), "wait": _word(choices=frozenset({"on", "off"}))}
    )

    def check(value: str, owner: int, checked: Checked) -> None:
        if value in ("none", "null"):
            return
        backend, colon, rest = value.partition(":")
        if not colon or backend not in kinds:
            raise Refused(
                f"only {', '.join(f'{k}:PATH' for k in sorted(kinds))} or none is replayed "
                f"(no terminal, stdio, pty, pipe, network or host device)"
            )
        path, _, options = rest.partition(",")
        if backend == "file":
            if options:
                raise Refused("a file: backend takes no options here")
            agent_path(path, owner, may_be_missing=True)
        else:
            agent_path(path, owner, may_be_missing=True, kind=stat.S_ISSOCK)
            if options:
                unix(options, owner, checked)

    return check


def agent_path(text: str, owner: int, *, may_be_missing: bool, kind: Callable[[int], bool] = stat.S_ISREG) -> None:
    """`text` names a file of uid `owner` (or, if it may be missing, a place in a directory of theirs)."""
    if not text.startswith("/"):
        raise Refused(f"{text!r} is not an absolute path")
    real = os.path.realpath(text)
    for tree in SYSTEM_TREES:
        if real == tree or real.startswith(tree + "/"):
            raise Refused(f"{text!r} is under {tree}, not one of the agent's files")
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        if not may_be_missing:
            raise Refused(f"{text!r} does not exist") from None
        parent = os.path.dirname(real)
        try:
            pst = os.lstat(parent)
        except OSError:
            raise Refused(f"{text!r}: its directory does not exist") from None
        if not stat.S_ISDIR(pst.st_mode) or pst.st_uid != owner:
            raise Refused(
                f"{text!r} would be created in {parent}, which is not a directory of the agent's (uid {owner})"
            ) from None
        return
    except OSError as exc:
        raise Refused(f"{text!r} cannot be examined ({exc.strerror})") from None
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        raise Refused(f"{text!r} is a device")
    if not kind(st.st_mode):
        expected = "a socket" if kind is stat.S_ISSOCK else "a regular file"
        raise Refused(f"{text!r} is not {expected}")
    if st.st_uid != owner:
        where = f" (it leads to {real!r})" if real != text else ""
        raise Refused(f"{text!r}{where} belongs to uid {st.st_uid}, not to the agent (uid {owner})")


# -- the allow-list: what vm_image's qemu_argv writes, and nothing else ----------------------------
# None: a flag without a value. Each entry says why a rollback may replay it.

ALLOWED: dict[str, Check | None] = {
    # Identity and machine shape: names and numbers only, nothing on the host.
    "-name": _word(re.compile(r"[A-Za-z0-9_.-]{1,64}")),
    "-machine": _props(_word(re.compile(r"[a-z0-9.-]{1,32}")), {"accel": _word(), "usb": _word(), "smm": _word()}),
    "-accel": _props(_word(choices=frozenset({"tcg", "kvm"})), {"tb-size": _word(NUMBER), "thread": _word()}),
    "-cpu": _word(re.compile(r"[A-Za-z0-9_.-]{1,32}(,[+-]?[A-Za-z0-9_.-]{1,32}(=[A-Za-z0-9_.-]{1,32})?){0,32}")),
    "-m": _word(SIZE),
    "-smp": _word(re.compile(r"[0-9]{1,3}(,(cpus|sockets|cores|threads|maxcpus)=[0-9]{1,3}){0,5}")),
    # No defaults, no host config file, no window, no reboot loop: each only removes something.
    "-nodefaults": None,
    "-no-user-config": None,
    "-no-reboot": None,
    "-display": _word(choices=frozenset({"none"})),
    # Direct kernel boot: files of the agent's; the kernel command line is the guest's business.
    "-kernel": _agent_file,
    "-initrd": _agent_file,
    "-append": _any_text,
    # The disk (and the cloud-init seed for --base-image): image files of the agent's, qcow2 or raw.
    "-drive": _props(
        None,
        {
            "file": _drive_file,
            "if": _word(choices=frozenset({"virtio", "none", "ide"})),
            "format": _word(choices=frozenset({"qcow2", "raw"})),
            "discard": _word(choices=frozenset({"unmap", "ignore", "on", "off"})),
            "readonly": _word(choices=frozenset({"on", "off"})),
            "cache": _word(choices=frozenset({"none", "writeback", "writethrough", "directsync", "unsafe"})),
            "id": _word(),
        },
        required=("file",),
    ),
    # User-mode network with TCP forwards only: no guestfwd (runs a command), smb, tftp or bootfile.
    "-netdev": _props(
        _word(choices=frozenset({"user"})),
        {"id": _word(), "hostfwd": _hostfwd, "restrict": _word(choices=frozenset({"on", "off"}))},
    ),
    # The guest's NIC, disk and entropy device; none takes a host file (no romfile).
    "-device": _props(
        _word(choices=frozenset({"virtio-net-pci", "virtio-rng-pci", "virtio-blk-pci"})),
        {"netdev": _word(), "drive": _word(), "id": _word(), "mac": _word(), "bus": _word(), "addr": _word()},
    ),
    # The serial log, the monitor socket and the pidfile: files of the agent's, never a terminal.
    "-serial": _chardev(frozenset({"file"})),
    "-qmp": _chardev(frozenset({"unix"})),
    "-monitor": _chardev(frozenset({"unix"})),
    "-pidfile": _agent_output,
    # Detach: QEMU forks and starts its own session (the replay is in a new one already).
    "-daemonize": None,
}
