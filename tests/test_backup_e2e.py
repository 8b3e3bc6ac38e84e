"""End to end, under TCG: a backup of the taken-over VM, taken while an agent asks, restores after the store is lost.

"Lost" here is the store of the same VM: its database and master key deleted over the host's login and the VM
restarted, so the unit initialises an empty store under a new master key, as a fresh VM's would. A second
takeover would only add minutes of the same boot; what a restore must bring back is the store.
"""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from scripts import demo

from .takeover_helpers import E2E_QEMU_USER, host_ssh, stop_host_vm, takeover, takeover_run
from .vm_fixtures import AGENT_USER, free_port

pytestmark = [pytest.mark.slow, pytest.mark.root]

CLI = "/usr/local/bin/secret-proxy"
SECRET = "sk-backup-e2e-0123456789"


def agent_http(method: str, url: str, token: str = "", body: dict | None = None) -> dict:
    status, text = demo.agent_http(AGENT_USER, method, url, token, body)[0]
    return {"status": status, "body": json.loads(text or "{}")}


def test_a_backup_taken_while_an_agent_asks_restores_the_store_after_it_is_lost(agent_vm, tmp_path):
    host_dir, ssh_port = tmp_path / "host", free_port()
    token_file = tmp_path / "alice.token"
    run = takeover_run(
        agent_vm.ready,
        host_dir,
        *("--agent-name", "alice", "--agent-secrets", "api-*", "--token-file", str(token_file)),
        *("--qemu-user", E2E_QEMU_USER),
        ssh_port=ssh_port,
    )
    try:
        assert run.returncode == 0, run.stderr
        hd = ("--host-dir", str(host_dir))
        assert host_ssh(host_dir, ssh_port, CLI, "secrets", "set", "api-key", stdin=SECRET).returncode == 0
        token = token_file.read_text().strip()
        keys = tmp_path / "keys"
        keys.mkdir(mode=0o700)
        made = json.loads(takeover("backup", "keygen", "--out", str(keys)).stdout)
        assert json.loads(takeover("status", *hd).stdout)["last_backup"] == "never"

        # The agent keeps asking while the backup is taken: every ask is answered, none fails.
        stop, answers = threading.Event(), []

        def ask() -> None:
            while not stop.is_set():
                body = {"secret": "api-key", "reason": "while the backup runs"}
                answers.append(agent_http("POST", agent_vm.url + "/v1/requests", token, body))

        asker = threading.Thread(target=ask)
        asker.start()
        try:
            taken = takeover("backup", "--recipient", str(keys / "backup.key.pub"), *hd)
        finally:
            stop.set()
            asker.join(120)
        assert taken.returncode == 0, taken.stderr
        backup = json.loads(taken.stdout)
        assert answers and {a["status"] for a in answers} <= {201, 429}, answers
        path = backup["backup"]
        assert os.stat(path).st_mode & 0o777 == 0o600 and backup["sealed_to"] == made["fingerprint"]
        assert SECRET.encode() not in open(path, "rb").read()
        assert json.loads(takeover("status", *hd).stdout)["last_backup"]["path"] == path

        # A corrupted and a truncated copy are refused before the VM is touched.
        pid = (host_dir / "qemu.pid").read_text()
        for name, damage in (
            ("corrupted", lambda b: b[:5000] + bytes([b[5000] ^ 1]) + b[5001:]),
            ("cut", lambda b: b[:-1]),
        ):
            bad = tmp_path / f"{name}.spvm-backup"
            shutil.copyfile(path, bad)
            os.chmod(bad, 0o600)
            bad.write_bytes(damage(bad.read_bytes()))
            refused = takeover("restore", "--from", str(bad), "--key", str(keys / "backup.key"), *hd)
            assert refused.returncode == 1 and (
                "fails authentication" in refused.stderr or "truncated" in refused.stderr
            )
        assert (host_dir / "qemu.pid").read_text() == pid
        state = json.loads(host_ssh(host_dir, ssh_port, CLI, "restore", "state").stdout)
        assert state["staged"] is False and state["last"] is None

        # The store is lost: a restarted VM initialises an empty one, and the agent's token is unknown.
        # (config.toml stays: a fresh VM gets its own from its takeover, and a backup does not carry it.)
        # `sync`: `takeover stop` quits QEMU, and what the guest has not written out is lost with it.
        wipe = "'cd /var/lib/secret-proxy && rm -f proxy.db* master.key* && sync'"
        wiped = host_ssh(host_dir, ssh_port, "sh", "-c", wipe)
        assert wiped.returncode == 0, wiped.stderr
        assert takeover("stop", *hd).returncode == 0 and takeover("start", *hd).returncode == 0
        lost = agent_http("POST", agent_vm.url + "/v1/requests", token, {"secret": "api-key", "reason": "lost?"})
        assert lost["status"] == 401, lost

        restored = takeover("restore", "--from", path, "--key", str(keys / "backup.key"), *hd)
        assert restored.returncode == 0, restored.stderr
        done = json.loads(restored.stdout)
        assert done["counts"]["secrets"] == 1 and done["counts"]["agents"] == 1 and "intact" in done["audit"]
        asked = agent_http("POST", agent_vm.url + "/v1/requests", token, {"secret": "api-key", "reason": "back"})
        assert asked["status"] == 201, asked
        listed = host_ssh(host_dir, ssh_port, CLI, "secrets", "list")
        assert listed.stdout.startswith("api-key")
        assert "intact" in host_ssh(host_dir, ssh_port, CLI, "audit", "verify").stdout
        assert json.loads(takeover("status", *hd).stdout)["last_restore"]["counts"] == done["counts"]
    finally:
        stop_host_vm(host_dir)
