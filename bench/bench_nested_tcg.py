"""TCG inside TCG: the proxy VM launched inside a real agent machine (a VM under TCG), against the same launch here.

    flock /var/tmp/spvm-slow.lock .venv/bin/python bench/bench_nested_tcg.py [--timeout 2400]

As root. The agent machine is scripts/agent_machine_vm.py's (Debian 12 with QEMU, Python and this
checkout, booted under TCG with 2 vCPUs and 2.5 GiB); the proxy's image is the one the slow tests'
agent builds with `vm_image build` (tests/vm_fixtures.py agent_image()). Printed: building the
machine's disk, its boot to root's first SSH command, copying the image into it, and the nested
`vm_image launch --accel tcg` to /health; then, as the baseline, the same launch of the same image
on this host (256 MB, 1 vCPU, TCG: vm_image's defaults, in both places). Every wait is bounded;
a nested launch that does not reach /health in `--timeout` seconds is reported with how far it got.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.demo import free_port  # noqa: E402
from scripts.agent_machine_vm import (  # noqa: E402
    boot_machine,
    build_machine_image,
    copy_proxy_image,
    launch_nested,
)
from tests.vm_fixtures import agent_image  # noqa: E402
from vm_image.control import stop  # noqa: E402
from vm_image.launch import launch  # noqa: E402
from vm_image.layout import Layout  # noqa: E402
from vm_image.progress import Steps  # noqa: E402


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def launch_on_host(image_state: Path, work: Path) -> float:
    """The baseline: `vm_image launch --accel tcg` of a copy of the same image, here; boot to /health in s."""
    layout = Layout(work / "host-state")
    layout.make_dirs()
    shutil.rmtree(layout.image)
    subprocess.run(["cp", "-a", "--sparse=always", str(image_state / "image"), str(layout.image)], check=True)
    try:
        ready = launch(layout, proxy_port=free_port(), ssh_port=free_port(), accel="tcg", timeout=900, steps=Steps(3))
    finally:
        stop(layout, timeout=30)
    return float(ready["boot_seconds"])


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", text)


def machine_description() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.machine(),
    )
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return f"{platform.platform()}, {os.cpu_count()} cores ({cpu}), {qemu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=2400, help="bound on the nested launch (seconds)")
    parser.add_argument("--memory", type=int, default=2560, help="the agent machine's memory (MB)")
    parser.add_argument("--cpus", type=int, default=2, help="the agent machine's vCPUs")
    opts = parser.parse_args()
    image_state = agent_image()
    results: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="spvm-nested-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        say("baseline: vm_image launch --accel tcg of the agent's image on this host")
        host_boot = launch_on_host(image_state, work)
        results.append(("proxy VM on this host, launch to /health (TCG, 256 MB, 1 vCPU)", f"{host_boot:7.1f} s"))
        say(f"baseline healthy after {host_boot:.1f} s")
        machine_image = build_machine_image(work / "machine", say)
        results.append(("agent machine's disk built (root filesystem cached)", f"{machine_image.build_seconds:7.1f} s"))
        say(f"booting the agent machine (TCG, {opts.memory} MB, {opts.cpus} vCPUs)")
        machine = boot_machine(machine_image, memory_mb=opts.memory, cpus=opts.cpus, note=say)
        try:
            results.append(
                (
                    f"agent machine boot to root's SSH (TCG, {opts.memory} MB, {opts.cpus} vCPUs)",
                    f"{machine.boot_seconds:7.1f} s",
                )
            )
            say(f"agent machine answers SSH after {machine.boot_seconds:.1f} s")
            copied = copy_proxy_image(machine, image_state)
            results.append(("proxy image copied into it over SSH", f"{copied:7.1f} s"))
            say(f"image copied in {copied:.1f} s; nested launch, bounded by {opts.timeout:.0f} s")
            nested = launch_nested(machine, opts.timeout, lambda s, line: say(f"  nested ({s:5.0f} s) {line}"))
            if nested.healthy:
                results.append(
                    ("nested proxy VM, launch to /health inside it (TCG in TCG)", f"{nested.boot_seconds or 0:7.1f} s")
                )
                results.append(("nested `vm_image launch` command, wall clock", f"{nested.wall_seconds:7.1f} s"))
                if nested.boot_seconds:
                    results.append(
                        ("ratio nested / host launch to /health", f"{nested.boot_seconds / host_boot:7.1f} x")
                    )
            else:
                results.append(
                    (
                        "nested proxy VM: NO /health",
                        f"after {nested.wall_seconds:.0f} s ({nested.wall_seconds / 60:.1f} min)",
                    )
                )
                booting = [line for line in nested.output if "still booting" in line]
                if booting:
                    results.append(("  how far it got (the nested console, last progress line)", ""))
                    results.append(("    " + strip_ansi(booting[-1].strip())[:110], ""))
                say("the nested launch did not reach /health; its last output:")
                for line in nested.output[-20:]:
                    print("    " + line)
                print(nested.serial_tail)
        finally:
            say(f"stopping the agent machine: {machine.stop()}")
    print(f"\nthis host: {machine_description()}")
    for what, value in results:
        print(f"{what:<70} {value}")


if __name__ == "__main__":
    main()
