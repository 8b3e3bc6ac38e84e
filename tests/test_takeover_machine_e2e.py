"""End to end, under TCG: the agent works in a machine of its own, builds and launches the proxy VM nested in it,
and the host takes it over through SSH, serves it back on the machine's bridge, and the agent asks for a secret
over the network; a failure before the restart rolls back to the nested VM inside the machine.

The agent machine is tests/agent_machine_helpers.py's (network and mount namespaces with their own sshd): its
private directory holds the nested VM's state, which this host cannot see; the agent's image is the one the
other end-to-end tests build (its qcow2 copied into the machine, as an agent would carry its own build).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from takeover.agent import nested_vm
from takeover.host import serve_back
from takeover.models import Endpoint

from .agent_machine_helpers import AgentMachineRig, start_agent_machine
from .takeover_helpers import E2E_QEMU_USER, host_ssh, stop_host_vm, takeover
from .vm_fixtures import AGENT_USER, TEST_ROOT, agent_image, ensure_agent_user, free_port

pytestmark = [pytest.mark.slow, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-machine-0123456789"
PROXY_PORT = 3737  # inside the machine: its own network namespace, nothing else listens there
HTTP_GET = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=10) as r: print(r.status, r.read().decode())\n"
)


@dataclass
class NestedVM:
    rig: AgentMachineRig
    state: str  # in the machine's private directory

    @property
    def ready(self) -> str:
        return f"{self.state}/run/ready"

    def exists(self, relative: str) -> bool:
        return self.rig.inside(["test", "-e", f"{self.state}/{relative}"]).returncode == 0

    def as_agent(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.rig.inside(
            ["env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8", *argv], user=AGENT_USER, timeout=timeout
        )

    def stop(self) -> None:
        pid = self.rig.inside(["cat", f"{self.state}/run/qemu.pid"]).stdout.decode().strip()
        if pid.isdigit():
            self.rig.inside(["kill", "-9", pid])


@pytest.fixture
def nested() -> Iterator[NestedVM]:
    """The agent's machine, and in it the agent's VM, launched by the agent with `vm_image launch`."""
    image = agent_image() / "image"
    rig = start_agent_machine()
    vm = NestedVM(rig, f"{rig.private}/agent-state")
    try:
        assert rig.inside(["install", "-d", "-o", AGENT_USER, "-m", "0700", vm.state]).returncode == 0
        copied = vm.as_agent("cp", "-a", "--sparse=always", str(image), f"{vm.state}/image", timeout=300)
        assert copied.returncode == 0, copied.stderr
        launch = vm.as_agent(
            "env",
            "-C",
            str(ROOT),
            sys.executable,
            "-m",
            "vm_image",
            "launch",
            "--state-dir",
            vm.state,
            "--port",
            str(PROXY_PORT),
            "--ssh-port",
            "2222",
            "--memory",
            "256",
            "--accel",
            "tcg",
            timeout=900,
        )
        assert launch.returncode == 0, launch.stderr[-3000:]
        yield vm
    finally:
        vm.stop()
        rig.stop()


@pytest.fixture
def host_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="machine-host-", dir=TEST_ROOT))
    os.chmod(base, 0o755)
    yield base / "host"
    stop_host_vm(base / "host")
    shutil.rmtree(base, ignore_errors=True)


def takeover_from_machine(
    vm: NestedVM, host_dir: Path, serve_on: Endpoint, *more: str, ssh_port: int | None = None
) -> subprocess.CompletedProcess:
    rig = vm.rig
    return takeover(
        "run",
        "--agent-machine",
        f"root@{rig.address}",
        "--agent-machine-key",
        str(rig.work / "root_key"),
        "--agent-machine-known-hosts",
        str(rig.work / "known_hosts"),
        "--ready-file",
        vm.ready,
        "--serve-on",
        str(serve_on),
        "--host-dir",
        str(host_dir),
        "--ssh-listen",
        f"127.0.0.1:{ssh_port or free_port()}",
        "--qemu-user",
        E2E_QEMU_USER,
        *more,
    )


def test_the_host_takes_over_a_vm_nested_in_the_agents_machine_and_serves_it_back_over_its_bridge(nested, host_dir):
    rig = nested.rig
    serve_on = Endpoint(rig.host_address, 3700 + rig.index)
    args = ("--agent-name", "alice", "--agent-secrets", "api-*")
    ssh_port = free_port()  # the rerun names the same options as the run it resumes
    # The first run dies after the checkpoint; the rerun opens a new connection and resumes at the copy.
    started = time.monotonic()
    interrupted = takeover_from_machine(
        nested, host_dir, serve_on, *args, "--fail-after", "checkpoint", ssh_port=ssh_port
    )
    assert interrupted.returncode == 1 and "failing on purpose after step 'checkpoint'" in interrupted.stderr
    result = takeover_from_machine(nested, host_dir, serve_on, *args, ssh_port=ssh_port)
    seconds = time.monotonic() - started
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "checkpoint and stop it: done in an earlier run" in result.stderr
        url = f"http://{serve_on}"
        assert f"Agent machine: root@{rig.address}, told SECRET_PROXY_URL={url}" in result.stdout
        print(f"\ntakeover from an agent machine: {seconds:.0f} s", file=sys.stderr)
        report = json.loads((host_dir / "report.json").read_text())
        journal = json.loads((host_dir / "journal.json").read_text())
        source = journal["steps"]["find_vm"]["result"]
        assert source["machine"] == f"root@{rig.address}"
        assert source["machine_proxy"] == {"host": "127.0.0.1", "port": PROXY_PORT}
        # The agent's setup key (in its machine) was fetched and tried: refused.
        assert report["verify"]["agent_key"] == "refused"

        # In the machine: the nested VM's files are gone, and the agent's tools know the new address and token.
        for gone in ("run/qmp.sock", "run/ready", "image/disk.qcow2", "image/setup_key", "image/setup_key.pub"):
            assert not nested.exists(gone), gone
        assert rig.inside(["cat", nested_vm.AGENT_URL_FILE]).stdout.decode().strip() == url
        health = nested.as_agent("python3", "-I", "-c", HTTP_GET, f"{url}/health")
        assert health.returncode == 0 and health.stdout.startswith(b"200"), health.stderr

        # The seed's story: the agent asks with its tool, the operator approves with the CLI, the agent gets it once.
        key, port = host_dir / "host_key", int(journal["options"]["ssh_listen"]["port"])
        stored = host_ssh(host_dir, port, "/usr/local/bin/secret-proxy", "secrets", "set", "api-key", stdin=SECRET)
        assert stored.returncode == 0, stored.stderr
        assert key.exists()
        asking = subprocess.Popen(
            [
                *rig.enter,
                "runuser",
                "-u",
                AGENT_USER,
                "--",
                "env",
                "-i",
                "PATH=/usr/bin:/bin",
                "python3",
                "-I",
                str(ROOT / "proxy/agent"),
                "get",
                "api-key",
                "--reason",
                "e2e from the agent machine",
                "--timeout",
                "300",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert asking.stderr is not None
        line = asking.stderr.readline()
        request_id = re.search(r"request (req_[A-Za-z0-9_-]+)", line)
        assert request_id, line + asking.communicate(timeout=60)[1]
        approved = host_ssh(host_dir, port, "/usr/local/bin/secret-proxy", "approve", request_id.group(1))
        assert approved.returncode == 0, approved.stderr
        value, errors = asking.communicate(timeout=300)
        assert asking.returncode == 0, errors
        assert value.strip() == SECRET

        # Nobody else reaches the served proxy: a local user of this host is refused at once.
        user = ensure_agent_user()
        probe = f"import socket; socket.create_connection(('{serve_on.host}', {serve_on.port}), timeout=5)"
        local = subprocess.run(
            [
                "setpriv",
                f"--reuid={user.uid}",
                f"--regid={user.gid}",
                "--clear-groups",
                "/usr/bin/python3",
                "-I",
                "-c",
                probe,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert local.returncode != 0 and "ConnectionRefused" in local.stderr

        # stop and start keep the filter: the machine still gets in, once the VM is back.
        assert json.loads(takeover("stop", "--host-dir", str(host_dir)).stdout)["stopped"] is True
        assert json.loads(takeover("start", "--host-dir", str(host_dir)).stdout)["started"] is True
        again = nested.as_agent("python3", "-I", "-c", HTTP_GET, f"{url}/health")
        assert again.returncode == 0 and again.stdout.startswith(b"200"), again.stderr
    finally:
        stop_host_vm(host_dir)
        serve_back.remove(serve_on)


def test_a_failure_before_the_restart_rolls_back_to_the_nested_vm_inside_the_machine(nested, host_dir):
    rig = nested.rig
    serve_on = Endpoint(rig.host_address, 3700 + rig.index)
    failed = takeover_from_machine(nested, host_dir, serve_on, "--fail-after", "relocate")
    assert failed.returncode == 1 and "failing on purpose after step 'relocate'" in failed.stderr
    rolled = takeover("rollback", "--host-dir", str(host_dir))
    assert rolled.returncode == 0, rolled.stderr[-2000:]
    assert json.loads(rolled.stdout)["detail"] == "the nested VM is back from its checkpoint"
    health = nested.as_agent("python3", "-I", "-c", HTTP_GET, f"http://127.0.0.1:{PROXY_PORT}/health")
    assert health.returncode == 0 and health.stdout.startswith(b"200"), health.stderr
    assert not (host_dir / "disk.qcow2").exists() and not (host_dir / "from-machine").exists()
