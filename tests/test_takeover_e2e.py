"""End to end, under TCG: an unprivileged agent builds and launches the VM, root takes it over.

Afterwards the agent keeps HTTP access to the proxy and nothing else; a failure
after relocation rolls back to the agent's VM with its state; the libvirt
runner leaves a persistent, autostarted domain.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from scripts import demo
from takeover.monitor import Monitor
from takeover.restart import LibvirtRunner
from takeover.steps import NAMES
from vm_image import proc

from . import vm_fixtures
from .takeover_helpers import host_ssh, stop_host_vm, takeover, takeover_run
from .vm_fixtures import AGENT_USER, AgentVM, free_port, launch_agent_vm

pytestmark = [pytest.mark.slow, pytest.mark.root]

SECRET = "sk-e2e-0123456789"


def as_agent(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run Python as the agent user (Debian's python3, nothing of ours on its path)."""
    return vm_fixtures.as_agent(["/usr/bin/python3", "-I", "-c", code, *args], timeout=120)


def agent_http(method: str, url: str, token: str = "", body: dict | None = None) -> dict:
    status, text = demo.agent_http(AGENT_USER, method, url, token, body)[0]
    return {"status": status, "body": json.loads(text or "{}")}


@pytest.fixture
def agent_vm() -> AgentVM:
    """The agent builds (cached) and launches its VM with vm_image, as the unprivileged agent user."""
    vm = launch_agent_vm()  # returns once the proxy answers /health (vm_image launch waits for it)
    try:
        yield vm
    finally:
        vm.discard()


def print_durations(host_dir: Path) -> None:
    journal = json.loads((host_dir / "journal.json").read_text())
    steps = {s: journal["steps"].get(s, {}).get("duration_s") for s in NAMES}
    scrub = (journal["steps"].get("scrub", {}).get("result") or {}).get("seconds")
    print(f"\nstep durations (s): {steps}\nscrub parts (s): {scrub}", file=sys.stderr)


def test_host_takes_over_and_the_agent_keeps_only_http(agent_vm, tmp_path):
    host_dir = tmp_path / "host"
    ssh_port = free_port()
    proxy_toml = tmp_path / "proxy.toml"
    proxy_toml.write_text("pending_timeout_seconds = 900\n")
    os.chmod(proxy_toml, 0o600)
    token_file = tmp_path / "alice.token"
    args = [
        "--proxy-config",
        str(proxy_toml),
        "--agent-name",
        "alice",
        "--agent-secrets",
        "api-*",
        "--token-file",
        str(token_file),
    ]
    # The first run dies after the scrub; the rerun resumes there instead of starting over.
    interrupted = takeover_run(agent_vm.ready, host_dir, *args, "--fail-after", "scrub", ssh_port=ssh_port)
    assert interrupted.returncode == 1 and "failing on purpose after step 'scrub'" in interrupted.stderr
    result = takeover_run(agent_vm.ready, host_dir, *args, ssh_port=ssh_port)
    print_durations(host_dir)
    try:
        assert result.returncode == 0, result.stderr
        assert "copy the disk to the host: done in an earlier run" in result.stderr
        history = json.loads((host_dir / "journal.json").read_text())["history"]
        assert [h["step"] for h in history if h["event"] == "started"].count("scrub") == 1
        assert "Takeover complete." in result.stdout
        report = json.loads((host_dir / "report.json").read_text())
        assert [s["status"] for s in report["steps"]] == ["done"] * len(NAMES)
        assert report["verify"]["agent_key"] == "refused" and report["verify"]["auth_methods"] == ["publickey"]
        assert os.stat(token_file).st_mode & 0o777 == 0o600
        for name in ("disk.qcow2", "host_key", "journal.json", "report.json", "known_hosts"):
            assert os.stat(host_dir / name).st_mode & 0o077 == 0, name

        # The host operates the proxy over its own key: the config it sent is there, and it stores a secret.
        assert (
            host_ssh(host_dir, ssh_port, "cat", "/var/lib/secret-proxy/config.toml").stdout
            == "pending_timeout_seconds = 900\n"
        )
        stored = host_ssh(host_dir, ssh_port, "/usr/local/bin/secret-proxy", "secrets", "set", "api-key", stdin=SECRET)
        assert stored.returncode == 0, stored.stderr

        # The agent still has HTTP: health, and a request with the token the host made for it.
        token = token_file.read_text().strip()
        assert agent_http("GET", agent_vm.url + "/health")["status"] == 200
        asked = agent_http("POST", agent_vm.url + "/v1/requests", token, {"secret": "api-key", "reason": "e2e"})
        assert asked["status"] == 201 and asked["body"]["status"] == "pending"

        # ... and nothing else.
        denied = as_agent("open(__import__('sys').argv[1], 'rb')", str(host_dir / "disk.qcow2"))
        assert "PermissionError" in denied.stderr
        monitor = as_agent(
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])", str(host_dir / "qmp.sock")
        )
        assert "PermissionError" in monitor.stderr
        agent_ssh = AgentVM(agent_vm.state, agent_vm.ready, agent_vm.proxy_port, ssh_port, agent_vm.uid)
        login = agent_ssh.ssh_as_agent("true")
        assert login.returncode != 0 and "Permission denied" in login.stderr
        for gone in ("run/qmp.sock", "run/ready", "image/disk.qcow2"):
            assert not (agent_vm.state / gone).exists(), gone

        # The host's QEMU runs unprivileged, and the VM is the host's: its kernel, its disk.
        pid = int((host_dir / "qemu.pid").read_text())
        info = proc.read_process(pid)
        assert info.uid != 0 and info.uid != agent_vm.uid
        assert str(host_dir / "disk.qcow2") in " ".join(info.cmdline)
        assert str(agent_vm.state) not in " ".join(info.cmdline)

        # The operator can stop and start the host's VM (the qemu runner has no autostart).
        assert json.loads(takeover("stop", "--host-dir", str(host_dir)).stdout) == {"stopped": True}
        started = json.loads(takeover("start", "--host-dir", str(host_dir)).stdout)
        assert started["started"] is True
        assert agent_http("GET", agent_vm.url + "/health")["status"] == 200

        # A second run refuses: the directory holds a taken-over VM.
        again = takeover_run(agent_vm.ready, host_dir)
        assert again.returncode == 1 and "already holds a taken-over VM" in again.stderr
    finally:
        stop_host_vm(host_dir)


def test_a_failure_after_relocation_rolls_back_to_the_agents_vm_with_its_state(agent_vm, tmp_path):
    # Before the takeover the agent owns the VM: it provisions itself over its setup key.
    added = agent_vm.ssh_as_agent("/usr/local/bin/secret-proxy", "agents", "add", "bob", "--secrets", "'api-*'")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert (
        agent_vm.ssh_as_agent("/usr/local/bin/secret-proxy", "secrets", "set", "api-key", stdin=SECRET).returncode == 0
    )
    asked = agent_http("POST", agent_vm.url + "/v1/requests", token, {"secret": "api-key", "reason": "before"})
    assert asked["status"] == 201
    request_id = asked["body"]["id"]

    host_dir = tmp_path / "host"
    failed = takeover_run(agent_vm.ready, host_dir, "--fail-after", "relocate")
    assert failed.returncode == 1 and "failing on purpose after step 'relocate'" in failed.stderr
    assert (host_dir / "disk.qcow2").exists()
    status = json.loads(takeover("status", "--host-dir", str(host_dir)).stdout)
    assert status["state"] == "in_progress" and status["steps"]["relocate"] == "done"

    started = time.monotonic()
    rolled = takeover("rollback", "--host-dir", str(host_dir))
    print(f"\nrollback took {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout)["detail"] == "the agent's VM is back from its checkpoint"

    # The agent's VM is back, as the agent, with the request it made before the takeover.
    seen = agent_http("GET", f"{agent_vm.url}/v1/requests/{request_id}", token)
    assert seen["status"] == 200 and seen["body"]["status"] == "pending"
    with Monitor(agent_vm.state / "run/qmp.sock") as mon:
        assert mon.peer.uid == agent_vm.uid
    assert not (host_dir / "disk.qcow2").exists()
    assert json.loads(takeover("status", "--host-dir", str(host_dir)).stdout)["state"] == "rolled_back"


@pytest.fixture
def libvirtd():
    """libvirtd and virtlogd, started by hand when not running (no systemd here); stopped if we started them."""
    started = []
    for daemon, pidfile, sock in (
        ("virtlogd", "/run/virtlogd.pid", "/run/libvirt/virtlogd-sock"),
        ("libvirtd", "/run/libvirtd.pid", "/run/libvirt/libvirt-sock"),
    ):
        if not Path(sock).exists():
            subprocess.run([daemon, "-d"], check=True, timeout=60)
            deadline = time.monotonic() + 30
            while not Path(sock).exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            started.append(int(Path(pidfile).read_text()))
    yield "qemu:///system"
    for pid in reversed(started):
        proc.terminate(pid, proc.start_ticks(pid), grace=10)


def test_libvirt_runner_defines_a_persistent_autostarted_domain(agent_vm, libvirtd):
    import libvirt

    # libvirt's QEMU user must traverse the host directory: not under /tmp/pytest-of-root (0700).
    host_dir = Path(tempfile.mkdtemp(prefix="secret-proxy-vm-test-", dir="/var/lib"))
    ssh_port = free_port()
    try:
        result = takeover_run(
            agent_vm.ready, host_dir, "--runner", "libvirt", "--libvirt-uri", libvirtd, ssh_port=ssh_port
        )
        print_durations(host_dir)
        assert result.returncode == 0, result.stderr
        conn = libvirt.open(libvirtd)
        try:
            dom = conn.lookupByName("secret-proxy-vm")
            assert dom.isPersistent() and dom.autostart() and dom.isActive()
        finally:
            conn.close()
        assert agent_http("GET", agent_vm.url + "/health")["status"] == 200
        assert host_ssh(host_dir, ssh_port, "true").returncode == 0
        report = json.loads((host_dir / "report.json").read_text())
        assert report["vm"]["runner"] == "libvirt" and report["vm"]["autostart"] is True
    finally:
        stop_host_vm(host_dir, LibvirtRunner(libvirtd))
        shutil.rmtree(host_dir, ignore_errors=True)
