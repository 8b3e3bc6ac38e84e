"""The runbook: `run` (the eight steps, journaled, resumable) and `rollback`.

Each step is a function in its own module; this file only sequences them,
records each in the journal, and decides what a rerun redoes. Until the new
VM is verified, the agent's disk and its `takeover-checkpoint` stay where they
are, so `rollback` can always bring the agent's VM back.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from . import proc
from .agent_owner import HostBoundary
from .boot import BootFiles, host_boot_files, modules_tarball
from .checkpoint import save_checkpoint_and_stop
from .config import TakeoverConfig, read_proxy_config
from .diskimage import inspect_image
from .errors import (DestinationTaken, InjectedFault, InvalidInput, JournalError, NotRoot, RollbackError, ScrubError,
                     TakeoverError)
from .files import ensure_host_dir
from .find_vm import explicit_ready, find_and_check_vm, read_ready_file
from .guest_files import UNIT, WRAPPER
from .host_keys import generate_host_keys, load_host_keys
from .journal import DONE, IN_PROGRESS, JOURNAL_NAME, ROLLED_BACK, STEPS, Journal, check_destination, steps_to_run
from .models import CHECKPOINT_TAG, Endpoint, SourceVM
from .progress import Progress
from .relocate import DISK_NAME, PARTIAL_NAME, relocate_disk
from .report import build_report, summary, write_report
from .restart import HostVMSpec, Runner, check_ports_free, make_runner, restart_as_host, wait_until_serving
from .revoke import revoke_agent_access
from .rollback import start_source_vm, wait_for_health
from .scrub import ScrubPlan, scrub_and_rekey
from .venv import build_proxy_venv
from .verify import AGENT_NAME, SECRET_PATTERNS, SSHTarget, create_agent_token, verify_host_vm, which_ssh

HOST_FILES = ("qmp.sock", "qemu.pid", "serial.log", "qemu.log")


@dataclass
class Context:
    cfg: TakeoverConfig
    host_dir: Path
    journal: Journal
    progress: Progress
    proxy_config: bytes | None = None
    summary: str = ""
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> SourceVM:
        return SourceVM.from_dict(self.journal.result("find_vm"))

    def note(self, text: str) -> None:
        self.progress.note(text)


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRoot("the takeover must run as root")


# -- the steps, as the runbook names them ---------------------------------------------------------


def step_find_vm(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    if cfg.monitor or cfg.disk:
        if not (cfg.monitor and cfg.disk):
            raise InvalidInput("--monitor and --disk go together")
        ready = explicit_ready(cfg.monitor, cfg.disk)  # the proxy: where the agent's QEMU forwards it
    else:
        ready = read_ready_file(cfg.ready_file or default_ready_file())
    # The VM must be one unprivileged user's, outside every host directory (agent_owner's docstring).
    boundary = HostBoundary.for_takeover(ctx.host_dir, cfg.qemu_user, extra_dirs=(cfg.cache_dir,))
    source = find_and_check_vm(ready, ctx.host_dir, boundary, proxy_listen=cfg.proxy_listen)
    if cfg.ssh_listen.port == source.proxy.port and cfg.ssh_listen.host == source.proxy.host:
        raise InvalidInput(f"--ssh-listen {cfg.ssh_listen} is the proxy's address")
    check_port_free(cfg.ssh_listen)
    ctx.note(f"QEMU pid {source.pid} (uid {source.uid}) has {source.disk} open; proxy at {source.proxy}")
    for note in source.notes:
        ctx.note(f"note: {note}")
    return source.to_dict()


def step_checkpoint(ctx: Context) -> dict[str, Any]:
    return save_checkpoint_and_stop(ctx.source, ctx.note).to_dict()


def step_relocate(ctx: Context) -> dict[str, Any]:
    source = ctx.source
    # A copy from an attempt whose scrub did not finish is not trusted: start from the source again.
    for name in (DISK_NAME, PARTIAL_NAME):
        path = ctx.host_dir / name
        if path.exists():
            ctx.note(f"discarding {path} from an unfinished earlier attempt")
            path.unlink()
    result = relocate_disk(Path(source.disk), ctx.host_dir, expect_inode=(source.disk_dev, source.disk_ino),
                           progress=ctx.note)
    ctx.note(f"{result.size / 2**20:.0f} MiB, sha256 {result.sha256[:16]}..., {result.allocated / 2**20:.0f} MiB "
             f"allocated (source {result.source_allocated / 2**20:.0f} MiB)")
    return result.to_dict()


def step_scrub(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    boot = boot_files(ctx)
    modules = modules_tarball(boot, ctx.host_dir / "boot") if cfg.replace_modules else None
    venv = build_proxy_venv(ctx.host_dir / "venv", ctx.note) if cfg.reinstall_venv else None
    system, overlay = host_system(ctx) if cfg.rebuild_system else (None, None)
    keys = generate_host_keys(ctx.host_dir, cfg.ssh_listen)
    ctx.note(f"new VM host key {keys.vm_host_fingerprint}; host login key {keys.login_fingerprint}")
    plan = ScrubPlan(keys=keys, proxy_config=ctx.proxy_config, unit=UNIT, wrapper=WRAPPER,
                     modules_tar=modules, venv_tar=venv, system_tar=system, system_overlay=overlay,
                     force_tcg=cfg.accel != "kvm")
    result = scrub_and_rekey(ctx.host_dir / DISK_NAME, plan, ctx.note).to_dict()
    ctx.note(f"{len(result['changes'])} changes recorded")
    inspect_image(ctx.host_dir / DISK_NAME)  # the scrub must leave a clean, self-contained qcow2
    result["keys"] = keys.to_dict()
    result["boot"] = boot.to_dict()
    return result


def host_system(ctx: Context) -> tuple[Path, Path]:
    """The host's own build of the guest's base system (cached in --cache-dir) and our files over it."""
    from vm_image.disk import write_system_overlay
    from vm_image.errors import VmImageError
    from vm_image.rootfs import base_rootfs

    cache = ensure_host_dir(ctx.cfg.cache_dir)  # root's own, 0700: what is in it goes into every VM
    try:
        system = base_rootfs(cache, progress=ctx.note)
    except VmImageError as exc:
        raise ScrubError(f"cannot build the host's own system image: {exc}",
                         hint="check that apt can reach Debian's archive, or pass --keep-agent-system "
                              "(the report then lists the agent's /usr as not blocked)") from None
    return system, write_system_overlay(ctx.host_dir / "system-overlay.tar")


def step_restart(ctx: Context) -> dict[str, Any]:
    spec = vm_spec(ctx)
    return restart_as_host(spec, runner_for(ctx.cfg), ctx.note)


def step_verify(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    source = ctx.source
    restart = ctx.journal.result("restart")
    key, known_hosts = load_host_keys(ctx.host_dir)
    ssh = SSHTarget(cfg.ssh_listen, key, known_hosts)
    result = verify_host_vm(source.proxy, ssh, restart["pid"], setup_key_pub=source.setup_key_pub,
                            agent_uid=source.uid, timeout=cfg.boot_timeout, progress=ctx.note)
    ctx.note(f"/health after {result['health_seconds']:.0f} s; SSH as the host works; the agent's key: "
             f"{result['agent_key']}")
    if cfg.agent_name:
        token_file = cfg.token_file or ctx.host_dir / f"agent-{cfg.agent_name}.token"
        if token_file.exists():
            ctx.note(f"{token_file} exists from an earlier attempt; not creating the agent again")
            result["agent_token"] = {"agent": cfg.agent_name, "secrets": cfg.agent_secrets,
                                     "token_file": str(token_file)}
        else:
            result["agent_token"] = create_agent_token(ssh, cfg.agent_name, cfg.agent_secrets, token_file)
            ctx.note(f"agent {cfg.agent_name!r} created; token in {token_file} (0600)")
    return result


def step_revoke(ctx: Context) -> dict[str, Any]:
    result = revoke_agent_access(ctx.source, keep_source=ctx.cfg.keep_source)
    for item in result["removed"]:
        ctx.note(f"removed {item['path']}")
    for item in result["kept"]:
        ctx.note(f"kept {item['path']}: {item['outcome']}")
    return result


def step_report(ctx: Context) -> dict[str, Any]:
    ctx.journal.data["steps"]["report"]["status"] = "done"  # the report lists itself as done
    report = build_report(ctx.journal, ctx.host_dir)
    path = write_report(report, ctx.host_dir)
    ctx.summary = summary(report)
    return {"report": str(path)}


STEP_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "find_vm": step_find_vm, "checkpoint": step_checkpoint, "relocate": step_relocate, "scrub": step_scrub,
    "restart": step_restart, "verify": step_verify, "revoke": step_revoke, "report": step_report,
}


# -- helpers --------------------------------------------------------------------------------------


def default_ready_file() -> Path:
    raise InvalidInput("no --ready-file given; pass the agent's ready file (STATE/run/ready) or --monitor and --disk")


def check_port_free(endpoint: Endpoint) -> None:
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((endpoint.host, endpoint.port))
        except OSError as exc:
            raise InvalidInput(f"{endpoint} (the host's SSH forward) is in use: {exc.strerror}",
                               hint="choose another --ssh-listen") from None


def boot_files(ctx: Context) -> BootFiles:
    if "boot" not in ctx.cache:
        ctx.note("preparing the host's own kernel and initrd")
        cfg = ctx.cfg
        ctx.cache["boot"] = host_boot_files(ctx.host_dir / "boot", cfg.kernel, cfg.initrd, cfg.kernel_append)
    return ctx.cache["boot"]


def vm_spec(ctx: Context) -> HostVMSpec:
    cfg, source = ctx.cfg, ctx.source
    boot = BootFiles.from_dict(ctx.journal.result("scrub")["boot"])
    return HostVMSpec(
        name=cfg.vm_name, disk=ctx.host_dir / DISK_NAME, kernel=boot.kernel, initrd=boot.initrd, append=boot.append,
        memory_mb=source.memory_mb, cpus=source.cpus, accel=cfg.accel, proxy_listen=source.proxy,
        ssh_listen=cfg.ssh_listen, monitor=ctx.host_dir / "qmp.sock", pidfile=ctx.host_dir / "qemu.pid",
        serial_log=ctx.host_dir / "serial.log", qemu_log=ctx.host_dir / "qemu.log")


def runner_for(cfg: TakeoverConfig) -> Runner:
    return make_runner(cfg.runner, qemu_user=cfg.qemu_user, libvirt_uri=cfg.libvirt_uri)


def prepare_host_dir(cfg: TakeoverConfig) -> Path:
    host_dir = ensure_host_dir(cfg.host_dir)
    if cfg.runner == "libvirt":
        # libvirt runs QEMU as libvirt-qemu and relabels the disk, kernel and initrd for it; that user
        # must be able to traverse (not list) the directory. Every file in it stays 0600.
        os.chmod(host_dir, 0o711)
    return host_dir


def open_journal(cfg: TakeoverConfig, host_dir: Path) -> Journal:
    journal = Journal.load(host_dir)
    check_destination(journal)
    if journal is not None and journal.state == IN_PROGRESS:
        return journal
    if journal is not None:  # rolled back: keep it for the record, start afresh
        journal.path.rename(host_dir / f"journal-{journal.state}-{int(journal.data.get('created', 0))}.json")
    if (host_dir / DISK_NAME).exists():
        raise DestinationTaken(f"{host_dir / DISK_NAME} exists but there is no journal for it")
    return Journal.new(host_dir, cfg.to_dict())


def recover_interrupted_checkpoint(journal: Journal) -> None:
    """A run that died during step 2 may have saved the snapshot and stopped QEMU already."""
    entry = journal.entry("checkpoint")
    if not journal.done("find_vm") or journal.done("checkpoint") or not entry:
        return
    source = SourceVM.from_dict(journal.result("find_vm"))
    if proc.alive(source.pid, source.pid_start_ticks):
        return  # still running: step 1 is redone and checks it again
    if CHECKPOINT_TAG in inspect_image(Path(source.disk), force_share=True, owner=source.uid).snapshots:
        journal.begin("checkpoint")
        journal.finish("checkpoint", {"tag": CHECKPOINT_TAG, "method": "recovered after an interrupted run"})


def run_takeover(cfg: TakeoverConfig, progress: Progress | None = None) -> tuple[dict[str, Any], str]:
    """Run (or resume) the takeover; returns the report and its human summary."""
    require_root()
    progress = progress or Progress()
    if cfg.agent_name is not None and (not AGENT_NAME.match(cfg.agent_name) or not SECRET_PATTERNS.match(cfg.agent_secrets)):
        raise InvalidInput(f"--agent-name must match {AGENT_NAME.pattern} and --agent-secrets {SECRET_PATTERNS.pattern}")
    proxy_config = (read_proxy_config(cfg.proxy_config, allow_telegram_api_url=cfg.allow_telegram_api_url)
                    if cfg.proxy_config else None)
    if (cfg.kernel is None) != (cfg.initrd is None):
        raise InvalidInput("--kernel and --initrd go together")
    for path in (cfg.kernel, cfg.initrd):
        if path is not None and not path.is_file():
            raise InvalidInput(f"{path} is not a file")
    which_ssh()
    host_dir = prepare_host_dir(cfg)
    journal = open_journal(cfg, host_dir)
    recover_interrupted_checkpoint(journal)
    ctx = Context(cfg, host_dir, journal, progress, proxy_config)
    todo = steps_to_run(journal)
    for step in STEPS:
        if step not in todo:
            progress.skip(step, "done in an earlier run")
    for step in todo:
        if step in ("find_vm", "relocate", "restart"):
            # A step that is rerun invalidates what the steps after it produced.
            for later in STEPS[STEPS.index(step):]:
                journal.forget(later)
        progress.begin(step)
        journal.begin(step)
        try:
            result = STEP_FUNCTIONS[step](ctx)
        except BaseException as exc:
            journal.fail(step, exc)
            progress.fail(step, exc)
            raise
        journal.finish(step, result)
        progress.end(step)
        if cfg.fail_after == step:
            raise InjectedFault(f"failing on purpose after step {step!r} (--fail-after)")
    journal.set_state(DONE)
    report = build_report(journal, host_dir)
    write_report(report, host_dir)
    return report, ctx.summary or summary(report)


def roll_back(cfg: TakeoverConfig, progress: Progress | None = None, *, cold: bool = False) -> dict[str, Any]:
    """Stop the host's VM if any, start the agent's VM from its checkpoint, wait for /health, clean up."""
    require_root()
    progress = progress or Progress()
    host_dir = cfg.host_dir
    journal = Journal.load(host_dir)
    if journal is None:
        raise JournalError(f"no takeover journal in {host_dir}; nothing to roll back")
    if journal.state == DONE or journal.done("verify"):
        raise RollbackError("the host's VM was verified; the takeover is complete and the agent's disk may be gone",
                            hint="stop the host's VM yourself if you must; a rollback is only for unfinished runs")
    if journal.state == ROLLED_BACK:
        raise RollbackError("this takeover was already rolled back", hint="nothing to do")
    if not journal.done("find_vm"):
        journal.set_state(ROLLED_BACK)
        return {"rolled_back": True, "detail": "nothing had changed (step 1 did not finish)"}
    source = SourceVM.from_dict(journal.result("find_vm"))
    options = journal.data.get("options", {})
    runner = make_runner(options.get("runner", cfg.runner), qemu_user=options.get("qemu_user"),
                         libvirt_uri=options.get("libvirt_uri", cfg.libvirt_uri))
    started = time.monotonic()
    if journal.entry("restart"):
        try:
            spec = vm_spec(Context(cfg, host_dir, journal, progress))
            if runner.stop(spec):
                progress.note("stopped the host's VM")
        except (JournalError, KeyError):
            pass  # the restart never got far enough to have a spec
    if proc.alive(source.pid, source.pid_start_ticks):
        progress.note(f"the agent's QEMU (pid {source.pid}) is still running; nothing to restart")
        detail = "the agent's VM was still running"
    else:
        disk = Path(source.disk)
        if not disk.exists():
            raise RollbackError(f"the agent's disk {disk} is gone; it cannot be restarted")
        has_checkpoint = CHECKPOINT_TAG in inspect_image(disk, force_share=True, owner=source.uid).snapshots
        if not has_checkpoint and not cold:
            raise RollbackError(f"{disk} has no {CHECKPOINT_TAG} snapshot",
                                hint="rerun with --cold to boot the agent's disk without its saved state")
        progress.note(f"starting the agent's QEMU again as uid {source.uid}, in a session of its own without "
                      f"a terminal" + (f", from {CHECKPOINT_TAG}" if has_checkpoint and not cold else " (cold boot)"))
        start_source_vm(source, host_dir / "rollback-qemu.log", load_checkpoint=has_checkpoint and not cold)
        try:
            seconds = wait_for_health(source.proxy.url)
        except TimeoutError as exc:
            raise RollbackError(f"the agent's VM started but {exc}; see {host_dir / 'rollback-qemu.log'}") from None
        progress.note(f"{source.proxy.url}/health answers after {seconds:.0f} s")
        detail = "the agent's VM is back from its checkpoint" if has_checkpoint and not cold else "cold boot"
    # Only now, with the agent's VM answering, does the host's copy go.
    for name in (DISK_NAME, PARTIAL_NAME, "host_key", "host_key.pub", "known_hosts", *HOST_FILES):
        try:
            (host_dir / name).unlink()
        except FileNotFoundError:
            pass
    journal.set_state(ROLLED_BACK)
    return {"rolled_back": True, "detail": detail, "seconds": round(time.monotonic() - started, 3)}


def _finished_vm(cfg: TakeoverConfig) -> tuple[HostVMSpec, Runner]:
    require_root()
    journal = Journal.load(cfg.host_dir)
    if journal is None or not journal.done("verify"):
        raise JournalError(f"{cfg.host_dir} holds no verified takeover",
                           hint="run `python -m takeover run` first (or rerun it to finish)")
    options = journal.data.get("options", {})
    runner = make_runner(options.get("runner", "qemu"), qemu_user=options.get("qemu_user"),
                         libvirt_uri=options.get("libvirt_uri", cfg.libvirt_uri))
    # The VM as the run made it: its SSH forward and accelerator, not this command's defaults.
    saved_ssh = options.get("ssh_listen")  # TakeoverConfig.to_dict keeps an Endpoint as {"host", "port"}
    cfg = replace(cfg, accel=options.get("accel", cfg.accel),
                  ssh_listen=Endpoint(saved_ssh["host"], saved_ssh["port"]) if isinstance(saved_ssh, dict)
                  else cfg.ssh_listen)
    return vm_spec(Context(cfg, cfg.host_dir, journal, Progress())), runner


def start_host_vm(cfg: TakeoverConfig) -> dict[str, Any]:
    """Start the taken-over VM again (after a host reboot: the qemu runner has no autostart).

    "Already running" only for the QEMU the runner itself identifies (pid, start time, owner,
    binary; `QemuRunner.pid`), never for whatever a stale pidfile names. Both forwarded ports must
    be free before the start, and the proxy's must be the new QEMU's once /health answers: while
    the VM was down, anyone could have taken the port to pose as the proxy.
    """
    spec, runner = _finished_vm(cfg)
    pid = runner.pid(spec)
    if pid is not None:
        return {"started": False, "pid": pid, "detail": "already running"}
    check_ports_free(spec)
    pid = runner.start(spec)
    return {"started": True, "pid": pid, **wait_until_serving(spec, pid)}


def stop_host_vm(cfg: TakeoverConfig) -> dict[str, Any]:
    spec, runner = _finished_vm(cfg)
    return {"stopped": runner.stop(spec, undefine=False)}


def status(cfg: TakeoverConfig) -> dict[str, Any]:
    journal = Journal.load(cfg.host_dir)
    if journal is None:
        return {"host_dir": str(cfg.host_dir), "state": "none"}
    return {"host_dir": str(cfg.host_dir), "state": journal.state, "journal": str(cfg.host_dir / JOURNAL_NAME),
            "steps": {s: journal.entry(s).get("status", "pending") for s in STEPS}}


__all__ = ["run_takeover", "roll_back", "status", "TakeoverError"]
