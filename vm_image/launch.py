"""`vm_image launch`: start the built image under QEMU, wait until the proxy answers, write the ready file.

Everything that can be checked is checked before QEMU starts (image present,
ports free, monitor path unused, QEMU installed), so a bad argument changes
nothing. A guest that does not come up is stopped again and the error shows the
last lines of its serial console.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import proc
from .boot_files import KERNEL_APPEND
from .durable import write_atomic
from .errors import BadInput, HealthTimeout, LaunchFailed, ProcessGone
from .health import wait_for_health
from .layout import READY_MARKER, Layout
from .manifest import read_json
from .progress import Steps
from .qemu_command import VmConfig, choose_accel, qemu_argv, qemu_binary

READY_VERSION = 1
START_TIMEOUT = 120.0  # QEMU daemonizes once its devices are set up: seconds, even on a busy host


def launch(
    layout: Layout,
    *,
    proxy_host: str = "127.0.0.1",
    proxy_port: int = 3737,
    ssh_port: int = 2222,
    memory_mb: int = 256,
    cpus: int = 1,
    accel: str = "auto",
    timeout: float = 600,
    steps: Steps | None = None,
) -> dict[str, Any]:
    steps = steps or Steps(total=3)
    with steps.step("checks before starting QEMU") as note:
        binary = qemu_binary()
        cfg = _preflight(layout, proxy_host, proxy_port, ssh_port, memory_mb, cpus, choose_accel(accel))
        if cfg.accel == "tcg" and accel == "auto":
            note("no usable KVM: running under TCG software emulation (boots take ~20-30 s instead of a few)")
    with steps.step(f"starting QEMU ({cfg.accel}, {memory_mb} MB, {cpus} vCPU)") as note:
        for stale in (layout.ready, layout.serial_log, layout.pidfile):
            stale.unlink(missing_ok=True)
        start_qemu(qemu_argv(cfg, binary), layout.pidfile)
        pid = proc.read_pid(layout.pidfile)
        if pid is None:
            raise LaunchFailed(f"QEMU started but wrote no pid to {layout.pidfile}")
        note(f"QEMU pid {pid}; monitor {layout.monitor}; serial console {layout.serial_log}")
    url = f"http://{proxy_host}:{proxy_port}"
    with steps.step(f"waiting for the proxy at {url}/health") as note:
        try:
            boot_seconds = wait_healthy(url, layout, pid, timeout, note)
            check_api_refuses_anonymous(url)
        except LaunchFailed:
            _kill(pid)
            for path in (layout.pidfile, layout.monitor):
                path.unlink(missing_ok=True)
            raise
        note(f"healthy after {boot_seconds:.1f} s; /v1 without a token answers 401")
    ready = {
        "version": READY_VERSION,
        "monitor": str(layout.monitor),
        "disk": str(layout.disk),
        "pid": pid,
        "pidfile": str(layout.pidfile),
        "serial_log": str(layout.serial_log),
        "kernel": str(layout.kernel),
        "initrd": str(layout.initrd),
        "manifest": str(layout.manifest),
        "setup_key_pub": str(layout.setup_key) + ".pub",
        "proxy": {"host": proxy_host, "port": proxy_port},
        "ssh": {"host": cfg.ssh_host, "port": ssh_port, "user": "proxy"},
        "memory_mb": memory_mb,
        "cpus": cpus,
        "accel": cfg.accel,
        "boot_seconds": round(boot_seconds, 1),
    }
    write_ready(layout.ready, ready)
    return ready


def _preflight(
    layout: Layout, proxy_host: str, proxy_port: int, ssh_port: int, memory_mb: int, cpus: int, accel: str
) -> VmConfig:
    manifest = read_json(layout.manifest)
    from_base = manifest.get("mode") == "base-image"
    for path in (layout.disk, layout.seed) if from_base else (layout.disk, layout.kernel, layout.initrd):
        if not path.is_file():
            raise BadInput(
                f"{path} does not exist: the image is not built",
                hint="run `python -m vm_image build` (or `up`, which builds and launches)",
            )
    running = proc.running_qemu(layout.pidfile)
    if running:
        raise BadInput(
            f"the VM is already running (QEMU pid {running})",
            hint="`python -m vm_image status` shows it; `python -m vm_image stop` stops it",
        )
    if os.path.lexists(layout.monitor):
        raise BadInput(
            f"the monitor path {layout.monitor} already exists (left by a QEMU that did not exit cleanly?)",
            hint="`python -m vm_image stop` removes stale files when no VM runs",
        )
    append = (manifest.get("kernel") or {}).get("append") or KERNEL_APPEND
    cfg = VmConfig(
        layout.disk,
        None if from_base else layout.kernel,
        None if from_base else layout.initrd,
        append,
        layout.monitor,
        layout.pidfile,
        layout.serial_log,
        proxy_host=proxy_host,
        proxy_port=proxy_port,
        ssh_port=ssh_port,
        memory_mb=memory_mb,
        cpus=cpus,
        accel=accel,
        seed=layout.seed if from_base else None,
    )
    qemu_argv(cfg)  # validates every value before anything starts
    if proxy_port == ssh_port:
        raise BadInput(f"the proxy and SSH cannot both be forwarded from port {proxy_port}")
    for host, port, what in ((proxy_host, proxy_port, "--port"), (cfg.ssh_host, ssh_port, "--ssh-port")):
        if not port_free(host, port):
            raise BadInput(f"{host}:{port} is already in use", hint=f"choose another port with {what}")
    layout.make_dirs()
    return cfg


def start_qemu(argv: list[str], pidfile: Path, timeout: float = START_TIMEOUT) -> None:
    """Run the daemonizing QEMU until its parent returns, within `timeout`.

    Its output goes to a file, not a pipe: a QEMU stuck before it daemonizes keeps
    its stdout open, and reading a pipe after a timeout would then wait for ever.
    """
    with tempfile.TemporaryFile() as out:
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=timeout)
        except subprocess.TimeoutExpired:
            pid = proc.running_qemu(pidfile)
            if pid is not None:
                _kill(pid)
            raise LaunchFailed(
                f"QEMU did not finish starting within {timeout:.0f} s (it was stopped)",
                hint="see whether the host is overloaded or QEMU hangs at start "
                "(run the same command with --accel tcg), then launch again",
            ) from None
        out.seek(0)
        output = out.read().decode(errors="replace")
    if result.returncode != 0:
        raise LaunchFailed(f"QEMU did not start: {output.strip()[-600:]}")


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_healthy(url: str, layout: Layout, pid: int, timeout: float, note: Any) -> float:
    try:
        return wait_for_health(
            url,
            timeout,
            lambda: proc.is_qemu(pid),
            interval=0.5,
            waiting=lambda s: note(f"still booting ({s:.0f} s): {_last_line(layout.serial_log)}"),
        )
    except ProcessGone:
        raise LaunchFailed(f"QEMU exited while the guest was booting.\n{serial_tail(layout.serial_log)}") from None
    except HealthTimeout as exc:
        raise LaunchFailed(f"{exc}.\n{serial_tail(layout.serial_log)}") from None


def check_api_refuses_anonymous(url: str) -> None:
    """The forwarded port is the proxy's API, not something else answering /health."""
    try:
        urllib.request.urlopen(url + "/v1/requests/probe", timeout=10)
    except urllib.error.HTTPError as exc:
        body = _json_or_empty(exc.read())
        if exc.code == 401 and body.get("error") == "unauthorized":
            return
        raise LaunchFailed(
            f"GET /v1/requests without a token answered {exc.code} {body}, not 401 unauthorized"
        ) from None
    except OSError as exc:
        raise LaunchFailed(f"GET /v1/requests failed: {exc}") from None
    raise LaunchFailed("GET /v1/requests without a token was answered 200: the API does not check tokens")


def write_ready(path: Path, ready: dict[str, Any]) -> None:
    # 0644: paths and ports, no secret; the takeover reads it as root whatever its mode.
    write_atomic(path, f"{READY_MARKER}\n{json.dumps(ready)}\n".encode(), mode=0o644)


def serial_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return f"(no serial log at {log})"
    tail = "\n".join("    " + _strip_ansi(line) for line in text.splitlines()[-lines:])
    return f"last lines of {log}:\n{tail}"


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no console output yet"
    return _strip_ansi(lines[-1])[:100] if lines else "no console output yet"


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\x1bM|\r", "", text)


def _kill(pid: int) -> None:
    # Not shutdown.stop_qemu's escalation: a launch that failed has no guest worth a clean shutdown,
    # and its monitor may never have answered, so asking first would only add minutes to the error.
    try:
        os.kill(pid, 9)
    except OSError:
        pass


def _json_or_empty(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
