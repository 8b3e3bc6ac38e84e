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

from ..agent.diskimage import inspect_image
from ..agent.machine import MachineAddress
from ..host import egress, serve_back
from ..host.runners import HostVMSpec, Runner, VMDescription, widen_forwards
from ..models import PREPARED_TAG, SourceVM
from .context import Context, runner_for, vm_spec


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
    # The cut-over's: seconds from the agent's QEMU gone (step checkpoint's end) to the host's QEMU listening.
    address_free_s: float | None = None


def step_restart(ctx: Context) -> RestartResult:
    spec = vm_spec(ctx)
    if ctx.cut_over:
        spec = resume_prepared(spec, runner_for(ctx.cfg), ctx.note)
    plan = egress.load_plan(ctx.host_dir) if ctx.cfg.egress_filter else None
    limits = egress.enforce(plan, ctx.host_dir) if plan is not None else {"filter": "off"}
    served = serve_to_machine(ctx.source, ctx.host_dir)
    if served:
        ctx.note(f"{ctx.source.proxy} admits only {ctx.source.machine} (and root here): nftables table {served}")
    started = restart_as_host(spec, runner_for(ctx.cfg), ctx.note)
    free_s = None
    if spec.loadvm:
        free_s = round(time.time() - float(ctx.journal.entry("checkpoint").get("finished", time.time())), 3)
        ctx.note(f"the proxy's address was without a listener for {free_s:.2f} s")
    return replace(started, egress=limits, serve_filter=served or None, address_free_s=free_s)


def resume_prepared(spec: HostVMSpec, runner: Runner, progress: Callable[[str], None]) -> HostVMSpec:
    """The cut-over's VM: resumed from the first boot's snapshot (`-loadvm`) while the disk still has it.

    A rerun after step `verify` deleted it (it would roll the disk back) boots cold instead.
    """
    if runner.stop(spec):
        progress("stopped a host VM left by an earlier attempt")
    if PREPARED_TAG in inspect_image(spec.disk).snapshots:
        progress(f"resuming the VM the first boot saved ({PREPARED_TAG}): no boot to wait for")
        return replace(spec, loadvm=PREPARED_TAG)
    progress(f"{spec.disk} no longer has {PREPARED_TAG}; booting it cold")
    return spec


def serve_to_machine(source: SourceVM, host_dir: Path) -> str:
    """For a VM taken from an agent machine: only that machine may reach the served proxy, from before
    QEMU binds it (host/serve_back.py); returns the nftables table's name, or "" for a local agent."""
    if source.machine is None:
        return ""
    return serve_back.apply(source.proxy, MachineAddress.parse(source.machine).ssh_host, host_dir)


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
