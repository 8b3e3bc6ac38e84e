"""`takeover upgrade`: the host's VM rebuilt from the host's current build, its store kept, or the old VM back.

A new release of the proxy reaches the VM without the agent: the system is built again the way the
takeover's scrub builds it (the host's own Debian from its cache, our files, the venv from uv.lock,
a new SSH host key), on a new disk beside the old one while the old VM serves. Then the old VM
powers down, the proxy's data directory crosses to the new disk (guest/carry.py: regular files and
directories only, bounded, owned by the host's choice), the disks swap, the new VM starts with every
check `takeover start` makes, and the store's migrations run as the proxy opens it. The upgrade is
verified by counts read over the host's SSH login before and after (store_figures.py) and by
`audit verify`.

Any failure before the old VM stops deletes the new disk and nothing else. Any failure after it
(or an interruption) stops the new VM, puts the old disk and its pinned host key back, and starts
the old VM: it never serves a half-upgraded store. The old disk is kept as `disk.qcow2.pre-upgrade`
(root's, 0600, like every file here) until the new VM is verified. Downtime is from the moment the
old VM is asked to stop to the new VM's first /health answer; `upgrade.json` records every attempt.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from vm_image.boot_files import BootFiles
from vm_image.proxy_venv import ROOT

from .agent.diskimage import inspect_host_disk_in_use, inspect_image
from .config import TakeoverConfig
from .errors import InjectedFault, JournalError, UpgradeError, VerifyError
from .guest.boot import modules_tarball
from .guest.carry import CarryResult, carry_data
from .guest.scrub import ScrubPlan, create_blank_disk, scrub_and_rekey
from .host.files import fsync_dir, write_json_atomic
from .host.keys import HOST_KEY, KNOWN_HOSTS, new_vm_host_key
from .host.runners import HostVMSpec, QemuRunner
from .host.ssh import SSHTarget
from .host.store_figures import Figures, read_figures
from .host.vm_checks import check_host_login
from .journal import Journal
from .progress import Progress
from .record import from_record, to_record
from .runbook import finished_vm, start_host_vm
from .steps.context import DISK_NAME, Context
from .steps.scrub import host_system, host_venv

RECORD_NAME = "upgrade.json"
NEW_DISK = f"{DISK_NAME}.new"
OLD_DISK = f"{DISK_NAME}.pre-upgrade"
NEW_PIN = f"{KNOWN_HOSTS}.new"
OLD_PIN = f"{KNOWN_HOSTS}.pre-upgrade"
POWERDOWN_TIMEOUT = 60.0  # the guest shuts down cleanly (logind, the ACPI button) in seconds; then QEMU quits

# The stages, in order: --fail-after's choices, the progress display's titles, upgrade.json's timings.
STAGES: dict[str, str] = {
    "build": "build the new disk from the host's current build (the old VM serves)",
    "count": "count the old VM's store over SSH",
    "stop": "stop the old VM (a clean power-down)",
    "carry": "carry the proxy's data directory to the new disk",
    "swap": "swap the disks (the old one kept until verified)",
    "start": "start the new VM (migrations run as the proxy opens the store)",
    "verify": "verify the new VM and its store",
}
STOPS_THE_OLD_VM = "stop"  # from this stage on, a failure rolls back to the old VM


@dataclass
class UpgradeRecord:
    """One attempt, as upgrade.json keeps it."""

    started: float
    from_build: str
    to_build: str = "not built"
    result: str = "in progress"  # upgraded | abandoned before the stop | rolled back | rollback failed
    finished: float | None = None
    failed_stage: str | None = None
    error: str | None = None
    downtime_s: float | None = None  # from the old VM's stop to the new VM's /health (or the old one's, rolled back)
    before: Figures | None = None
    after: Figures | None = None
    carried: CarryResult | None = None
    vm_host_key: str | None = None  # the new VM's host key fingerprint, pinned in known_hosts
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Attempt:
    """What one run of `upgrade` knows as it goes: its settings, the VM, where it got to."""

    cfg: TakeoverConfig
    saved: TakeoverConfig  # the takeover's own options (runner, QEMU user, accelerator, cache)
    spec: HostVMSpec
    record: UpgradeRecord
    progress: Progress
    fail_after: str | None = None
    stage: str = ""
    stop_asked: float | None = None  # monotonic time the old VM was asked to stop: the downtime's start

    @property
    def host_dir(self) -> Path:
        return self.cfg.host_dir

    @contextmanager
    def step(self, name: str) -> Iterator[Callable[[str], None]]:
        self.stage = name
        started = time.monotonic()
        with self.progress.step(STAGES[name]) as note:
            yield note
        self.record.seconds[name] = round(time.monotonic() - started, 3)
        if self.fail_after == name:
            raise InjectedFault(f"failing on purpose after stage {name!r} (--fail-after)")


def upgrade(cfg: TakeoverConfig, progress: Progress | None = None, fail_after: str | None = None) -> UpgradeRecord:
    """Rebuild the host's VM from the host's current build and keep its store; or leave the old VM serving."""
    spec, runner = finished_vm(cfg)  # root, and a verified takeover
    journal = Journal.load(cfg.host_dir)
    assert journal is not None  # finished_vm read it
    saved = TakeoverConfig.saved(journal.options, cfg.host_dir)
    if saved.runner != "qemu":
        raise UpgradeError(
            f"`takeover upgrade` is not supported yet for the {saved.runner} runner",
            hint="upgrade a VM taken over with the qemu runner (the default); for libvirt, take the VM over again",
        )
    check_no_unfinished_upgrade(cfg.host_dir)
    if runner.pid(spec) is None:
        raise UpgradeError(
            "the host's VM is not running: the upgrade counts its store before it stops it",
            hint="start it (`python -m takeover start`), then rerun `python -m takeover upgrade`",
        )
    records = load_records(cfg.host_dir)
    done = [r for r in records if r.result == "upgraded"]
    record = UpgradeRecord(time.time(), done[-1].to_build if done else "the takeover's build (not recorded)")
    attempt = Attempt(cfg, saved, spec, record, progress or Progress.counting(len(STAGES)), fail_after)
    records.append(record)
    try:
        _run(attempt, journal)
    except BaseException as exc:
        record.failed_stage, record.error = attempt.stage, f"{type(exc).__name__}: {exc}"
        _fail(attempt, exc, records)
    record.result, record.finished = "upgraded", time.time()
    save_records(cfg.host_dir, records)
    return record


def _run(attempt: Attempt, journal: Journal) -> None:
    host_dir, spec, record = attempt.host_dir, attempt.spec, attempt.record
    ssh = SSHTarget(spec.ssh_listen, host_dir / HOST_KEY, host_dir / KNOWN_HOSTS)
    with attempt.step("build") as note:
        record.to_build, record.vm_host_key = build_new_disk(attempt, journal, note)
        note(f"{record.from_build} -> {record.to_build}")
    with attempt.step("count") as note:
        record.before = read_figures(ssh)
        note(record.before.words())
    attempt.stop_asked = stop_asked = time.monotonic()  # from here on, anything that fails puts the old VM back
    with attempt.step("stop") as note:
        QemuRunner(attempt.saved.qemu_user).stop(spec, powerdown=POWERDOWN_TIMEOUT)
        note("the old VM is stopped; the proxy is down until the new VM answers /health")
    with attempt.step("carry") as note:
        record.carried = carry_data(
            spec.disk, host_dir / NEW_DISK, force_tcg=attempt.saved.accel != "kvm", progress=note
        )
        for skipped in record.carried.skipped:
            note(f"not carried: {skipped}")
    with attempt.step("swap"):
        swap_in(host_dir)
    with attempt.step("start") as note:
        started = start_host_vm(attempt.cfg)
        record.downtime_s = round(time.monotonic() - stop_asked, 3)
        note(f"/health answered; the proxy was down {record.downtime_s:.1f} s (pid {started.get('pid')})")
    with attempt.step("verify") as note:
        check_host_login(ssh, attempt.cfg.boot_timeout, lambda: True)
        record.after = read_figures(ssh)
        lost = record.before.differences(record.after)
        if lost:
            raise VerifyError(f"the new VM's store does not count what the old one did: {'; '.join(lost)}")
        note(f"the same as before: {record.after.words()}")
    for kept in (OLD_DISK, OLD_PIN):  # verified: the old disk has served its purpose
        (host_dir / kept).unlink(missing_ok=True)
    fsync_dir(host_dir)


def _fail(attempt: Attempt, exc: BaseException, records: list[UpgradeRecord]) -> NoReturn:
    """Record the failure and leave the old VM serving; always raises."""
    record, host_dir = attempt.record, attempt.host_dir
    what = f"the upgrade failed at stage {attempt.stage!r}: {exc}"
    if attempt.stop_asked is None:
        discard_new(host_dir)
        record.result, record.finished = "abandoned before the stop", time.time()
        save_records(host_dir, records)
        raise UpgradeError(f"{what}\n  the new disk was deleted; the old VM was never stopped and serves on") from None
    rollback_started = time.monotonic()
    try:
        attempt.progress.note("rolling back: stopping the new VM, putting the old disk back, starting the old VM")
        QemuRunner(attempt.saved.qemu_user).stop(attempt.spec)
        swap_out(host_dir)
        start_host_vm(attempt.cfg)
        record.downtime_s = round(time.monotonic() - attempt.stop_asked, 3)  # until the old VM serves again
    except BaseException as again:
        record.result, record.finished = "rollback failed", time.time()
        save_records(host_dir, records)
        raise UpgradeError(
            f"{what}\n  and the rollback failed too: {again}",
            hint=f"if {host_dir / OLD_DISK} exists, it is the old disk: move it to {host_dir / DISK_NAME} "
            f"(and {OLD_PIN} to {KNOWN_HOSTS}), then `python -m takeover start`",
        ) from None
    record.result, record.finished = "rolled back", time.time()
    record.seconds["rollback"] = round(time.monotonic() - rollback_started, 3)
    save_records(host_dir, records)
    raise UpgradeError(
        f"{what}\n  rolled back: the old VM serves again at {attempt.spec.proxy_listen}, with its own disk and store"
    ) from None


def build_new_disk(attempt: Attempt, journal: Journal, note: Callable[[str], None]) -> tuple[str, str]:
    """The new disk, built as the takeover's scrub builds one; returns the build's identity and the new host key."""
    host_dir, saved = attempt.host_dir, attempt.saved
    discard_new(host_dir)  # a build an interrupted attempt left: never trusted, made again
    ctx = Context(saved, host_dir, journal, attempt.progress)
    # The kernel and initrd stay the ones the VM boots now (the journal's): a rollback boots them again.
    ctx.boot = from_record(BootFiles, journal.result("scrub")["boot"], "step scrub's boot files")
    modules = modules_tarball(ctx.boot, host_dir / "boot") if saved.replace_modules else None
    venv = host_venv(ctx)
    system, overlay = host_system(ctx)
    keys = new_vm_host_key(host_dir, saved.ssh_listen, host_dir / NEW_PIN)
    new_disk = host_dir / NEW_DISK
    size = inspect_host_disk_in_use(attempt.spec.disk).virtual_size  # the old VM holds its lock
    create_blank_disk(new_disk, size)  # root's, 0600 from its first byte
    plan = ScrubPlan(
        keys=keys,
        proxy_config=None,  # the carry brings the old store's config.toml (the host's, with the egress proxy)
        modules_tar=modules,
        venv_tar=venv,
        system_tar=system,
        system_overlay=overlay,
        force_tcg=saved.accel != "kvm",
    )
    scrub_and_rekey(new_disk, plan, note)
    inspect_image(new_disk)  # a clean, self-contained qcow2
    return build_identity(venv), keys.vm_host_fingerprint


def build_identity(venv_tar: Path) -> str:
    """The release (pyproject's version) and the venv's input digest, which changes with any code or lock change."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return f"{version}+venv.{venv_tar.stem.removeprefix('venv-')}"


def swap_in(host_dir: Path) -> None:
    """The new disk and its pinned host key take the old ones' names; the old stay beside them.

    A link first, then a rename over: at every instant `disk.qcow2` is a whole disk, old or new.
    """
    for name, new, old in ((DISK_NAME, NEW_DISK, OLD_DISK), (KNOWN_HOSTS, NEW_PIN, OLD_PIN)):
        (host_dir / old).unlink(missing_ok=True)
        os.link(host_dir / name, host_dir / old)
        os.replace(host_dir / new, host_dir / name)
    fsync_dir(host_dir)


def swap_out(host_dir: Path) -> None:
    """The old disk and pin back under their names (if the swap got that far), the new ones deleted."""
    for name, old in ((DISK_NAME, OLD_DISK), (KNOWN_HOSTS, OLD_PIN)):
        if (host_dir / old).exists():
            os.replace(host_dir / old, host_dir / name)
    discard_new(host_dir)
    fsync_dir(host_dir)


def discard_new(host_dir: Path) -> None:
    for name in (NEW_DISK, NEW_PIN, f".{NEW_DISK}.blank"):
        (host_dir / name).unlink(missing_ok=True)


def check_no_unfinished_upgrade(host_dir: Path) -> None:
    """An attempt killed after its swap left the old disk beside the new one: the operator decides, not a rerun."""
    if (host_dir / OLD_DISK).exists():
        raise UpgradeError(
            f"{host_dir / OLD_DISK} exists: an earlier upgrade stopped after swapping the disks and never "
            f"finished or rolled back",
            hint=f"to go back to the old VM: `python -m takeover stop`, move {OLD_DISK} to {DISK_NAME} and "
            f"{OLD_PIN} to {KNOWN_HOSTS}, `python -m takeover start`; to keep the new one: delete both "
            f"*.pre-upgrade files. Then rerun",
        )


def load_records(host_dir: Path) -> list[UpgradeRecord]:
    path = host_dir / RECORD_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise JournalError(f"{path} is not valid JSON ({exc})") from None
    return from_record(list[UpgradeRecord], data.get("upgrades") if isinstance(data, dict) else None, str(path))


def save_records(host_dir: Path, records: list[UpgradeRecord]) -> None:
    write_json_atomic(host_dir / RECORD_NAME, {"upgrades": to_record(records)})


def summary(record: UpgradeRecord) -> str:
    """What the operator reads at the end: from and to, the downtime, and that the store is whole."""
    lines = [
        "",
        "Upgrade complete.",
        "",
        f"  build:     {record.from_build} -> {record.to_build}",
        f"  downtime:  {record.downtime_s:.1f} s (from the old VM's stop to the new VM's /health)"
        if record.downtime_s is not None
        else "  downtime:  not measured",
        f"  store:     {record.after.words() if record.after else '-'}; the same as before",
    ]
    if record.carried is not None:
        lines.append(
            f"  carried:   {record.carried.files} files, {record.carried.bytes} bytes"
            + (f"; not carried: {', '.join(record.carried.skipped)}" if record.carried.skipped else "")
        )
    lines += [f"  host key:  {record.vm_host_key} (pinned in {KNOWN_HOSTS})", f"  record:    {RECORD_NAME}"]
    return "\n".join(lines)
