"""The systemd unit that keeps the host's VM running across reboots and QEMU crashes.

One template for the machine, Debian's convention for a service per directory:
`/etc/systemd/system/secret-proxy-vm@.service`, its instance the host directory escaped as
`systemd-escape --path` does (`secret-proxy-vm@var-lib-secret\\x2dproxy\\x2dvm.service`), so
`%f` in the unit is the host directory again. It runs nothing new: `ExecStartPre` applies the
egress rules and starts the forward proxy (`takeover service prepare`, the rules before QEMU);
`ExecStart` is `takeover start`, with every check `start` has (the ports free, squatters
refused, the VM known by its identity record, /health waited for), which returns once the
VM serves, so the unit is `Type=forking` with QEMU's pidfile; `Restart=on-failure` brings a
QEMU that died back, at most `START_LIMIT_BURST` times in `START_LIMIT_INTERVAL` seconds, after
which systemd leaves it down for the operator rather than loop.

The threat answered: the unit runs as root at every boot, so whoever can change it, or any file
it names, is root. It is written atomically, 0644 and root's, in a directory only root may
change; it names only this checkout's interpreter and directory, which must be root's alone;
and every path written into it is checked against a closed set of characters, so nothing in it
is read as a systemd specifier, a quote or a second word.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import TakeoverConfig
from .errors import InvalidInput, NotRoot, TakeoverError
from .host import egress
from .host.files import only_root_can_change, write_atomic
from .journal import Journal

UNIT_NAME = "secret-proxy-vm@.service"
UNIT_DIR = Path("/etc/systemd/system")
ROOT = Path(__file__).resolve().parent.parent  # this checkout: `python -m takeover` runs from here
START_LIMIT_BURST = 3
START_LIMIT_INTERVAL = 900  # seconds
RESTART_SECONDS = 10
START_TIMEOUT = 600  # a TCG boot and /health; `takeover start` has its own deadline inside it
# Paths that go into the unit: no space, quote, backslash, `%` (a specifier) or `$` (a variable).
SAFE_PATH = re.compile(r"/[A-Za-z0-9/._+-]*")
_ESCAPE_KEEP = re.compile(r"[A-Za-z0-9:_.]")


class UnitError(TakeoverError):
    """The unit cannot be written or named as asked."""


def escape_path(path: Path) -> str:
    """`systemd-escape --path PATH`: the instance name whose `%f` is PATH again."""
    text = str(path).strip("/")
    if not text:
        return "-"
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif _ESCAPE_KEEP.fullmatch(ch) and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def instance_unit(host_dir: Path) -> str:
    return UNIT_NAME.replace("@.", f"@{escape_path(host_dir)}.")


def _checked(path: Path, what: str) -> str:
    text = str(path)
    if not SAFE_PATH.fullmatch(text) or "/../" in text + "/" or "//" in text:
        raise InvalidInput(
            f"{what} {text!r} has characters the unit cannot hold",
            hint="use a plain absolute path: letters, digits, / . _ + -",
        )
    return text


@dataclass(frozen=True)
class UnitText:
    """What the unit runs: this checkout's interpreter, from this checkout's directory."""

    python: Path
    checkout: Path

    def render(self) -> str:
        py, root = _checked(self.python, "the interpreter"), _checked(self.checkout, "the checkout")
        takeover = f"{py} -E -s -m takeover"
        return f"""\
# {UNIT_NAME}: written by `python -m takeover service install` (docs/operations.md); do not edit,
# install again. The instance is the host directory, escaped:
#   systemctl enable --now "secret-proxy-vm@$(systemd-escape --path /var/lib/secret-proxy-vm).service"
[Unit]
Description=secret-proxy-vm: the host's VM in %f
Documentation=file://{root}/docs/operations.md
After=network-online.target nftables.service
Wants=network-online.target
RequiresMountsFor=%f
StartLimitIntervalSec={START_LIMIT_INTERVAL}
StartLimitBurst={START_LIMIT_BURST}

[Service]
Type=forking
PIDFile=%f/qemu.pid
WorkingDirectory={root}
Environment=LANG=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
ExecStartPre={takeover} service prepare --host-dir %f
ExecStart={takeover} start --host-dir %f
ExecStop={takeover} stop --host-dir %f
Restart=on-failure
RestartSec={RESTART_SECONDS}
TimeoutStartSec={START_TIMEOUT}
TimeoutStopSec=180
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def current_unit() -> UnitText:
    return UnitText(Path(sys.executable), ROOT)


def install(unit_dir: Path = UNIT_DIR, text: UnitText | None = None, *, check_owners: bool = True) -> Path:
    """Write the template unit, atomically, 0644, root's; refuse a directory or checkout others could change."""
    text = text or current_unit()
    if check_owners:
        for path, what in ((unit_dir, "the unit directory"), (text.checkout, "the checkout"), (text.python, "python")):
            if not only_root_can_change(path):
                raise UnitError(
                    f"{what} {path} (or a directory above it) can be changed by a user other than root; "
                    "the unit runs it as root at every boot",
                    hint=f"chown root and chmod go-w {path} and its parents, then install again",
                )
    path = unit_dir / UNIT_NAME
    write_atomic(path, text.render().encode(), mode=0o644)
    return path


def remove(unit_dir: Path = UNIT_DIR) -> bool:
    path = unit_dir / UNIT_NAME
    if not path.exists():
        return False
    path.unlink()
    return True


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    """systemctl with its words as argv; UnitError when it fails (no systemd, a unit that failed)."""
    try:
        result = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise UnitError("systemctl is not installed", hint="this host runs no systemd; use `takeover start`") from None
    if result.returncode != 0:
        raise UnitError(
            f"`systemctl {' '.join(args)}` failed: {result.stderr.strip()[-300:]}",
            hint="`journalctl -u 'secret-proxy-vm@*'` says why",
        )
    return result


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRoot("the unit is root's", hint="run as root (sudo)")


def prepare(host_dir: Path) -> dict[str, object]:
    """The unit's ExecStartPre: a verified takeover's egress rules applied and its forward proxy running,
    before `takeover start` starts QEMU (which applies them again: both are idempotent)."""
    require_root()
    journal = Journal.load(host_dir)
    if journal is None or not journal.done("verify"):
        raise UnitError(
            f"{host_dir} holds no verified takeover", hint="run `python -m takeover run` before enabling the unit"
        )
    plan = egress.load_plan(host_dir)
    if plan is None:
        return {"egress": "off (the takeover ran with --no-egress-filter)"}
    return {"egress": egress.enforce(plan, host_dir)}


def install_for(host_dir: Path, unit_dir: Path, *, enable: bool) -> dict[str, object]:
    """`takeover service install`: the template written, and the instance for `host_dir` named (or enabled)."""
    require_root()
    _checked(host_dir, "the host directory")
    journal = Journal.load(host_dir) if host_dir.is_dir() else None
    if journal is not None and TakeoverConfig.saved(journal.options, host_dir).runner != "qemu":
        raise UnitError(
            f"{host_dir}'s VM runs under libvirt, whose domain has autostart already",
            hint="no unit is needed; `virsh autostart` and libvirtd start it at boot",
        )
    path = install(unit_dir)
    instance = instance_unit(host_dir)
    shown: dict[str, object] = {"unit": str(path), "instance": instance}
    if enable:
        systemctl("daemon-reload")
        systemctl("enable", "--now", instance)
        shown["enabled"] = True
    else:
        shown["next"] = f"systemctl daemon-reload && systemctl enable --now '{instance}'"
    return shown


def remove_for(host_dir: Path, unit_dir: Path, *, disable: bool) -> dict[str, object]:
    require_root()
    instance = instance_unit(Path(_checked(host_dir, "the host directory")))
    if disable:
        systemctl("disable", "--now", instance)
    return {"instance": instance, "removed": remove(unit_dir)}
