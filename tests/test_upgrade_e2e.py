"""End to end, under TCG: `takeover upgrade` of a VM holding secrets, an agent token, requests and an audit chain.

A failure injected after the old VM stopped puts the old VM back, store and all; the real upgrade
then rebuilds the system from the host's current build and the store comes through whole: the
agent's token still works, its pending request is still pending and can be approved, the audit
chain verifies, and the downtime is measured.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest

from scripts import demo
from takeover.upgrade import NEW_DISK, NEW_PIN, OLD_DISK, OLD_PIN

from .takeover_helpers import E2E_QEMU_USER, host_ssh, stop_host_vm, takeover, takeover_run
from .vm_fixtures import AGENT_USER, AgentVM, free_port, launch_agent_vm

pytestmark = [pytest.mark.slow, pytest.mark.root]

CLI = "/usr/local/bin/secret-proxy"
SECRET = "sk-upgrade-0123456789"


@pytest.fixture
def agent_vm() -> AgentVM:
    """The agent builds (cached) and launches its VM with vm_image, as the unprivileged agent user."""
    vm = launch_agent_vm()
    try:
        yield vm
    finally:
        vm.discard()


def agent_http(method: str, url: str, token: str = "", body: dict | None = None) -> dict:
    status, text = demo.agent_http(AGENT_USER, method, url, token, body)[0]
    return {"status": status, "body": json.loads(text or "{}")}


def names(listing: str) -> list[str]:
    return [line.split("\t")[0] for line in listing.splitlines() if line]


def figures(host_dir, ssh_port) -> dict:
    """What the operator sees of the store: names, agents, requests by id and status, the audit verdict."""
    requests = json.loads(host_ssh(host_dir, ssh_port, CLI, "requests", "list", "--json").stdout)
    return {
        "secrets": names(host_ssh(host_dir, ssh_port, CLI, "secrets", "list").stdout),
        "agents": names(host_ssh(host_dir, ssh_port, CLI, "agents", "list").stdout),
        "requests": {r["id"]: r["status"] for r in requests},
        "audit": host_ssh(host_dir, ssh_port, CLI, "audit", "verify").stdout.strip(),
    }


def test_an_upgrade_keeps_the_store_and_a_failed_one_leaves_the_old_vm_serving(agent_vm, tmp_path):
    host_dir, ssh_port = tmp_path / "host", free_port()
    proxy_toml = tmp_path / "proxy.toml"
    proxy_toml.write_text("pending_timeout_seconds = 3600\n")  # the pending request outlives the test
    os.chmod(proxy_toml, 0o600)
    token_file = tmp_path / "alice.token"
    taken = takeover_run(
        agent_vm.ready,
        host_dir,
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
        ssh_port=ssh_port,
    )
    try:
        assert taken.returncode == 0, taken.stderr
        token = token_file.read_text().strip()
        for name in ("api-key", "api-other"):
            stored = host_ssh(host_dir, ssh_port, CLI, "secrets", "set", name, stdin=SECRET)
            assert stored.returncode == 0, stored.stderr
        pending = agent_http(
            "POST",
            agent_vm.url + "/v1/requests",
            token,
            {"secret": "api-key", "reason": "upgrade", "ttl_seconds": 3600},
        )
        approved = agent_http(
            "POST", agent_vm.url + "/v1/requests", token, {"secret": "api-other", "reason": "ok", "ttl_seconds": 3600}
        )
        assert pending["status"] == approved["status"] == 201
        pending_id, approved_id = pending["body"]["id"], approved["body"]["id"]
        assert host_ssh(host_dir, ssh_port, CLI, "approve", approved_id).returncode == 0
        before = figures(host_dir, ssh_port)
        assert before["requests"] == {pending_id: "pending", approved_id: "approved"}
        assert re.fullmatch(r"audit log intact: \d+ entries", before["audit"]), before["audit"]
        disk_inode = os.stat(host_dir / "disk.qcow2").st_ino

        # A failure after the old VM stopped: the old VM serves again, its store whole, nothing of the attempt left.
        failed = takeover("upgrade", "--host-dir", str(host_dir), "--fail-after", "swap")
        assert failed.returncode == 1, failed.stdout
        assert "failing on purpose after stage 'swap'" in failed.stderr
        assert "rolled back: the old VM serves again" in failed.stderr
        assert os.stat(host_dir / "disk.qcow2").st_ino == disk_inode  # the old disk itself, not a copy
        for gone in (NEW_DISK, OLD_DISK, NEW_PIN, OLD_PIN):
            assert not (host_dir / gone).exists(), gone
        assert figures(host_dir, ssh_port) == before  # over the old pinned host key: it is the old VM
        seen = agent_http("GET", f"{agent_vm.url}/v1/requests/{pending_id}", token)
        assert seen["status"] == 200 and seen["body"]["status"] == "pending"
        record = json.loads((host_dir / "upgrade.json").read_text())["upgrades"]
        assert [(r["result"], r["failed_stage"]) for r in record] == [("rolled back", "swap")]

        # The upgrade itself.
        started = time.monotonic()
        done = takeover("upgrade", "--host-dir", str(host_dir))
        print(f"\nthe upgrade took {time.monotonic() - started:.1f} s", file=sys.stderr)
        assert done.returncode == 0, done.stderr
        assert "Upgrade complete." in done.stdout
        downtime = re.search(r"downtime:  ([\d.]+) s \(from the old VM's stop to the new VM's /health\)", done.stdout)
        assert downtime, done.stdout
        print(f"measured downtime: {downtime.group(1)} s", file=sys.stderr)
        assert os.stat(host_dir / "disk.qcow2").st_ino != disk_inode  # a new disk
        assert os.stat(host_dir / "disk.qcow2").st_mode & 0o777 == 0o600
        for gone in (NEW_DISK, OLD_DISK, NEW_PIN, OLD_PIN):
            assert not (host_dir / gone).exists(), gone
        after = figures(host_dir, ssh_port)  # over the new pinned host key
        assert after == before
        last = json.loads((host_dir / "upgrade.json").read_text())["upgrades"][-1]
        assert last["result"] == "upgraded" and last["before"] == last["after"]
        assert abs(last["downtime_s"] - float(downtime.group(1))) <= 0.05  # printed to a tenth

        # The agent's token still works, its pending request is still pending and can be approved.
        seen = agent_http("GET", f"{agent_vm.url}/v1/requests/{pending_id}", token)
        assert seen["status"] == 200 and seen["body"]["status"] == "pending"
        assert host_ssh(host_dir, ssh_port, CLI, "approve", pending_id).returncode == 0
        got = agent_http("GET", f"{agent_vm.url}/v1/requests/{pending_id}/secret", token)
        assert got["status"] == 200 and got["body"]["value"] == SECRET, got
        verified = host_ssh(host_dir, ssh_port, CLI, "audit", "verify")
        assert verified.returncode == 0 and "intact" in verified.stdout
    finally:
        stop_host_vm(host_dir)
