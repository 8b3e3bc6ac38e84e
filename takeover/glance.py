"""`takeover status` at a glance: the host's VM's health and uptime, what it may reach, its last backup
and the proxy's figures, added to the journal's state (whose fields stay as they were).

The figures come from the proxy's metrics listener on the guest's loopback (`proxy/metrics.py`),
read over the host's own pinned SSH login (`secret-proxy metrics`), never over a port the agent or
the host's network reaches. What the guest prints is the VM's text: it is parsed by
`prometheus_client`'s parser, bounded in size, and only the known figures are kept, as numbers.
Nothing here fails `status`: a VM that is down or a listener that does not answer is said so in
the field's place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from vm_image import health, proc
from vm_image.guest_files import METRICS_LISTEN

from .errors import TakeoverError
from .host import egress
from .host.runners import HostVMSpec, Runner
from .host.ssh import SSHTarget
from .host.vm_checks import CLI

METRICS_MAX_BYTES = 1024 * 1024
HEALTH_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class Figures:
    """The proxy's figures that `status` shows, summed over the labels an operator does not need at a glance."""

    requests_by_status: dict[str, int] = field(default_factory=dict)
    http_requests_by_outcome: dict[str, int] = field(default_factory=dict)
    brokered_calls_by_status: dict[str, int] = field(default_factory=dict)
    refusals_by_code: dict[str, int] = field(default_factory=dict)
    rate_limit_hits: int = 0
    approvals: int = 0
    denials: int = 0
    approval_seconds_mean: float | None = None
    waiters: int = 0
    secrets: int = 0
    agents: int = 0
    audit_entries: int = 0
    store_bytes: int = 0
    telegram: str = "not configured"  # "reachable", "unreachable" or "not configured"


def read_figures(text: str) -> Figures:
    """The figures in the proxy's Prometheus text; ValueError if it is not Prometheus text."""
    if len(text) > METRICS_MAX_BYTES:
        raise ValueError(f"the metrics are over {METRICS_MAX_BYTES} bytes")
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def by(name: str, label: str) -> dict[str, int]:
        summed: dict[str, int] = {}
        for s in samples:
            if s.name == name and label in s.labels:
                summed[s.labels[label]] = summed.get(s.labels[label], 0) + int(s.value)
        return dict(sorted(summed.items()))

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    latency = "secret_proxy_approval_latency_seconds"
    decided = total(f"{latency}_count")
    configured = total("secret_proxy_telegram_configured") == 1
    reachable = total("secret_proxy_telegram_reachable") == 1
    return Figures(
        requests_by_status=by("secret_proxy_requests", "status"),
        http_requests_by_outcome=by("secret_proxy_http_requests_total", "outcome"),
        brokered_calls_by_status=by("secret_proxy_brokered_calls_total", "status"),
        refusals_by_code=by("secret_proxy_refusals_total", "code"),
        rate_limit_hits=int(total("secret_proxy_rate_limit_hits_total")),
        approvals=int(total(f"{latency}_count", decision="approved")),
        denials=int(total(f"{latency}_count", decision="denied")),
        approval_seconds_mean=round(total(f"{latency}_sum") / decided, 1) if decided else None,
        waiters=int(total("secret_proxy_waiters")),
        secrets=int(total("secret_proxy_secrets")),
        agents=int(total("secret_proxy_agents")),
        audit_entries=int(total("secret_proxy_audit_entries")),
        store_bytes=int(total("secret_proxy_store_bytes")),
        telegram=("reachable" if reachable else "unreachable") if configured else "not configured",
    )


def fetch_figures(ssh: SSHTarget, listen: str = METRICS_LISTEN) -> Figures:
    """The proxy's figures, over the host's SSH login into the VM."""
    result = ssh.run(CLI, "metrics", "--from", listen, timeout=30)
    if result.returncode != 0:
        raise TakeoverError(f"`secret-proxy metrics` failed in the VM: {result.stderr.strip()[-300:]}")
    return read_figures(result.stdout)


def uptime_seconds(pid: int, boot_seconds: Callable[[], float] | None = None) -> float:
    """How long the process has run, from its start time in /proc/PID/stat and the machine's uptime."""
    since_boot = boot_seconds() if boot_seconds else float(Path("/proc/uptime").read_text().split()[0])
    return max(0.0, since_boot - proc.start_ticks(pid) / os.sysconf("SC_CLK_TCK"))


def vm_glance(spec: HostVMSpec, runner: Runner, ssh: SSHTarget) -> dict[str, Any]:
    """The running VM's pid, uptime, /health through the host's forward, and the proxy's figures."""
    pid = runner.pid(spec)
    if pid is None:
        return {"vm": {"running": False, "detail": "not running: `python -m takeover start` starts it"}}
    vm: dict[str, Any] = {"running": True, "pid": pid}
    try:
        vm["uptime_seconds"] = round(uptime_seconds(pid))
    except (OSError, ValueError):
        vm["uptime_seconds"] = None
    started = time.monotonic()
    vm["health"] = "ok" if health.answers(spec.proxy_listen.url, HEALTH_TIMEOUT_SECONDS) else "not answering"
    vm["health_seconds"] = round(time.monotonic() - started, 3)
    try:
        metrics: dict[str, Any] | str = asdict(fetch_figures(ssh))
    except (TakeoverError, ValueError) as exc:
        metrics = f"unavailable: {exc}"
    return {"vm": vm, "metrics": metrics}


def egress_glance(host_dir: Path) -> dict[str, Any]:
    """The destinations the VM may reach (`takeover egress list` in short); nothing when egress is off."""
    try:
        plan = egress.load_plan(host_dir)
    except TakeoverError as exc:
        return {"egress_allowed": f"unreadable: {exc}"}
    return {} if plan is None else {"egress_allowed": [d.url for d in plan.destinations]}
