"""Step 4: scrub and re-key the host's copy, with what the host brings: its kernel, venv, system and keys.

The scrub itself (what is removed and replaced in the guest) is `guest/scrub.py`; this step
prepares what only the host may provide and records what the later steps need (keys, boot files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vm_image.boot_files import BootFiles

from ..agent.diskimage import check_virtual_size, inspect_image
from ..config import telegram_destination
from ..errors import ScrubError, from_vm_image
from ..guest.boot import host_boot_files, modules_tarball
from ..guest.scrub import ScrubPlan, ScrubResult, create_blank_disk, scrub_and_rekey
from ..host import egress
from ..host.files import ensure_host_dir
from ..host.keys import generate_host_keys
from ..host.runners import QemuRunner
from .context import DISK_NAME, Context, vm_spec


@dataclass(kw_only=True)
class ScrubOutcome(ScrubResult):
    """Step 4's result: what the scrub did, the public half of the host's new keys, and the boot files."""

    keys: dict[str, str] = field(default_factory=dict)  # HostKeys.to_dict: fingerprints and public keys
    boot: BootFiles  # what the host's VM boots from (steps/restart.py's vm_spec)


def step_scrub(ctx: Context) -> ScrubOutcome:
    cfg = ctx.cfg
    boot = boot_files(ctx)
    modules = modules_tarball(boot, ctx.host_dir / "boot") if cfg.replace_modules else None
    venv = host_venv(ctx) if cfg.reinstall_venv else None
    system, overlay = host_system(ctx) if cfg.rebuild_system else (None, None)
    if ctx.cut_over:
        # A first boot an interrupted run left running holds the disk this one replaces.
        if QemuRunner(cfg.qemu_user).stop(vm_spec(ctx, boot)):
            ctx.note("stopped the first boot an earlier attempt left running")
        blank_disk_beside(ctx)
    keys = generate_host_keys(ctx.host_dir, cfg.ssh_listen)
    ctx.note(f"new VM host key {keys.vm_host_fingerprint}; host login key {keys.login_fingerprint}")
    plan = ScrubPlan(
        keys=keys,
        proxy_config=guest_proxy_config(ctx),
        modules_tar=modules,
        venv_tar=venv,
        system_tar=system,
        system_overlay=overlay,
        force_tcg=cfg.accel != "kvm",
    )
    result = scrub_and_rekey(ctx.host_dir / DISK_NAME, plan, ctx.note)
    ctx.note(f"{len(result.changes)} changes recorded")
    inspect_image(ctx.host_dir / DISK_NAME)  # the scrub must leave a clean, self-contained qcow2
    return ScrubOutcome(**vars(result), keys=keys.to_dict(), boot=boot)


def blank_disk_beside(ctx: Context) -> None:
    """The cut-over builds the host's disk while the agent's VM runs: blank, as large as the agent's disk.

    Nothing of the agent's disk is read but its size, asked of qemu-img run as the agent (sandboxed,
    sharing the lock its QEMU holds) and bounded as step `relocate` bounds it.
    """
    source = ctx.source
    size = check_virtual_size(
        inspect_image(Path(source.disk), force_share=True, owner=source.uid).virtual_size, source.disk
    )
    disk = ctx.host_dir / DISK_NAME
    ctx.note(f"a blank disk of {size / 2**30:.1f} GiB for the host's VM (the agent's disk is not read)")
    create_blank_disk(disk, size)


def boot_files(ctx: Context) -> BootFiles:
    if ctx.boot is None:
        ctx.note("preparing the host's own kernel and initrd")
        cfg = ctx.cfg
        ctx.boot = host_boot_files(ctx.host_dir / "boot", cfg.kernel, cfg.initrd, cfg.kernel_append)
    return ctx.boot


def guest_proxy_config(ctx: Context) -> bytes | None:
    """The operator's proxy settings, plus the forward proxy the guest's proxy must use for all egress."""
    cfg = ctx.cfg
    if not cfg.egress_filter:
        (ctx.host_dir / egress.RECORD_NAME).unlink(missing_ok=True)
        return ctx.proxy_config
    plan = egress.new_plan(telegram_destination(ctx.proxy_config) + list(cfg.egress_allow), cfg.qemu_user)
    egress.save_plan(ctx.host_dir, plan)
    ctx.note(f"egress: {', '.join(d.url for d in plan.destinations) or 'nothing'}, through {plan.listen}")
    # First in the file: a key after a [table] header would belong to that table.
    return f'egress_proxy = "{plan.guest_proxy_url}"\n'.encode() + (ctx.proxy_config or b"")


def host_venv(ctx: Context) -> Path:
    """The proxy's venv, rebuilt on the host from the locked wheels by vm_image's recipe (one for both sides)."""
    from vm_image.proxy_venv import build_proxy_venv

    with from_vm_image(
        ScrubError,
        hint="check that uv is installed and uv.lock's wheels can be fetched (or are in "
        "uv's cache); or pass --no-reinstall-venv and accept the agent's venv (the "
        "report lists it as not blocked)",
    ):
        return build_proxy_venv(ctx.host_dir / "venv", ctx.note)


def host_system(ctx: Context) -> tuple[Path, Path]:
    """The host's own build of the guest's base system (cached in --cache-dir) and our files over it."""
    from vm_image.disk import write_system_overlay
    from vm_image.rootfs import base_rootfs

    cache = ensure_host_dir(ctx.cfg.cache_dir)  # root's own, 0700: what is in it goes into every VM
    with from_vm_image(
        ScrubError,
        "cannot build the host's own system image: ",
        hint="check that apt can reach Debian's archive, or pass --keep-agent-system "
        "(the report then lists the agent's /usr as not blocked)",
    ):
        system = base_rootfs(cache, progress=ctx.note)
    return system, write_system_overlay(ctx.host_dir / "system-overlay.tar")
