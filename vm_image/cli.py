"""`python -m vm_image build | launch | up | status | stop`: the agent's side of the VM.

Exit status: 0 done; 1 an error (the message says what went wrong and what to
do); 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .build import build
from .control import status, stop
from .errors import VmImageError
from .launch import launch
from .layout import Layout, default_cache_dir, default_state_dir
from .progress import Steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vm_image", description="build and run the secret-proxy VM (the agent's side)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help="where the image and the running VM's files live "
            "(default $SECRET_PROXY_VM_STATE or ~/.local/state/secret-proxy-vm)",
        )
        sp.add_argument(
            "--cache-dir",
            type=Path,
            default=None,
            help="build cache: root filesystem, venv, kernel (default $SECRET_PROXY_VM_CACHE or STATE/cache)",
        )

    def build_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--mirror", help="Debian mirror URL (default: the one apt uses)")
        sp.add_argument("--disk-size", default="2G", help="virtual size of the guest's disk (default 2G; sparse)")
        sp.add_argument("--force", action="store_true", help="rebuild even if no input changed (new setup key)")
        sp.add_argument(
            "--base-image",
            type=Path,
            default=None,
            help="use this cloud image (qcow2 or raw, Debian 12-compatible) under a copy-on-write "
            "overlay, provisioned by cloud-init from a NoCloud seed, instead of building one",
        )

    def launch_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--host", default="127.0.0.1", help="host address the proxy is forwarded to (default 127.0.0.1)"
        )
        sp.add_argument("--port", type=int, default=3737, help="host port for the proxy (default 3737)")
        sp.add_argument("--ssh-port", type=int, default=2222, help="127.0.0.1 port forwarded to the guest's SSH")
        sp.add_argument("--memory", type=int, default=256, help="guest RAM in MB (default 256)")
        sp.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
        sp.add_argument(
            "--accel",
            default="auto",
            choices=("auto", "kvm", "tcg"),
            help="kvm when /dev/kvm is usable, else tcg (default auto)",
        )
        sp.add_argument("--timeout", type=float, default=600, help="seconds to wait for /health (default 600)")

    b = sub.add_parser("build", help="build the guest image (cached: unchanged inputs are not rebuilt)")
    common(b)
    build_options(b)
    la = sub.add_parser("launch", help="start the built image, wait for /health, write the ready file")
    common(la)
    launch_options(la)
    up = sub.add_parser("up", help="build, launch and signal ready for takeover, in one command")
    common(up)
    build_options(up)
    launch_options(up)
    st = sub.add_parser("status", help="is the VM running, what QMP says, does the proxy answer")
    common(st)
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    so = sub.add_parser("stop", help="power the VM down through QMP (quit, then kill, after --timeout)")
    common(so)
    so.add_argument("--timeout", type=float, default=60, help="seconds to wait for a clean power-down (default 60)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        layout = Layout(args.state_dir or default_state_dir(), args.cache_dir or default_cache_dir())
        return COMMANDS[args.command](args, layout)
    except VmImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"  what to do: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _build(args: argparse.Namespace, layout: Layout, steps: Steps | None = None) -> int:
    manifest = build(
        layout,
        mirror=args.mirror,
        disk_size=args.disk_size,
        force=args.force,
        base_image=args.base_image,
        steps=steps or Steps(total=5),
    )
    disk = manifest["disk"]
    print(f"image: {disk['path']} ({disk['bytes'] / 2**20:.0f} MB qcow2, {disk['virtual_size']} virtual)")
    print(f"manifest: {layout.manifest}")
    print(f"setup key: {layout.setup_key} ({manifest['ssh'].get('setup_key_fingerprint', 'new')})")
    return 0


def _launch(args: argparse.Namespace, layout: Layout, steps: Steps | None = None) -> int:
    ready = launch(
        layout,
        proxy_host=args.host,
        proxy_port=args.port,
        ssh_port=args.ssh_port,
        memory_mb=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        timeout=args.timeout,
        steps=steps or Steps(total=3),
    )
    _summary(layout, ready)
    return 0


def _up(args: argparse.Namespace, layout: Layout) -> int:
    steps = Steps(total=4 if args.base_image else 8)
    _build(args, layout, steps)
    return _launch(args, layout, steps)


def _summary(layout: Layout, ready: dict[str, Any]) -> None:
    proxy, ssh = ready["proxy"], ready["ssh"]
    print(f"proxy: http://{proxy['host']}:{proxy['port']} (healthy after {ready['boot_seconds']} s, {ready['accel']})")
    print(f"monitor: {ready['monitor']}")
    print(f"ssh: ssh -i {layout.setup_key} -p {ssh['port']} proxy@{ssh['host']}")
    print(f"ready for takeover: {layout.ready}")


def _status(args: argparse.Namespace, layout: Layout) -> int:
    report = status(layout)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0 if report["running"] else 3


def _stop(args: argparse.Namespace, layout: Layout) -> int:
    how = stop(layout, timeout=args.timeout, note=lambda text: print(f"  {text}", file=sys.stderr))
    print(f"VM {how}")
    return 0


COMMANDS = {"build": _build, "launch": _launch, "up": _up, "status": _status, "stop": _stop}
