"""The takeover's steps, in order, in one table: name, title, function, and where a rerun resumes.

Each step is a function taking the run's `Context` and returning plain data for the journal;
most call one module of this package that does the work. `runbook.py` runs the table, and the
journal, the report and the progress display take each step's name and title from it: adding
or reordering a step is one edit to `STEPS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from . import egress
from .agent_owner import HostBoundary
from .boot import BootFiles, host_boot_files, modules_tarball
from .checkpoint import save_checkpoint_and_stop
from .config import TakeoverConfig, telegram_destination
from .diskimage import inspect_image
from .errors import InvalidInput, ScrubError, from_vm_image
from .files import ensure_host_dir
from .find_vm import explicit_ready, find_and_check_vm, read_ready_file
from .host_keys import generate_host_keys, load_host_keys
from .journal import Journal
from .models import Endpoint, SourceVM
from .ports import bind_refusal
from .relocate import DISK_NAME, PARTIAL_NAME, relocate_disk
from .report import build_report, summary, write_report
from .restart import HostVMSpec, Runner, make_runner, restart_as_host
from .revoke import revoke_agent_access
from .scrub import ScrubPlan, scrub_and_rekey
from .verify import SSHTarget, create_agent_token, verify_host_vm


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
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> SourceVM:
        return SourceVM.from_dict(self.journal.result("find_vm"))

    def note(self, text: str) -> None:
        self.progress.note(text)


# -- the steps -----------------------------------------------------------------------------------


def step_find_vm(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    if cfg.monitor or cfg.disk:
        if not (cfg.monitor and cfg.disk):
            raise InvalidInput("--monitor and --disk go together")
        ready = explicit_ready(cfg.monitor, cfg.disk)  # the proxy: where the agent's QEMU forwards it
    elif cfg.ready_file is not None:
        ready = read_ready_file(cfg.ready_file)
    else:
        raise_no_vm_named()
    # The VM must be one unprivileged user's, outside every host directory (agent_owner's docstring).
    boundary = HostBoundary.for_takeover(ctx.host_dir, cfg.qemu_user, extra_dirs=(cfg.cache_dir,))
    source = find_and_check_vm(ready, ctx.host_dir, boundary, proxy_listen=cfg.proxy_listen)
    if cfg.ssh_listen.port == source.proxy.port and cfg.ssh_listen.host == source.proxy.host:
        raise InvalidInput(f"--ssh-listen {cfg.ssh_listen} is the proxy's address")
    check_ssh_listen_free(cfg.ssh_listen)
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
    result = relocate_disk(
        Path(source.disk), ctx.host_dir, expect_inode=(source.disk_dev, source.disk_ino), progress=ctx.note
    )
    ctx.note(
        f"{result.size / 2**20:.0f} MiB, sha256 {result.sha256[:16]}..., {result.allocated / 2**20:.0f} MiB "
        f"allocated (source {result.source_allocated / 2**20:.0f} MiB)"
    )
    return result.to_dict()


def step_scrub(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    boot = boot_files(ctx)
    modules = modules_tarball(boot, ctx.host_dir / "boot") if cfg.replace_modules else None
    venv = host_venv(ctx) if cfg.reinstall_venv else None
    system, overlay = host_system(ctx) if cfg.rebuild_system else (None, None)
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
    result = scrub_and_rekey(ctx.host_dir / DISK_NAME, plan, ctx.note).to_dict()
    ctx.note(f"{len(result['changes'])} changes recorded")
    inspect_image(ctx.host_dir / DISK_NAME)  # the scrub must leave a clean, self-contained qcow2
    result["keys"] = keys.to_dict()
    result["boot"] = boot.to_dict()
    return result


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


def step_restart(ctx: Context) -> dict[str, Any]:
    spec = vm_spec(ctx)
    plan = egress.load_plan(ctx.host_dir) if ctx.cfg.egress_filter else None
    limits = egress.enforce(plan, ctx.host_dir) if plan is not None else {"filter": "off"}
    return {**restart_as_host(spec, runner_for(ctx.cfg), ctx.note), "egress": limits}


def step_verify(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    source = ctx.source
    restart = ctx.journal.result("restart")
    key, known_hosts = load_host_keys(ctx.host_dir)
    ssh = SSHTarget(cfg.ssh_listen, key, known_hosts)
    result = verify_host_vm(
        source.proxy,
        ssh,
        restart["pid"],
        setup_key_pub=source.setup_key_pub,
        agent_uid=source.uid,
        timeout=cfg.boot_timeout,
        progress=ctx.note,
    )
    ctx.note(
        f"/health after {result['health_seconds']:.0f} s; SSH as the host works; the agent's key: {result['agent_key']}"
    )
    if cfg.agent_name:
        token_file = cfg.token_file or ctx.host_dir / f"agent-{cfg.agent_name}.token"
        if token_file.exists():
            ctx.note(f"{token_file} exists from an earlier attempt; not creating the agent again")
            result["agent_token"] = {
                "agent": cfg.agent_name,
                "secrets": cfg.agent_secrets,
                "token_file": str(token_file),
            }
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
    report = build_report(ctx.journal, ctx.host_dir, TITLES)
    path = write_report(report, ctx.host_dir)
    ctx.summary = summary(report)
    return {"report": str(path)}


# -- helpers --------------------------------------------------------------------------------------


def raise_no_vm_named() -> NoReturn:
    """There is no default ready file: the host never guesses which user's VM to take."""
    raise InvalidInput("no --ready-file given; pass the agent's ready file (STATE/run/ready) or --monitor and --disk")


def check_ssh_listen_free(endpoint: Endpoint) -> None:
    """Step 1 refuses a taken --ssh-listen before anything changes (step 5 checks again, naming the holder)."""
    reason = bind_refusal(endpoint, reuse_addr=False)
    if reason is not None:
        raise InvalidInput(
            f"{endpoint} (the host's SSH forward) is in use: {reason}", hint="choose another --ssh-listen"
        )


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


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str  # the journal's key and --fail-after's value
    title: str  # what the progress display and the report call it
    run: Callable[[Context], dict[str, Any]]
    # Where a rerun starts again when it finds this step unfinished (None: the step itself).
    resume_from: str | None = None


# A half-scrubbed copy is not trusted (we cannot know which plants were already removed), so
# scrub restarts from a fresh copy; a half-verified VM is restarted, and an unfinished checkpoint
# needs the live VM checked again before anything is sent to its monitor.
STEPS: tuple[Step, ...] = (
    Step("find_vm", "find and check the agent's VM", step_find_vm),
    Step("checkpoint", "checkpoint and stop it", step_checkpoint, resume_from="find_vm"),
    Step("relocate", "copy the disk to the host", step_relocate),
    Step("scrub", "scrub and re-key the copy", step_scrub, resume_from="relocate"),
    Step("restart", "start the VM as the host's", step_restart),
    Step("verify", "verify the new VM", step_verify, resume_from="restart"),
    Step("revoke", "revoke the agent's leftovers", step_revoke),
    Step("report", "write the report", step_report),
)
NAMES: tuple[str, ...] = tuple(step.name for step in STEPS)
TITLES: dict[str, str] = {step.name: step.title for step in STEPS}
# A step a rerun starts from invalidates what the steps after it produced.
RESUME_POINTS: frozenset[str] = frozenset(step.resume_from for step in STEPS if step.resume_from)


def first_step_to_run(journal: Journal) -> str | None:
    """The step a rerun starts from, or None when every step is done."""
    for step in STEPS:
        if not journal.done(step.name):
            return step.resume_from or step.name
    return None


def steps_to_run(journal: Journal) -> list[Step]:
    start = first_step_to_run(journal)
    return [] if start is None else list(STEPS[NAMES.index(start) :])
