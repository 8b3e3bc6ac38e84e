"""The runbook: `run` (the steps of `steps/__init__.py`, journaled, resumable), `start`, `stop` and `status`.

This file only sequences the steps, records each in the journal, and decides what a rerun
redoes. Until the new VM is verified, the agent's disk and its `takeover-checkpoint` stay
where they are, so `rollback` (rollback.py) can always bring the agent's VM back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vm_image import proc

from . import backup_record, glance
from .agent.diskimage import inspect_image
from .agent.machine import Connection
from .agent.nested_vm import nested_alive, nested_snapshots
from .config import TakeoverConfig, read_proxy_config
from .errors import DestinationTaken, InjectedFault, InvalidInput, JournalError, NotRoot, TakeoverError, VerifyError
from .host import egress
from .host.files import ensure_host_dir
from .host.keys import load_host_keys
from .host.runners import HostVMSpec, Runner, check_ports_free, wait_until_serving, widen_forwards
from .host.ssh import SSHTarget, which_ssh
from .host.vm_checks import CLI
from .journal import DONE, IN_PROGRESS, JOURNAL_NAME, Journal, check_destination
from .models import CHECKPOINT_TAG, SourceVM
from .progress import Progress
from .steps import CUT_OVER, plan_of
from .steps.checkpoint import CheckpointResult
from .steps.context import DISK_NAME, Context, runner_for, vm_spec
from .steps.report import build_report, summary, write_report
from .steps.restart import serve_to_machine
from .steps.verify import AGENT_NAME, SECRET_PATTERNS


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRoot("the takeover must run as root")


def prepare_host_dir(cfg: TakeoverConfig) -> Path:
    host_dir = ensure_host_dir(cfg.host_dir)
    if cfg.runner == "libvirt" or cfg.agent_machine is not None:
        # libvirt runs QEMU as libvirt-qemu and relabels the disk, kernel and initrd for it, and a disk
        # from an agent machine is read as the copy user (agent/machine_disk.py): that user must be able
        # to traverse (not list) the directory. Every file in it stays 0600.
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


def recover_interrupted_checkpoint(journal: Journal, machine: Callable[[], Connection] | None = None) -> None:
    """A run that died during step 2 may have saved the snapshot and stopped QEMU already.

    `machine` opens the connection to the agent machine, for a VM nested in one.
    """
    entry = journal.entry("checkpoint")
    if not journal.done("find_vm") or journal.done("checkpoint") or not entry:
        return
    source = journal.read("find_vm", SourceVM)
    if source.machine is not None:
        if machine is None:
            return  # nothing known here of a process in another machine: step 1 is redone
        conn = machine()
        if nested_alive(conn, source.pid, source.pid_start_ticks):
            return
        saved = CHECKPOINT_TAG in nested_snapshots(conn, source.disk)
    elif proc.alive(source.pid, source.pid_start_ticks):
        return  # still running: step 1 is redone and checks it again
    else:
        saved = CHECKPOINT_TAG in inspect_image(Path(source.disk), force_share=True, owner=source.uid).snapshots
    if saved:
        journal.begin("checkpoint")
        journal.finish("checkpoint", CheckpointResult(CHECKPOINT_TAG, "recovered after an interrupted run"))


def run_takeover(cfg: TakeoverConfig, progress: Progress | None = None) -> tuple[dict[str, Any], str]:
    """Run (or resume) the takeover; returns the report and its human summary."""
    require_root()
    progress = progress or Progress()
    if cfg.agent_name is not None and (
        not AGENT_NAME.match(cfg.agent_name) or not SECRET_PATTERNS.match(cfg.agent_secrets)
    ):
        raise InvalidInput(
            f"--agent-name must match {AGENT_NAME.pattern} and --agent-secrets {SECRET_PATTERNS.pattern}"
        )
    proxy_config = (
        read_proxy_config(cfg.proxy_config, allow_telegram_api_url=cfg.allow_telegram_api_url)
        if cfg.proxy_config
        else None
    )
    if (cfg.kernel is None) != (cfg.initrd is None):
        raise InvalidInput("--kernel and --initrd go together")
    for path in (cfg.kernel, cfg.initrd):
        if path is not None and not path.is_file():
            raise InvalidInput(f"{path} is not a file")
    which_ssh()
    host_dir = prepare_host_dir(cfg)
    journal = open_journal(cfg, host_dir)
    ctx = Context(cfg, host_dir, journal, progress, proxy_config)
    try:
        return _run_steps(ctx, progress)
    finally:
        ctx.close()  # the agent machine's connection, if one was opened


def _run_steps(ctx: Context, progress: Progress) -> tuple[dict[str, Any], str]:
    cfg, host_dir, journal = ctx.cfg, ctx.host_dir, ctx.journal
    plan = plan_of(journal)
    progress.use(plan)
    ctx.cut_over = plan is CUT_OVER
    recover_interrupted_checkpoint(journal, ctx.machine)
    todo = plan.steps_to_run(journal)
    for step in plan.steps:
        if step not in todo:
            progress.skip(step.name, "done in an earlier run")
    for step in todo:
        if step.name in plan.resume_points:
            # A step that is rerun invalidates what the steps after it produced.
            for later in plan.names[plan.names.index(step.name) :]:
                journal.forget(later)
        progress.begin(step.name)
        journal.begin(step.name)
        try:
            result = step.run(ctx)
        except BaseException as exc:
            journal.fail(step.name, exc)
            progress.fail(step.name, exc)
            raise
        journal.finish(step.name, result)
        progress.end(step.name)
        if cfg.fail_after == step.name:
            raise InjectedFault(f"failing on purpose after step {step.name!r} (--fail-after)")
    journal.set_state(DONE)
    report = build_report(journal, host_dir, plan.titles)
    write_report(report, host_dir)
    return report, ctx.summary or summary(report)


def finished_vm(cfg: TakeoverConfig) -> tuple[HostVMSpec, Runner]:
    require_root()
    journal = Journal.load(cfg.host_dir)
    if journal is None or not journal.done("verify"):
        raise JournalError(
            f"{cfg.host_dir} holds no verified takeover",
            hint="run `python -m takeover run` first (or rerun it to finish)",
        )
    # The VM as the run made it (runner, SSH forward, accelerator, size), not this command's defaults.
    saved = TakeoverConfig.saved(journal.options, cfg.host_dir)
    return vm_spec(Context(saved, saved.host_dir, journal, Progress())), runner_for(saved)


def start_host_vm(cfg: TakeoverConfig) -> dict[str, Any]:
    """Start the taken-over VM again (after a host reboot: the qemu runner has no autostart).

    "Already running" only for the QEMU the runner itself identifies (pid, start time, owner,
    binary; `QemuRunner.pid`), never for whatever a stale pidfile names. Both forwarded ports must
    be free before the start, and the proxy's must be the new QEMU's once /health answers: while
    the VM was down, anyone could have taken the port to pose as the proxy.
    """
    spec, runner = finished_vm(cfg)
    pid = runner.pid(spec)
    if pid is not None:
        return {"started": False, "pid": pid, "detail": "already running", **restart_forward_proxy(cfg)}
    check_ports_free(spec)
    plan = egress.load_plan(cfg.host_dir)
    limits = egress.enforce(plan, cfg.host_dir) if plan is not None else {"filter": "off"}
    journal = Journal.load(cfg.host_dir)
    assert journal is not None  # finished_vm read it
    serve_to_machine(journal.read("find_vm", SourceVM), cfg.host_dir)  # a VM served to an agent machine
    pid = runner.start(spec)
    forwards = widen_forwards(spec, pid, Progress().line)
    return {
        "started": True,
        "pid": pid,
        **wait_until_serving(spec, pid, cfg.boot_timeout),
        "egress": limits,
        "forwards": forwards,
    }


def restart_forward_proxy(cfg: TakeoverConfig) -> dict[str, Any]:
    """A running VM whose forward proxy died (nothing restarts tinyproxy by itself) gets it back.

    Until then the guest's egress fails closed: QEMU's uid may connect only to the proxy's port,
    which is below 1024 for a takeover made since, so no local user can listen there meanwhile.
    """
    plan = egress.load_plan(cfg.host_dir)
    if plan is None or egress.running_pid(cfg.host_dir) is not None:
        return {}
    return {"egress": {**egress.enforce(plan, cfg.host_dir), "forward_proxy": "restarted"}}


def stop_host_vm(cfg: TakeoverConfig) -> dict[str, Any]:
    spec, runner = finished_vm(cfg)
    return {"stopped": runner.stop(spec, undefine=False), "egress": egress.release(cfg.host_dir)}


def change_egress(
    cfg: TakeoverConfig, action: str, urls: list[str], *, apply: bool = False, digest: str | None = None
) -> dict[str, Any]:
    """List, widen or narrow what the taken-over VM may reach; a running VM keeps running.

    `sync` asks the VM (over the host's SSH key) where its stored policies send calls, shows
    what the list lacks with a digest, and records it; `sync --apply [DIGEST]` adds exactly
    that record and never asks the VM again: its answer is a proposal the operator reads,
    and a guest must not change it between the reading and the applying.
    """
    require_root()
    plan = egress.load_plan(cfg.host_dir)
    if plan is None:
        raise JournalError(
            f"{cfg.host_dir} has no egress filter (no takeover, or one run with --no-egress-filter)",
            hint="run `python -m takeover run` (the filter is on by default)",
        )
    if action == "list":
        return {**plan.to_dict(), "forward_proxy_pid": egress.running_pid(cfg.host_dir)}
    if action == "sync" and not apply:
        return propose_sync(cfg, plan)
    if action == "sync":
        proposal = egress.take_proposal(cfg.host_dir, digest)
        if not proposal.destinations:
            return {"applied": "nothing to add", "digest": proposal.digest}
        urls, action = [d.url for d in proposal.destinations], "allow"
    if not urls:
        raise InvalidInput(f"`egress {action}` needs at least one URL, e.g. https://api.example.com")
    named = {egress.Destination.parse(u) for u in urls}
    current = set(plan.destinations)
    if action == "allow":
        egress.refuse_unsafe(named - current)
    plan = plan.with_destinations(current | named if action == "allow" else current - named)
    if egress.running_pid(cfg.host_dir) is None:  # the VM is stopped: `start` enforces the saved plan
        egress.save_plan(cfg.host_dir, plan)
        return {**plan.to_dict(), "applied": "at the next start"}
    return {**egress.enforce(plan, cfg.host_dir), "applied": "now"}


def propose_sync(cfg: TakeoverConfig, plan: egress.EgressPlan) -> dict[str, Any]:
    """What the VM's policies name and the list lacks, recorded for `sync --apply` with its digest."""
    wanted, unusable = policy_destinations(cfg)
    missing: set[egress.Destination] = set()
    for destination in wanted - set(plan.destinations):
        try:
            egress.refuse_unsafe({destination})
        except InvalidInput as exc:
            unusable.append(str(exc))
            continue
        missing.add(destination)
    proposal = egress.Proposal(tuple(sorted(missing)))
    egress.save_proposal(cfg.host_dir, proposal)
    return {
        "missing": [d.url for d in proposal.destinations],
        "unusable": unusable,
        "digest": proposal.digest,
        "applied": False if missing else "nothing to add",
        **({"to_apply": f"python -m takeover egress sync --apply {proposal.digest}"} if missing else {}),
    }


def status(cfg: TakeoverConfig) -> dict[str, Any]:
    journal = Journal.load(cfg.host_dir)
    if journal is None:
        return {"host_dir": str(cfg.host_dir), "state": "none"}
    return {
        "host_dir": str(cfg.host_dir),
        "state": journal.state,
        "journal": str(cfg.host_dir / JOURNAL_NAME),
        "steps": {s: journal.entry(s).get("status", "pending") for s in plan_of(journal).names},
        **egress_status(cfg.host_dir),
        **at_a_glance(cfg, journal),
    }


def at_a_glance(cfg: TakeoverConfig, journal: Journal) -> dict[str, Any]:
    """For a verified takeover: the VM's health, uptime and figures, its egress list, its last backup."""
    if not journal.done("verify"):
        return {}
    spec, runner = finished_vm(cfg)
    key, known_hosts = load_host_keys(cfg.host_dir)
    ssh = SSHTarget(spec.ssh_listen, key, known_hosts)
    return {
        **glance.vm_glance(spec, runner, ssh),
        **glance.egress_glance(cfg.host_dir),
        **backup_record.glance(cfg.host_dir),
    }


def egress_status(host_dir: Path) -> dict[str, Any]:
    """Whether the forward proxy runs: if it died, the VM's egress fails until `takeover start`."""
    plan = egress.load_plan(host_dir)
    if plan is None:
        return {}
    pid = egress.running_pid(host_dir)
    return {"forward_proxy": pid if pid is not None else "not running: `python -m takeover start` restarts it"}


__all__ = ["run_takeover", "start_host_vm", "stop_host_vm", "status", "TakeoverError"]


POLICY_LIST_MAX = 1024 * 1024


def policy_destinations(cfg: TakeoverConfig) -> tuple[set[egress.Destination], list[str]]:
    """The destinations of the VM's stored policies, read over the host's SSH key, each parsed strictly."""
    spec, _ = finished_vm(cfg)
    key, known_hosts = load_host_keys(cfg.host_dir)
    result = SSHTarget(spec.ssh_listen, key, known_hosts).run(CLI, "secrets", "destinations")
    if result.returncode != 0:
        raise VerifyError(
            f"`secret-proxy secrets destinations` failed in the VM: {result.stderr.strip()[-300:]}",
            hint="is the VM running (`python -m takeover start`)?",
        )
    try:
        listed = json.loads(result.stdout[:POLICY_LIST_MAX])
        urls = [str(item["url"]) for item in listed]
    except (ValueError, TypeError, KeyError) as exc:
        raise VerifyError(f"the VM's list of policy destinations is not what the proxy prints: {exc}") from None
    found: set[egress.Destination] = set()
    unusable: list[str] = []
    for url in urls:
        try:
            found.add(egress.Destination.parse(url))
        except InvalidInput as exc:
            unusable.append(str(exc))
    return found, unusable
