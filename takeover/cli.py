"""`python -m takeover run | rollback | status | start | stop | remove | upgrade | backup | restore`:
the host takes over the VM an agent built, and operates it.

Exit status: 0 done; 1 a takeover error (the message says what went wrong and
what to do); 2 bad usage.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from . import backup, service
from .agent.machine import MachineAddress
from .config import DEFAULT_CACHE_DIR, DEFAULT_HOST_DIR, DEFAULT_SSH, TakeoverConfig
from .errors import InvalidInput, TakeoverError, from_vm_image
from .host.egress import Destination, refuse_unsafe
from .host.files import check_trusted_parent
from .host.terminal import show
from .models import Endpoint
from .progress import Progress
from .record import to_record
from .remove import remove_host_vm
from .rollback import roll_back
from .runbook import change_egress, run_takeover, start_host_vm, status, stop_host_vm
from .service import UNIT_DIR
from .steps import ALL_NAMES
from .upgrade import STAGES as UPGRADE_STAGES
from .upgrade import summary as upgrade_summary
from .upgrade import upgrade


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m takeover", description="take over the secret-proxy VM an agent built")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--host-dir",
            type=Path,
            default=DEFAULT_HOST_DIR,
            help=f"the host's directory for the VM (default {DEFAULT_HOST_DIR}; root, 0700)",
        )

    run = sub.add_parser("run", help="build the host's VM, cut over to it, verify, revoke the agent (resumes)")
    common(run)
    src = run.add_argument_group("the agent's VM")
    src.add_argument("--ready-file", type=Path, help="the agent's ready file (STATE/run/ready)")
    src.add_argument("--monitor", type=Path, help="the QMP socket, instead of a ready file (with --disk)")
    src.add_argument("--disk", type=Path, help="the VM's qcow2, instead of a ready file (with --monitor)")
    am = run.add_argument_group("an agent in a machine of its own (docs/takeover.md: the agent on its own machine)")
    am.add_argument(
        "--agent-machine",
        metavar="USER@HOST[:PORT]",
        help="the agent's VM is nested in this machine, reached as root over SSH; --ready-file is then its path there",
    )
    am.add_argument("--agent-machine-key", type=Path, metavar="KEY", help="root's private key for it (root's, 0600)")
    am.add_argument(
        "--agent-machine-known-hosts",
        type=Path,
        metavar="FILE",
        help="its SSH host key, pinned (a known_hosts line; root's); never learnt on first use",
    )
    am.add_argument(
        "--serve-on",
        type=Endpoint.parse,
        metavar="HOST:PORT",
        help="where the host serves the proxy back to the agent machine, reachable by it alone "
        "(default: this host's address on the route to it, and the nested proxy's port)",
    )
    am.add_argument(
        "--copy-user",
        default=TakeoverConfig.copy_user,
        help=f"unprivileged user that reads the disk brought out of the machine (default {TakeoverConfig.copy_user})",
    )
    vm = run.add_argument_group("the host's VM")
    vm.add_argument("--runner", choices=("qemu", "libvirt"), default=TakeoverConfig.runner)
    vm.add_argument("--libvirt-uri", default=TakeoverConfig.libvirt_uri)
    vm.add_argument(
        "--qemu-user",
        default=TakeoverConfig.qemu_user,
        help="unprivileged user the qemu runner's QEMU switches to (created if missing; 'root' to not switch)",
    )
    vm.add_argument(
        "--accel",
        choices=("auto", "tcg", "kvm"),
        default="auto",
        help="kvm when /dev/kvm is usable, else tcg (default auto)",
    )
    vm.add_argument(
        "--memory",
        type=_bounded(128, 65536),
        default=TakeoverConfig.memory_mb,
        metavar="MB",
        help=f"the host's VM's memory (default {TakeoverConfig.memory_mb}; the agent's VM size is not used)",
    )
    vm.add_argument(
        "--cpus",
        type=_bounded(1, 64),
        default=TakeoverConfig.cpus,
        metavar="N",
        help=f"the host's VM's vCPUs (default {TakeoverConfig.cpus})",
    )
    vm.add_argument(
        "--proxy-listen", type=Endpoint.parse, help="HOST:PORT for the proxy (default: the address the agent's VM used)"
    )
    vm.add_argument(
        "--ssh-listen",
        type=Endpoint.parse,
        default=DEFAULT_SSH,
        help=f"host-only HOST:PORT forwarded to the VM's SSH (default {DEFAULT_SSH})",
    )
    vm.add_argument(
        "--proxy-config",
        type=Path,
        help="TOML with the proxy's settings (Telegram) to install: root's, 0600, in root-only directories",
    )
    vm.add_argument(
        "--allow-telegram-api-url",
        metavar="URL",
        help="accept this telegram_api_url in --proxy-config (a Bot API server you run yourself); "
        "any URL but https://api.telegram.org is refused without it",
    )
    vm.add_argument(
        "--egress-allow",
        action="append",
        default=[],
        metavar="URL",
        help="a destination the VM may reach besides Telegram (scheme, host and port; repeat it), "
        "e.g. a brokered secret's API: https://api.example.com",
    )
    vm.add_argument(
        "--no-egress-filter",
        action="store_true",
        help="let the VM reach anything (reported as not blocked); by default it reaches only Telegram "
        "and --egress-allow through a forward proxy on the host",
    )
    vm.add_argument(
        "--boot-timeout",
        type=float,
        default=TakeoverConfig.boot_timeout,
        help=f"seconds to wait for /health and SSH (default {TakeoverConfig.boot_timeout:.0f})",
    )
    vm.add_argument(
        "--no-reinstall-venv",
        action="store_true",
        help="keep the agent's proxy venv instead of rebuilding it from uv.lock (reported as not blocked)",
    )
    vm.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help=f"the host's own build of the guest system, reused by later takeovers (default {DEFAULT_CACHE_DIR})",
    )
    vm.add_argument(
        "--keep-agent-system",
        action="store_true",
        help="scrub the agent's filesystem in place instead of rebuilding it from the host's own build "
        "of Debian (faster; the agent's /usr is then reported as not blocked)",
    )
    order = vm.add_mutually_exclusive_group()
    order.add_argument(
        "--cut-over",
        dest="cut_over",
        action="store_true",
        default=True,
        help="(the default) build, boot in private and check the host's VM while the agent's still serves, "
        "then switch in about a second (docs/takeover.md)",
    )
    order.add_argument(
        "--in-order",
        dest="cut_over",
        action="store_false",
        help="stop the agent's VM first, then copy, scrub and boot: the proxy is down from the checkpoint "
        "until the host's VM has booted (a minute or more under TCG); what --keep-agent-system, "
        "--runner libvirt and --agent-machine always do",
    )
    vm.add_argument(
        "--no-replace-modules",
        action="store_true",
        help="keep the agent's /lib/modules instead of the host kernel's (reported as not blocked)",
    )
    vm.add_argument("--kernel", type=Path, help="boot this kernel (with --initrd) instead of vm_image.boot_files")
    vm.add_argument("--initrd", type=Path, help="the initrd for --kernel")
    vm.add_argument(
        "--kernel-append", help="kernel command line (default: vm_image's, root=/dev/vda rw console=ttyS0 panic=-1)"
    )
    vm.add_argument("--keep-source", action="store_true", help="do not delete the agent's disk at the end")
    ag = run.add_argument_group("an agent token, created through the new SSH key")
    ag.add_argument("--agent-name", help="create this agent in the fresh proxy")
    ag.add_argument(
        "--agent-secrets",
        default=TakeoverConfig.agent_secrets,
        help=f"comma-separated secret name patterns (default {TakeoverConfig.agent_secrets})",
    )
    ag.add_argument(
        "--token-file", type=Path, help="where to write its token (0600; default HOST_DIR/agent-NAME.token)"
    )
    run.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary")
    run.add_argument("--fail-after", choices=ALL_NAMES, help=argparse.SUPPRESS)  # tests: fault injection

    rb = sub.add_parser("rollback", help="stop the host's VM and restart the agent's VM from takeover-checkpoint")
    common(rb)
    rb.add_argument("--cold", action="store_true", help="boot the agent's disk without its checkpoint")

    st = sub.add_parser("status", help="print the journal's state")
    common(st)
    common(sub.add_parser("start", help="start the taken-over VM again (e.g. after a host reboot)"))
    common(sub.add_parser("stop", help="stop the taken-over VM (a libvirt domain stays defined, with autostart)"))
    rm = sub.add_parser(
        "remove",
        help="delete the host's VM for good: its egress table and forward proxy, the users its runs created, "
        "and the host directory (docs/operations.md)",
    )
    common(rm)
    rm.add_argument(
        "--stop",
        action="store_true",
        help="stop the VM first if it runs (and discard an unfinished takeover instead of rolling it back); "
        "without it a running VM is refused",
    )
    eg = sub.add_parser("egress", help="what the taken-over VM may reach: list, allow or remove destinations")
    actions = eg.add_subparsers(dest="action", required=True, metavar="ACTION")
    common(actions.add_parser("list", help="the destinations and the forward proxy's address"))
    for name, what in (("allow", "let the VM reach these"), ("remove", "stop the VM reaching these")):
        change = actions.add_parser(name, help=what)
        common(change)
        change.add_argument("urls", nargs="+", metavar="URL", help="https://host[:port] or http://host:port")
    sync = actions.add_parser("sync", help="compare with the destinations of the VM's stored policies")
    common(sync)
    sync.add_argument(
        "--apply",
        nargs="?",
        const="",
        metavar="DIGEST",
        help="allow exactly what the last `sync` showed (checked against its DIGEST when given); the VM is not "
        "asked again. Without it, only show what is missing",
    )

    # -- upgrades: takeover/upgrade.py (docs/operations.md, "Upgrades") --
    up = sub.add_parser(
        "upgrade",
        help="rebuild the host's VM from this host's current build, keeping the proxy's store; "
        "the old VM comes back on any failure",
    )
    common(up)
    up.add_argument("--json", action="store_true", help="print upgrade.json's record of this attempt as JSON")
    up.add_argument("--fail-after", choices=tuple(UPGRADE_STAGES), help=argparse.SUPPRESS)  # tests: fault injection

    # -- backups: takeover/backup.py --
    bk = sub.add_parser(
        "backup",
        help="seal a consistent copy of the VM's store and audit to the operator's key (keygen, show: see ACTION)",
    )
    common(bk)
    bk.add_argument("--recipient", type=Path, metavar="KEY.pub", help="the operator's public key (backup keygen)")
    bk.add_argument(
        "--to", type=Path, metavar="FILE", help="a new file in root-only directories (default HOST_DIR/backups/)"
    )
    bk_actions = bk.add_subparsers(dest="action", metavar="ACTION")
    keygen = bk_actions.add_parser("keygen", help="a new key pair: backup.key (take it OFF this host) and .pub")
    keygen.add_argument("--out", type=Path, required=True, metavar="DIR", help="a directory only root can change")
    shown = bk_actions.add_parser("show", help="a backup's header (when, from where, to which key), without a key")
    shown.add_argument("file", type=Path)
    rs = sub.add_parser(
        "restore", help="put a backup into the VM (checked whole first; the VM restarts), then verify the audit"
    )
    common(rs)
    rs.add_argument("--from", dest="source", type=Path, required=True, metavar="FILE", help="the backup (root's, 0600)")
    rs.add_argument("--key", type=Path, required=True, metavar="backup.key", help="the operator's private key")

    # -- the systemd unit (issue 25): takeover/service.py --
    svc = sub.add_parser("service", help="the systemd unit that starts the VM at boot and after a QEMU crash")
    units = svc.add_subparsers(dest="action", required=True, metavar="ACTION")
    inst = units.add_parser("install", help=f"write {UNIT_DIR}/secret-proxy-vm@.service and name this instance")
    common(inst)
    inst.add_argument("--unit-dir", type=Path, default=UNIT_DIR, help=f"where units go (default {UNIT_DIR})")
    inst.add_argument("--enable", action="store_true", help="then systemctl daemon-reload and enable --now it")
    rem = units.add_parser("remove", help="delete the template unit (--disable: stop and disable this instance)")
    common(rem)
    rem.add_argument("--unit-dir", type=Path, default=UNIT_DIR, help=f"where units go (default {UNIT_DIR})")
    rem.add_argument("--disable", action="store_true", help="systemctl disable --now this instance first")
    common(units.add_parser("prepare", help="the unit's ExecStartPre: apply the egress rules, start the forward proxy"))
    return p


def service_command(cfg: TakeoverConfig, args: argparse.Namespace) -> dict[str, object]:
    if args.action == "install":
        return service.install_for(cfg.host_dir, args.unit_dir, enable=args.enable)
    if args.action == "remove":
        return service.remove_for(cfg.host_dir, args.unit_dir, disable=args.disable)
    return service.prepare(cfg.host_dir)


def backup_command(cfg: TakeoverConfig, args: argparse.Namespace) -> dict[str, object]:
    if args.action == "keygen":
        return backup.keygen(args.out)
    if args.action == "show":
        return backup.show(args.file)
    if args.recipient is None:
        raise InvalidInput(
            "`takeover backup` needs --recipient KEY.pub",
            hint="make a key pair once with `python -m takeover backup keygen --out DIR` (docs/operations.md)",
        )
    return backup.take_backup(cfg, args.recipient, args.to)


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def resolve_accel(requested: str) -> str:
    from vm_image.qemu_command import choose_accel  # one KVM check for both sides

    with from_vm_image(InvalidInput, hint="use --accel tcg (slower)"):
        return choose_accel(requested)


def config_from_args(args: argparse.Namespace) -> TakeoverConfig:
    if args.command != "run":
        return TakeoverConfig(host_dir=args.host_dir)
    if args.runner == "libvirt" and not args.no_egress_filter:
        raise InvalidInput(
            "the egress filter matches QEMU's own user, which libvirt shares between all its domains; "
            "it runs with the qemu runner only",
            hint="use --runner qemu (the default), or pass --no-egress-filter with --runner libvirt and "
            "accept that the VM can reach anything (the report lists it as not blocked)",
        )
    if args.qemu_user == "root" and not args.no_egress_filter:
        raise InvalidInput(
            "the egress filter matches the host VM's QEMU user, and root's connections cannot be singled out",
            hint="keep the default --qemu-user (or name another user), or pass --no-egress-filter",
        )
    if not args.no_egress_filter:
        # Before anything is taken over: a destination any local user could answer for is refused now.
        refuse_unsafe({Destination.parse(url) for url in args.egress_allow})
        if args.allow_telegram_api_url:
            try:
                bot_api = Destination.parse(args.allow_telegram_api_url)
            except InvalidInput:
                pass  # not a URL the list can hold: the takeover's own check of the config says so
            else:
                refuse_unsafe({bot_api})
    if args.agent_machine is not None:
        MachineAddress.parse(args.agent_machine)
        if args.agent_machine_key is None or args.agent_machine_known_hosts is None:
            raise InvalidInput(
                "--agent-machine needs --agent-machine-key and --agent-machine-known-hosts",
                hint="root's key for the machine, and its host key as a known_hosts line (docs/takeover.md)",
            )
        if args.proxy_listen is not None:
            raise InvalidInput("--proxy-listen is for a local agent; with --agent-machine, name --serve-on")
        if not ipaddress.ip_address(args.ssh_listen.host).is_loopback:
            raise InvalidInput(
                f"--ssh-listen {args.ssh_listen}: with an agent machine the VM's SSH stays on this host's loopback, "
                f"where the agent machine cannot reach it"
            )
    elif args.serve_on is not None:
        raise InvalidInput("--serve-on is for an agent machine (--agent-machine); a local agent keeps its address")
    if args.token_file is not None and args.token_file.parent != args.host_dir:
        # Refuse now, not after the VM is taken over. Directly in --host-dir is fine: the takeover makes
        # that directory itself (root's, 0700) and checks the path again before writing.
        check_trusted_parent(args.token_file, "--token-file")
    return TakeoverConfig(
        host_dir=args.host_dir,
        ready_file=args.ready_file,
        monitor=args.monitor,
        disk=args.disk,
        proxy_listen=args.proxy_listen,
        ssh_listen=args.ssh_listen,
        runner=args.runner,
        libvirt_uri=args.libvirt_uri,
        qemu_user=None if args.qemu_user == "root" else args.qemu_user,
        accel=resolve_accel(args.accel),
        memory_mb=args.memory,
        cpus=args.cpus,
        keep_source=args.keep_source,
        proxy_config=args.proxy_config,
        allow_telegram_api_url=args.allow_telegram_api_url,
        egress_filter=not args.no_egress_filter,
        egress_allow=tuple(args.egress_allow),
        agent_name=args.agent_name,
        agent_secrets=args.agent_secrets,
        token_file=args.token_file,
        boot_timeout=args.boot_timeout,
        reinstall_venv=not args.no_reinstall_venv,
        rebuild_system=not args.keep_agent_system,
        cut_over=args.cut_over,
        cache_dir=args.cache_dir,
        replace_modules=not args.no_replace_modules,
        kernel=args.kernel,
        initrd=args.initrd,
        kernel_append=args.kernel_append,
        agent_machine=args.agent_machine,
        agent_machine_key=args.agent_machine_key,
        agent_machine_known_hosts=args.agent_machine_known_hosts,
        serve_on=args.serve_on,
        copy_user=args.copy_user,
        fail_after=args.fail_after,
    )


def json_text(data: object) -> str:
    # ensure_ascii escapes every control and non-ASCII character but DEL; escape that too, and the
    # text stays valid JSON that `show` passes through unchanged.
    return json.dumps(data, indent=2).replace("\x7f", "\\u007f")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every line below reaches root's terminal through `show`, which escapes control sequences:
    # paths, names and answers in these messages may be the agent's.
    try:
        cfg = config_from_args(args)
        if args.command == "run":
            report, text = run_takeover(cfg, Progress())
            show(json_text(report) if args.json else text)
        elif args.command == "rollback":
            show(json_text(roll_back(cfg, Progress(), cold=args.cold)))
        elif args.command == "start":
            show(json_text(start_host_vm(cfg)))
        elif args.command == "stop":
            show(json_text(stop_host_vm(cfg)))
        elif args.command == "remove":
            show(json_text(remove_host_vm(cfg, stop=args.stop)))
        elif args.command == "egress":
            urls, applying = getattr(args, "urls", []), getattr(args, "apply", None)
            digest = applying or None
            show(json_text(change_egress(cfg, args.action, urls, apply=applying is not None, digest=digest)))
        elif args.command == "upgrade":
            record = upgrade(cfg, fail_after=args.fail_after)
            show(json_text(to_record(record)) if args.json else upgrade_summary(record))
        elif args.command == "service":
            show(json_text(service_command(cfg, args)))
        elif args.command == "backup":
            show(json_text(backup_command(cfg, args)))
        elif args.command == "restore":
            show(json_text(backup.restore_backup(cfg, args.source, args.key)))
        else:
            show(json_text(status(cfg)))
    except TakeoverError as err:
        show(f"takeover: {err}\n  what to do: {err.hint}", sys.stderr)
        return 1
    except KeyboardInterrupt:
        show("takeover: interrupted; the journal records how far it got. Rerun to resume, or roll back.", sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug; its traceback may quote the agent's strings, so escape it too
        show(traceback.format_exc(), sys.stderr)
        return 1
    return 0
