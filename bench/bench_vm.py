"""The VM's numbers: build time (cold and cached), disk size, boot to healthy, guest memory under load,
and the proxy's throughput in the VM as a ratio to the same proxy on the host, measured in one run.

    .venv/bin/python bench/bench_vm.py [--accel tcg|kvm|auto] [--seconds 5] [--memory 256]

The ratio says what the VM costs (under TCG, software emulation, it is large);
the host baseline is the same `python -m proxy serve` on 127.0.0.1, loaded by
the same `wrk` command.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_api import serve, wrk  # noqa: E402
from proxy.config import load_settings  # noqa: E402
from proxy.demo import free_port  # noqa: E402
from proxy.store import Store, init_data_dir  # noqa: E402
from vm_image import proc  # noqa: E402
from vm_image.build import build  # noqa: E402
from vm_image.control import stop  # noqa: E402
from vm_image.launch import launch  # noqa: E402
from vm_image.layout import Layout  # noqa: E402
from vm_image.progress import Steps  # noqa: E402
from vm_image.ssh_command import agent_login_argv  # noqa: E402


def ssh(layout: Layout, port: int, command: str, stdin: str = "") -> str:
    result = subprocess.run(
        agent_login_argv(port, command, key=layout.setup_key),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


def rss_mb(status_text: str) -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", status_text).group(1)) / 1024  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accel", default="tcg", choices=("auto", "kvm", "tcg"))
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--connections", type=int, default=16)
    opts = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="spx-vm-bench-", dir="/var/tmp") as tmp:
        layout = Layout(Path(tmp) / "state", Path(tmp) / "cache")
        t0 = time.monotonic()
        manifest = build(layout, steps=Steps(5))
        cold = time.monotonic() - t0
        t0 = time.monotonic()
        build(layout, force=True, steps=Steps(5))
        warm = time.monotonic() - t0
        proxy_port, ssh_port = free_port(), free_port()
        ready = launch(layout, proxy_port=proxy_port, ssh_port=ssh_port, memory_mb=opts.memory, accel=opts.accel)
        try:
            token = ssh(layout, ssh_port, "secret-proxy agents add bench --secrets 'bench-*'").strip()
            ssh(layout, ssh_port, "secret-proxy secrets set bench-key", stdin="sk-bench-value")
            out = subprocess.run(
                [
                    "curl",
                    "-s",
                    "-X",
                    "POST",
                    "-H",
                    f"Authorization: Bearer {token}",
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    '{"secret": "bench-key", "reason": "bench"}',
                    f"http://127.0.0.1:{proxy_port}/v1/requests",
                ],
                capture_output=True,
                text=True,
            )
            request_id = re.search(r'"id":"([^"]+)"', out.stdout).group(1)  # type: ignore[union-attr]

            # The same proxy on the host, for the ratio.
            settings = load_settings(env={}, data_dir=Path(tmp) / "host-data")
            init_data_dir(settings)
            store = Store(settings)
            store.set_secret("bench-key", b"sk-bench-value", "operator:bench")
            host_token = store.add_agent("bench", ["bench-*"], "operator:bench")
            agent = store.authenticate(host_token)
            host_request = store.create_request(agent, "bench-key", "bench", 3600).id  # type: ignore[arg-type]
            store.close()
            host_port = free_port()
            server = serve(
                [sys.executable, "-m", "proxy", "serve", "--port", str(host_port)],
                dict(os.environ, SECRET_PROXY_DATA_DIR=str(settings.data_dir)),
                host_port,
            )
            try:
                host_poll = wrk(
                    f"http://127.0.0.1:{host_port}/v1/requests/{host_request}",
                    opts.seconds,
                    opts.connections,
                    host_token,
                    None,
                )
            finally:
                server.terminate()
                server.wait()
            vm_health = wrk(f"http://127.0.0.1:{proxy_port}/health", opts.seconds, opts.connections, None, None)
            vm_poll = wrk(
                f"http://127.0.0.1:{proxy_port}/v1/requests/{request_id}", opts.seconds, opts.connections, token, None
            )
            guest = ssh(
                layout,
                ssh_port,
                "grep -E 'MemTotal|MemAvailable' /proc/meminfo; for d in /proc/[0-9]*; do "
                "tr '\\0' ' ' < $d/cmdline 2>/dev/null | grep -q '[m] proxy serve' && "
                "cat $d/status; done; true",
            )
            mem = dict(re.findall(r"(MemTotal|MemAvailable):\s+(\d+) kB", guest))
            qemu_pid = proc.read_pid(layout.pidfile)
            qemu_rss = rss_mb(Path(f"/proc/{qemu_pid}/status").read_text())
        finally:
            stop(layout, timeout=30)
    print(f"\nbuild, cold cache (mmdebstrap, kernel, wheels): {cold:6.1f} s")
    print(f"build, warm cache (--force: new keys, new disk) : {warm:6.1f} s")
    print(
        f"qcow2 disk                                      : {manifest['disk']['bytes'] / 2**20:6.1f} MB "
        f"({manifest['disk']['virtual_size']} virtual)"
    )
    print(f"boot to healthy ({ready['accel']}, {opts.memory} MB)            : {ready['boot_seconds']:6.1f} s")
    print(
        f"guest memory after load: MemTotal {int(mem['MemTotal']) // 1024} MB, "
        f"MemAvailable {int(mem['MemAvailable']) // 1024} MB, proxy RSS {rss_mb(guest):.0f} MB"
    )
    print(f"QEMU process RSS on the host                    : {qemu_rss:6.0f} MB")
    print(f"status poll, proxy on the host                  : {host_poll:8.0f} req/s (1.00)")
    print(f"status poll, proxy in the VM (forwarded port)   : {vm_poll:8.0f} req/s ({vm_poll / host_poll:.2f} of host)")
    print(f"/health, proxy in the VM                        : {vm_health:8.0f} req/s")


if __name__ == "__main__":
    main()
