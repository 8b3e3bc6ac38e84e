"""What every step is given: the run's settings, host directory, journal, and where to say what it does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vm_image.boot_files import BootFiles

from ..agent.machine import Connection, connect
from ..config import TakeoverConfig
from ..host.runners import HostVMSpec, Runner, make_runner
from ..journal import Journal
from ..models import SourceVM
from ..record import from_record

DISK_NAME = "disk.qcow2"  # the host's VM's disk in the host directory


class Notes(Protocol):
    """What a step may tell the operator: `progress.Progress` (which takes its titles from this table)."""

    def note(self, text: str) -> None: ...


@dataclass
class Context:
    cfg: TakeoverConfig
    host_dir: Path
    journal: Journal
    progress: Notes
    proxy_config: bytes | None = None
    summary: str = ""
    boot: BootFiles | None = None  # the host's kernel and initrd, prepared once per run (steps/scrub.py)
    cut_over: bool = False  # the run follows steps.CUT_OVER: the host's disk is built before the agent's VM stops
    _machine: Connection | None = None

    def machine(self) -> Connection:
        """The one connection to the agent machine (--agent-machine), opened at first use, closed by `close`."""
        if self._machine is None:
            self._machine = connect(self.cfg, self.host_dir)
        return self._machine

    def close(self) -> None:
        machine, self._machine = self._machine, None
        if machine is not None:
            machine.close()

    @property
    def source(self) -> SourceVM:
        return self.journal.read("find_vm", SourceVM)

    def note(self, text: str) -> None:
        self.progress.note(text)


def vm_spec(ctx: Context, boot: BootFiles | None = None) -> HostVMSpec:
    """The host's VM as the run made it: its disk, the boot files step `scrub` prepared, the operator's size."""
    cfg, source = ctx.cfg, ctx.source
    if boot is None:
        boot = from_record(BootFiles, ctx.journal.result("scrub")["boot"], "step scrub's boot files")
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
