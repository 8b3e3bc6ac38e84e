"""The cut-over's preparation: boot the host's new VM once, in private, check it, and save it booted.

While the agent's VM still serves, the host's VM boots from the disk step `scrub` built, with
its proxy and SSH forwarded only inside a network namespace of root's own (host/private_net.py):
the agent can neither connect to those ports nor take them. The same checks as step `verify`
that need no agent run there (health, SSH with the pinned host key, the proxy user's one key,
`audit verify`, publickey only). Then QEMU saves the running VM as internal snapshot
`takeover-prepared` (disk and RAM) and quits, and the cut-over (`checkpoint`, then `restart` with
`-loadvm`) resumes it in well under a second, where a cold boot under TCG takes 15 to 20 s.

The guest's clock stops with the snapshot and runs on from the same time when it is loaded: the
cut-over follows at once, so the lag is the few seconds the checkpoint takes (docs/takeover.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from vm_image import health, proc

from ..errors import RestartError, VerifyError, from_vm_image
from ..host.keys import load_host_keys
from ..host.monitor import Monitor, Peer
from ..host.ports import check_port_free
from ..host.private_net import PrivateNet
from ..host.qmp_jobs import save_snapshot
from ..host.runners import DISK_NODE, HostVMSpec, QemuRunner
from ..host.ssh import SSHTarget
from ..host.vm_checks import check_host_login
from ..models import PREPARED_TAG, Endpoint
from .context import Context, vm_spec

QUIT_TIMEOUT = 60.0


@dataclass(frozen=True)
class FirstBootResult:
    """What the preparation proved of the host's VM before the agent's was touched, and how long it took."""

    snapshot: str
    pid: int
    health_seconds: float
    ssh_seconds: float
    host_key: str
    save_seconds: float
    seconds: float


def private_spec(spec: HostVMSpec) -> HostVMSpec:
    """The VM as it will serve, but forwarded on loopback inside the private network: the proxy on its own port,
    SSH where the host's known_hosts pins it (the same address, in another namespace)."""
    return replace(spec, proxy_listen=Endpoint("127.0.0.1", spec.proxy_listen.port), loadvm=None)


def step_first_boot(ctx: Context) -> FirstBootResult:
    started = time.monotonic()
    spec = private_spec(vm_spec(ctx))
    runner = QemuRunner(ctx.cfg.qemu_user)
    if runner.stop(spec):
        ctx.note("stopped a first boot left by an earlier attempt")
    key, known_hosts = load_host_keys(ctx.host_dir)
    ssh = SSHTarget(spec.ssh_listen, key, known_hosts)
    with PrivateNet((spec.ssh_listen.host,)) as net:
        ctx.note(f"booting the host's VM in a private network (the agent's VM at {ctx.source.proxy} still serves)")
        pid = net.run(lambda: runner.start(spec))
        try:
            ticks = proc.start_ticks(pid)

            def alive() -> bool:
                return proc.alive(pid, ticks)

            with from_vm_image(VerifyError, "the host's VM, booting in private: "):
                health_s = net.run(lambda: health.wait_for_health(spec.proxy_listen.url, ctx.cfg.boot_timeout, alive))
            ctx.note(f"/health after {health_s:.0f} s; checking SSH, the pinned host key and the audit chain")
            login = net.run(lambda: check_host_login(ssh, ctx.cfg.boot_timeout, alive))
            ctx.note(f"saving the booted VM as {PREPARED_TAG}, then stopping it")
            save_s = _save_and_quit(spec, pid, ticks)
        except BaseException:
            runner.stop(spec)
            raise
    # The cut-over binds this port on the host's loopback: a holder now is named before the agent's VM stops.
    check_port_free(ctx.cfg.ssh_listen, "the host's SSH forward")
    return FirstBootResult(
        PREPARED_TAG,
        pid,
        round(health_s, 3),
        login.seconds,
        login.host_key,
        round(save_s, 3),
        round(time.monotonic() - started, 3),
    )


def _save_and_quit(spec: HostVMSpec, pid: int, ticks: int) -> float:
    def check_peer(peer: Peer) -> None:
        if peer.pid != pid:
            raise RestartError(f"the first boot's monitor {spec.monitor} belongs to pid {peer.pid}, not {pid}")

    started = time.monotonic()
    with Monitor(spec.monitor, check_peer=check_peer) as mon:
        save_snapshot(mon, PREPARED_TAG, DISK_NODE, [DISK_NODE], RestartError, "takeover-prepare-save")
        saved = time.monotonic() - started
        try:
            mon.execute("quit", timeout=30)
        except Exception:  # noqa: BLE001 - QEMU may close the socket before answering; the wait below decides
            pass
    if not proc.wait_gone(pid, ticks, QUIT_TIMEOUT):
        raise RestartError(f"the first boot's QEMU (pid {pid}) did not quit within {QUIT_TIMEOUT:.0f} s")
    for stale in (spec.monitor, spec.pidfile):
        stale.unlink(missing_ok=True)
    return saved
