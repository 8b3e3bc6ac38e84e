"""End to end, under TCG: an unprivileged agent builds and launches the VM, root takes it over.

The takeover cuts over (the default): an interrupted preparation leaves the agent's VM serving, and
the rerun switches with the agent watching /health. Afterwards the agent keeps HTTP access to the
proxy and nothing else; a failure after the checkpoint (either plan) rolls back to the agent's VM
with its state; the libvirt runner (in order) leaves a persistent, autostarted domain.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from scripts import demo
from scripts.agent_watch import start_agent_watch
from takeover import service
from takeover.host.monitor import Monitor
from takeover.host.runners import LibvirtRunner
from takeover.models import PREPARED_TAG
from takeover.steps import CUT_OVER
from vm_image import proc

from . import vm_fixtures
from .egress_helpers import PrivilegedListener
from .takeover_helpers import (
    E2E_QEMU_USER,
    host_ssh,
    listen_backlog,
    run_unit_command,
    stop_host_vm,
    takeover,
    takeover_run,
    unit_fields,
)
from .vm_fixtures import AGENT_USER, AgentVM, free_port

NAMES = CUT_OVER.names  # the default plan
# A cold boot alone takes 15 to 20 s under TCG and the takeover in order over a minute: a longest gap
# under this means the agent's proxy was switched, not rebooted, however busy the machine.
CUT_OVER_GAP_S = 10.0

pytestmark = [pytest.mark.slow, pytest.mark.root]

SECRET = "sk-e2e-0123456789"


def as_agent(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run Python as the agent user (Debian's python3, nothing of ours on its path)."""
    return vm_fixtures.as_agent(["/usr/bin/python3", "-I", "-c", code, *args], timeout=120)


def agent_http(method: str, url: str, token: str = "", body: dict | None = None) -> dict:
    status, text = demo.agent_http(AGENT_USER, method, url, token, body)[0]
    return {"status": status, "body": json.loads(text or "{}")}


def print_durations(host_dir: Path) -> None:
    journal = json.loads((host_dir / "journal.json").read_text())
    steps = {s: journal["steps"].get(s, {}).get("duration_s") for s in NAMES}
    scrub = (journal["steps"].get("scrub", {}).get("result") or {}).get("seconds")
    print(f"\nstep durations (s): {steps}\nscrub parts (s): {scrub}", file=sys.stderr)


# The guest's way out, tried from inside the taken-over VM as its root (over the host's SSH key).
GUEST_EGRESS_PROBE = """
import socket, sys
egress, listed, unlisted, udp = (int(a) for a in sys.argv[1:5])
def direct(port):
    try:
        socket.create_connection(("10.0.2.2", port), timeout=5).close()
        return "connected"
    except OSError as exc:
        return type(exc).__name__
def tunnel(target):
    s = socket.create_connection(("10.0.2.2", egress), timeout=10)
    s.sendall(f"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n".encode())
    return s.recv(200).split(b"\\r\\n")[0].decode()
print(direct(unlisted))
print(tunnel(f"127.0.0.1:{unlisted}"))
print(tunnel(f"127.0.0.1:{listed}"))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"out", ("10.0.2.2", udp))
"""


def test_host_takes_over_and_the_agent_keeps_only_http(agent_vm, tmp_path):
    host_dir = tmp_path / "host"
    ssh_port = free_port()
    # Below 1024: a host address is listed only where no local user can listen (threat row 80).
    listed, unlisted = PrivilegedListener(), PrivilegedListener()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
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
        "--qemu-user",
        E2E_QEMU_USER,
        "--egress-allow",
        f"http://127.0.0.1:{listed.port}/",
    ]
    # The first run dies after the preparation: the agent's VM was never touched, and serves on.
    interrupted = takeover_run(agent_vm.ready, host_dir, *args, "--fail-after", "first_boot", ssh_port=ssh_port)
    assert interrupted.returncode == 1 and "failing on purpose after step 'first_boot'" in interrupted.stderr
    assert agent_http("GET", agent_vm.url + "/health")["status"] == 200
    with Monitor(agent_vm.state / "run/qmp.sock") as mon:
        assert mon.peer.uid == agent_vm.uid
    assert stop_host_vm(host_dir) == []  # the first boot quit once saved: nothing of the host's runs
    # The rerun resumes at the checkpoint, the prepared VM kept, while the agent polls /health; it dies
    # again right after the cut-over, the host's VM serving; the last run verifies it.
    watch = start_agent_watch(AGENT_USER, demo.agent_env(AGENT_USER), agent_vm.url, max_seconds=1800)
    try:
        cut = takeover_run(agent_vm.ready, host_dir, *args, "--fail-after", "restart", ssh_port=ssh_port)
        assert cut.returncode == 1 and "failing on purpose after step 'restart'" in cut.stderr
        assert agent_http("GET", agent_vm.url + "/health")["status"] == 200  # the host's VM
        result = takeover_run(agent_vm.ready, host_dir, *args, ssh_port=ssh_port)
        time.sleep(2)  # answers after the takeover close the gap
    finally:
        seen = watch.stop()
    print_durations(host_dir)
    print(f"the agent's longest gap: {seen['longest_gap_s']} s; others: {seen.get('gaps')}", file=sys.stderr)
    try:
        assert result.returncode == 0, result.stderr
        for kept in ("scrub", "first_boot"):
            assert f"{CUT_OVER.titles[kept]}: done in an earlier run" in result.stderr, kept
        history = json.loads((host_dir / "journal.json").read_text())["history"]
        started = [h["step"] for h in history if h["event"] == "started"]
        assert started.count("scrub") == 1 and started.count("first_boot") == 1
        assert started.count("restart") == 1 and started.count("verify") == 1  # verify had never begun
        for kept in ("checkpoint", "restart"):
            assert f"{CUT_OVER.titles[kept]}: done in an earlier run" in result.stderr, kept
        assert seen["longest_gap_s"] < CUT_OVER_GAP_S, seen
        assert "Takeover complete." in result.stdout
        report = json.loads((host_dir / "report.json").read_text())
        assert [s["status"] for s in report["steps"]] == ["done"] * len(NAMES)
        assert report["verify"]["agent_key"] == "refused" and report["verify"]["auth_methods"] == ["publickey"]
        assert os.stat(token_file).st_mode & 0o777 == 0o600
        # QEMU's forwards hold a burst of agents: their backlog is no longer libslirp's 1.
        assert report["forwards"]["backlog"] == {
            f"127.0.0.1:{agent_vm.proxy_port}": 4096,
            f"127.0.0.1:{ssh_port}": 4096,
        }
        assert listen_backlog(agent_vm.proxy_port) == 4096 and "listen backlog 4096" in result.stdout
        for name in ("disk.qcow2", "agent-disk.qcow2", "host_key", "journal.json", "report.json", "known_hosts"):
            assert os.stat(host_dir / name).st_mode & 0o077 == 0, name
        # The prepared snapshot is gone once verified: no later start can roll the store back to it.
        assert report["verify"]["prepared_snapshot"] == "deleted"
        # ... and the resumed proxy was told to retry Telegram now (found by systemd's MainPID, as user proxy;
        # this config has no bot, so there is nothing to wake).
        assert report["verify"]["telegram_retry"].startswith("signalled proxy serve (pid "), report["verify"]
        assert "from systemd (secret-proxy.service)" in report["verify"]["telegram_retry"]
        assert report["vm"]["address_free_s"] < CUT_OVER_GAP_S

        # The host operates the proxy over its own key: the config it sent is there, and it stores a secret.
        egress = json.loads(takeover("egress", "list", "--host-dir", str(host_dir)).stdout)
        assert egress["destinations"] == [f"http://127.0.0.1:{listed.port}"]
        egress_port = int(egress["listen"].rpartition(":")[2])
        assert (
            host_ssh(host_dir, ssh_port, "cat", "/var/lib/secret-proxy/config.toml").stdout
            == f'egress_proxy = "http://10.0.2.2:{egress_port}"\npending_timeout_seconds = 900\n'
        )

        # The guest (any user in it: each of its connections is one of QEMU's sockets) reaches the host
        # only through the forward proxy, and through it
        # only the listed destination: the other listeners on this machine see nothing.
        probe = host_ssh(
            host_dir,
            ssh_port,
            "python3",
            "-c",
            shlex.quote(GUEST_EGRESS_PROBE),
            str(egress_port),
            str(listed.port),
            str(unlisted.port),
            str(udp.getsockname()[1]),
        )
        assert probe.returncode == 0, probe.stderr
        direct, refused, allowed = probe.stdout.splitlines()
        assert direct in ("ConnectionRefusedError", "TimeoutError", "OSError"), direct
        assert refused.startswith("HTTP/1.1 403"), refused
        assert allowed.endswith("200 Connection established"), allowed
        udp.settimeout(2)
        with pytest.raises(TimeoutError):
            udp.recvfrom(100)
        assert (listed.seen, unlisted.seen) == (1, 0)

        # A brokered secret's destination: `egress sync` shows it missing, `--apply` lists it, the VM keeps running.
        brokered = host_ssh(
            host_dir,
            ssh_port,
            "/usr/local/bin/secret-proxy",
            "secrets",
            "set",
            "api-brokered",
            "--allow-private",
            f"http://127.0.0.1:{unlisted.port}/v1/",
            "--inject",
            shlex.quote("X-Key: {value}"),
            stdin=SECRET,
        )
        assert brokered.returncode == 0, brokered.stderr
        wanted = f"http://127.0.0.1:{unlisted.port}"
        assert json.loads(takeover("egress", "sync", "--host-dir", str(host_dir)).stdout)["missing"] == [wanted]
        synced = json.loads(takeover("egress", "sync", "--apply", "--host-dir", str(host_dir)).stdout)
        assert synced["applied"] == "now" and wanted in synced["destinations"]
        assert agent_http("GET", agent_vm.url + "/health")["status"] == 200
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
        # Its size is the operator's (the defaults: 256 MB, 2 vCPUs), not the agent's ready file's (1 vCPU).
        assert info.cmdline[info.cmdline.index("-m") + 1] == "256"
        assert info.cmdline[info.cmdline.index("-smp") + 1] == "2"
        assert "-loadvm" in info.cmdline  # resumed from the prepared VM, not booted

        # The operator can stop and start the host's VM (the qemu runner has no autostart).
        stopped = json.loads(takeover("stop", "--host-dir", str(host_dir)).stdout)
        assert stopped["stopped"] is True and stopped["egress"]["forward_proxy_stopped"] is True
        started = json.loads(takeover("start", "--host-dir", str(host_dir)).stdout)
        assert started["started"] is True and started["egress"]["destinations"] == synced["destinations"]
        restarted = proc.read_process(int((host_dir / "qemu.pid").read_text())).cmdline
        assert "-loadvm" not in restarted and PREPARED_TAG not in " ".join(restarted)  # a start boots cold
        assert listen_backlog(agent_vm.proxy_port) == 4096 and started["forwards"]["backlog"]
        assert agent_http("GET", agent_vm.url + "/health")["status"] == 200

        # QEMU dies (SIGKILL, as the OOM killer kills): the unit's Restart=on-failure brings the VM back.
        # systemd runs ExecStop (the main process is gone, the stop still runs), then after RestartSec
        # ExecStartPre and ExecStart; here each as systemd runs it (tests/takeover_helpers.py). What the
        # agent asked before the crash is still there: the guest syncs each commit to QEMU's disk.
        crashed = int((host_dir / "qemu.pid").read_text())
        ticks = proc.start_ticks(crashed)
        os.kill(crashed, signal.SIGKILL)
        assert proc.wait_gone(crashed, ticks, 30)
        with pytest.raises(RuntimeError, match="Connection refused"):  # nobody serves the agent now
            agent_http("GET", agent_vm.url + "/health")
        (tmp_path / "units").mkdir()
        unit = unit_fields(service.install(tmp_path / "units", check_owners=False).read_text())
        for key in ("ExecStop", "ExecStartPre", "ExecStart"):
            assert run_unit_command(unit, key, host_dir).returncode == 0, key
        back = int((host_dir / "qemu.pid").read_text())  # PIDFile=: systemd's main PID for Type=forking
        assert back != crashed and proc.alive(back, proc.start_ticks(back)) and proc.read_process(back).uid == info.uid
        assert agent_http("GET", agent_vm.url + "/health")["status"] == 200
        kept = agent_http("GET", f"{agent_vm.url}/v1/requests/{asked['body']['id']}", token)
        assert kept["status"] == 200 and kept["body"]["status"] == "pending", kept
        assert json.loads(takeover("egress", "list", "--host-dir", str(host_dir)).stdout)["forward_proxy_pid"]

        # A second run refuses: the directory holds a taken-over VM.
        again = takeover_run(agent_vm.ready, host_dir)
        assert again.returncode == 1 and "already holds a taken-over VM" in again.stderr
        # The tests' own cleanup finds the host's QEMU by the run's --qemu-user: nothing is left to kill.
        assert stop_host_vm(host_dir) == []
    finally:
        stop_host_vm(host_dir)
        listed.close()
        unlisted.close()
        udp.close()


@pytest.mark.parametrize(
    "plan, fail_after",
    [
        (["--in-order"], "relocate"),  # the agent's disk copied, the host's VM not yet scrubbed
        ([], "checkpoint"),  # the cut-over: the host's VM prepared, the agent's stopped, nobody serving
    ],
    ids=["in-order", "cut-over"],
)
def test_a_failure_after_the_checkpoint_rolls_back_to_the_agents_vm_with_its_state(
    agent_vm, tmp_path, plan, fail_after
):
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
    failed = takeover_run(agent_vm.ready, host_dir, *plan, "--qemu-user", E2E_QEMU_USER, "--fail-after", fail_after)
    assert failed.returncode == 1 and f"failing on purpose after step '{fail_after}'" in failed.stderr
    assert (host_dir / "disk.qcow2").exists()
    status = json.loads(takeover("status", "--host-dir", str(host_dir)).stdout)
    assert status["state"] == "in_progress" and status["steps"][fail_after] == "done"
    with pytest.raises(ConnectionRefusedError):  # the agent's VM is stopped and nobody serves in its place
        socket.create_connection(("127.0.0.1", agent_vm.proxy_port), timeout=5).close()

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
            agent_vm.ready,
            host_dir,
            "--runner",
            "libvirt",
            "--libvirt-uri",
            libvirtd,
            "--no-egress-filter",  # it filters by QEMU's user, which libvirt shares between domains
            ssh_port=ssh_port,
        )
        print_durations(host_dir)
        assert result.returncode == 0, result.stderr
        assert "NOT FILTERED" in result.stdout
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
        assert listen_backlog(agent_vm.proxy_port) == 4096  # libvirt's QEMU too
    finally:
        stop_host_vm(host_dir, LibvirtRunner(libvirtd))
        shutil.rmtree(host_dir, ignore_errors=True)
