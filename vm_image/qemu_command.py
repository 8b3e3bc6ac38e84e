"""The QEMU command line for the agent's VM, as a pure function of its configuration (unit-tested).

The machine itself (`q35_args`) is the host's VM's too (takeover/host/runners.py): what the guest
sees does not change when the host takes it over; disks, network, monitor and sandbox differ on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import kvm_probe
from .errors import BadInput, MissingTool
from .guest_files import PROXY_PORT
from .guest_files import SSH_PORT as GUEST_SSH_PORT
from .qemu_binary import QEMU, find_qemu

TCG_CACHE_MB = 64  # TCG reserves 1 GiB for translated code by default; 64 MB is plenty for this guest


@dataclass(frozen=True)
class VmConfig:
    disk: Path
    kernel: Path | None  # None: the image boots with its own bootloader (--base-image)
    initrd: Path | None
    append: str
    monitor: Path
    pidfile: Path
    serial_log: Path
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 3737
    ssh_host: str = "127.0.0.1"
    ssh_port: int = 2222
    guest_proxy_port: int = PROXY_PORT
    memory_mb: int = 256
    cpus: int = 1
    accel: str = "tcg"  # "kvm" or "tcg"
    tcg_cache_mb: int = TCG_CACHE_MB
    seed: Path | None = None  # cloud-init NoCloud seed, attached read-only (--base-image)


def choose_accel(requested: str, probe: kvm_probe.Probe | None = None) -> str:
    """The accelerator for `requested` (auto, kvm or tcg); vm_image and the takeover both ask here.

    KVM only when a test guest really runs on it (kvm_probe; the verdict is kept for this boot).
    """
    probe = probe or kvm_probe.Probe()
    if requested not in ("auto", "kvm", "tcg"):
        raise BadInput(f"--accel must be auto, kvm or tcg, not {requested!r}")
    if requested == "tcg":
        return "tcg"
    verdict = kvm_probe.kvm_verdict(probe)
    if verdict.runs:
        return "kvm"
    if requested == "kvm":
        cache = (probe.cache_dir or kvm_probe.cache_dir_for(probe.uid)) / kvm_probe.CACHE_NAME
        raise BadInput(
            f"--accel kvm: KVM does not run guests for this user here: {verdict.detail}",
            hint=f"use --accel tcg (slower; the takeover refuses an agent in the kvm group, so an "
            f"agent's VM runs under TCG); the verdict is kept until the host reboots or {cache} "
            f"is deleted",
        )
    return "tcg"


def qemu_binary() -> str:
    path = find_qemu()
    if path is None:
        raise MissingTool(f"{QEMU} is not installed", hint="apt-get install qemu-system-x86 (or run `make setup`)")
    return path


def qemu_argv(cfg: VmConfig, binary: str = QEMU) -> list[str]:
    for name in ("disk", "kernel", "initrd", "monitor", "pidfile", "serial_log", "seed"):
        if getattr(cfg, name) is not None:
            _check_option_path(name, getattr(cfg, name))
    for name in ("proxy_host", "ssh_host"):
        if not _is_ipv4(getattr(cfg, name)):
            raise BadInput(f"{name.replace('_', ' ')} {getattr(cfg, name)!r} is not an IPv4 address")
    for name in ("proxy_port", "ssh_port"):
        if not 1 <= getattr(cfg, name) <= 65535:
            raise BadInput(f"{name.replace('_', ' ')} {getattr(cfg, name)} is not a TCP port")
    if not 128 <= cfg.memory_mb <= 65536 or not 1 <= cfg.cpus <= 64:
        raise BadInput(f"memory {cfg.memory_mb} MB / {cfg.cpus} vCPUs is out of range (128 MB-64 GB, 1-64)")
    machine = q35_args(cfg.accel, cfg.memory_mb, cfg.cpus, cfg.tcg_cache_mb)
    boot = ["-kernel", str(cfg.kernel), "-initrd", str(cfg.initrd), "-append", cfg.append] if cfg.kernel else []
    seed = ["-drive", f"file={cfg.seed},if=virtio,format=raw,readonly=on"] if cfg.seed else []
    forwards = (
        f"hostfwd=tcp:{cfg.proxy_host}:{cfg.proxy_port}-:{cfg.guest_proxy_port},"
        f"hostfwd=tcp:{cfg.ssh_host}:{cfg.ssh_port}-:{GUEST_SSH_PORT}"
    )
    return [
        binary,
        "-name",
        "secret-proxy-vm",
        *machine,
        "-no-reboot",
        *boot,
        "-drive",
        f"file={cfg.disk},if=virtio,format=qcow2,discard=unmap",
        *seed,
        "-netdev",
        f"user,id=net0,{forwards}",
        "-device",
        "virtio-net-pci,netdev=net0",
        "-device",
        "virtio-rng-pci",
        "-serial",
        f"file:{cfg.serial_log}",
        "-qmp",
        f"unix:{cfg.monitor},server=on,wait=off",
        "-pidfile",
        str(cfg.pidfile),
        "-daemonize",
    ]


def q35_args(accel: str, memory_mb: int, cpus: int, tcg_cache_mb: int = TCG_CACHE_MB) -> list[str]:
    """The machine, for the agent's VM and the host's: q35 under `accel` (kvm: the host's CPU; tcg: QEMU's
    fullest model, with a small translation cache), its memory and vCPUs, no default devices, no user
    configuration file, no display."""
    if accel == "kvm":
        accel_args = ["-accel", "kvm", "-cpu", "host"]
    elif accel == "tcg":
        accel_args = ["-accel", f"tcg,tb-size={tcg_cache_mb}", "-cpu", "max"]
    else:
        raise BadInput(f"accelerator {accel!r} is not kvm or tcg")
    return [
        "-machine",
        "q35",
        *accel_args,
        "-m",
        str(memory_mb),
        "-smp",
        str(cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]


def _check_option_path(name: str, path: Path) -> None:
    text = str(path)
    if not path.is_absolute():
        raise BadInput(f"{name} path {text!r} must be absolute")
    if any(c in text for c in ",\n\0"):
        raise BadInput(f"{name} path {text!r} contains a comma, newline or NUL, which QEMU's options cannot hold")


def _is_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and 0 <= int(p) <= 255 and str(int(p)) == p for p in parts)
