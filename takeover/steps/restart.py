"""Step 5: start the VM again as the host's, from the host's disk, with the host's kernel.

The egress filter is enforced before QEMU starts; the runners themselves (qemu, libvirt) and
the description of the VM they share are `host/runners.py`, which `takeover start` uses too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vm_image import proc

from ..agent.machine import MachineAddress
from ..config import TakeoverConfig
from ..host import egress, serve_back
from ..host.runners import HostVMSpec, Runner, VMDescription, make_runner, widen_forwards
from ..models import SourceVM
from .context import Context
from .relocate import DISK_NAME
from .scrub import ScrubOutcome


@dataclass(frozen=True, kw_only=True)
class RestartResult(VMDescription):
    """Step 5's result: the host's QEMU (pid and start time), the VM it runs, and the limits it runs under."""

    pid: int
    pid_start_ticks: int
    start_seconds: float
    forwards: dict[str, Any]  # widen_forwards' report
    spec: HostVMSpec
    egress: dict[str, Any] = field(default_factory=dict)  # egress.enforce's report, or {"filter": "off"}
    serve_filter: str | None = None  # the nftables table keeping the served proxy to the agent machine (serve_back.py)


def step_restart(ctx: Context) -> RestartResult:
    spec = vm_spec(ctx)
    plan = egress.load_plan(ctx.host_dir) if ctx.cfg.egress_filter else None
    limits = egress.enforce(plan, ctx.host_dir) if plan is not None else {"filter": "off"}
    served = serve_to_machine(ctx.source, ctx.host_dir)
    if served:
        ctx.note(f"{ctx.source.proxy} admits only {ctx.source.machine} (and root here): nftables table {served}")
    return replace(restart_as_host(spec, runner_for(ctx.cfg), ctx.note), egress=limits, serve_filter=served or None)


def serve_to_machine(source: SourceVM, host_dir: Path) -> str:
    """For a VM taken from an agent machine: only that machine may reach the served proxy, from before
    QEMU binds it (host/serve_back.py); returns the nftables table's name, or "" for a local agent."""
    if source.machine is None:
        return ""
    return serve_back.apply(source.proxy, MachineAddress.parse(source.machine).ssh_host, host_dir)


def vm_spec(ctx: Context) -> HostVMSpec:
    cfg, source = ctx.cfg, ctx.source
    boot = ctx.journal.read("scrub", ScrubOutcome).boot
    return HostVMSpec(
        name=cfg.vm_name,
        disk=ctx.host_dir / DISK_NAME,
        kernel=boot.kernel,
        initrd=boot.initrd,
        append=boot.append,
        memory_mb=cfg.memory_mb,  # the operator's, never the agent's: the agent's VM size is only reported
        cpus=cfg.cpus,
        accel=cfg.accel,
        proxy_listen=source.proxy,
        ssh_listen=cfg.ssh_listen,
        monitor=ctx.host_dir / "qmp.sock",
        pidfile=ctx.host_dir / "qemu.pid",
        serial_log=ctx.host_dir / "serial.log",
        qemu_log=ctx.host_dir / "qemu.log",
    )


def runner_for(cfg: TakeoverConfig) -> Runner:
    return make_runner(cfg.runner, qemu_user=cfg.qemu_user, libvirt_uri=cfg.libvirt_uri)


def restart_as_host(
    spec: HostVMSpec, runner: Runner, progress: Callable[[str], None] = lambda _: None
) -> RestartResult:
    progress(f"starting {spec.name} with the {runner.name} runner")
    if runner.stop(spec):
        progress("stopped a host VM left by an earlier attempt")
    started = time.monotonic()
    pid = runner.start(spec)
    described = runner.describe(spec)
    return RestartResult(
        **{f.name: getattr(described, f.name) for f in fields(described)},
        pid=pid,
        pid_start_ticks=proc.start_ticks(pid),
        start_seconds=round(time.monotonic() - started, 3),
        forwards=widen_forwards(spec, pid, progress),
        spec=spec,
    )
