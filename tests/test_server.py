"""The proxy as it runs: a real uvicorn process on 127.0.0.1, the real CLI, kill -9."""

from __future__ import annotations

import http.client
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from proxy.client import AgentClient
from proxy.store import Store

from .proxy_helpers import SECRET_VALUE, cli, make_settings, provision, start_server


def test_round_trip_over_real_http_with_cli_approval(live, proxy_data):
    agent = live.agent(proxy_data.token)
    assert agent.health().body == {"status": "ok"}
    created = agent.ask("api-key", "deploy the release")
    assert created.status == 201
    rid = created.body["id"]

    approver = threading.Timer(0.5, cli, args=(proxy_data.settings.data_dir, "approve", rid))
    approver.start()
    waited = agent.status(rid, wait=20)
    approver.join()
    assert waited.body["status"] == "approved"
    assert waited.body["decided_by"] == "operator"
    got = agent.retrieve(rid)
    assert got.status == 200 and got.body["value"] == SECRET_VALUE
    assert got.headers.get("cache-control") == "no-store"
    assert agent.retrieve(rid).body["error"] == "already_retrieved"


def test_errors_are_json_over_real_http(live, proxy_data):
    anonymous = AgentClient(live.url)
    r = anonymous.call("POST", "/v1/requests", {"secret": "api-key", "reason": "x"})
    assert r.status == 401 and r.body["error"] == "unauthorized"
    r = live.agent(proxy_data.token).call("GET", "/nowhere")
    assert r.status == 404 and r.body["error"] == "not_found"


def test_acknowledged_requests_and_decisions_survive_kill_9(tmp_path):
    proxy = provision(make_settings(tmp_path))
    env = {
        "SECRET_PROXY_RATE_BURST": "100000",
        "SECRET_PROXY_RATE_PER_MINUTE": "600000",
        "SECRET_PROXY_MAX_PENDING_PER_AGENT": "100000",
        "SECRET_PROXY_POLL_BURST": "100000",
    }
    server = start_server(proxy.settings, env)
    agent = server.agent(proxy.token)
    acknowledged: list[str] = []
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set() and len(acknowledged) < 2000:
            try:
                r = agent.ask("api-key", "durability")
            except (OSError, http.client.HTTPException):
                # The server died mid-call (a cut body too: the agent never learned the id): not acknowledged.
                return
            if r.status == 201:
                acknowledged.append(r.body["id"])

    workers = [threading.Thread(target=flood) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(1.5)
    os.kill(server.process.pid, signal.SIGKILL)  # at whatever moment the writes are in
    server.process.wait()
    stop.set()
    for w in workers:
        w.join(10)
    assert len(acknowledged) > 10

    # a decision acknowledged to the approver survives too
    decided = acknowledged[0]
    assert cli(proxy.settings.data_dir, "approve", decided).returncode == 0

    server = start_server(proxy.settings, env)
    try:
        agent = server.agent(proxy.token)
        for rid in acknowledged:
            assert agent.status(rid).status == 200, rid
        assert agent.status(decided).body["status"] == "approved"
        assert agent.retrieve(decided).body["value"] == SECRET_VALUE
    finally:
        server.stop()
    with Store(proxy.settings) as store:
        assert store.audit_verify() == []


def test_one_agent_flooding_does_not_starve_health_or_other_agents(tmp_path):
    proxy = provision(make_settings(tmp_path))
    server = start_server(proxy.settings, {"SECRET_PROXY_RATE_BURST": "5", "SECRET_PROXY_RATE_PER_MINUTE": "6"})
    try:
        flooder = server.agent(proxy.token)
        refused = []

        def one(_: int) -> int:
            r = flooder.ask("api-key", "flood")
            if r.status == 429:
                refused.append(r.headers.get("retry-after"))
            return r.status

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(300)]
            # while the flood runs, the others get through
            health = [AgentClient(server.url, timeout=10).health().status for _ in range(20)]
            other = server.agent(proxy.other_token).ask("other-key", "not the flooder")
            statuses = [f.result() for f in futures]
        assert health == [200] * 20
        assert other.status == 201
        assert statuses.count(201) <= 6 and statuses.count(429) >= 294
        assert all(r and int(r) >= 1 for r in refused)
        with Store(proxy.settings) as store:
            refusals = [e for e in store.audit_entries() if e.detail.get("code") == "rate_limited"]
        assert len(refusals) == 1  # the first of the window now; the other 293+ as one count when it closes
    finally:
        server.stop()
    with Store(proxy.settings) as store:  # a stopping server audits the counts of its open windows
        counted = [e for e in store.audit_entries() if e.detail.get("code") == "rate_limited"]
    assert len(counted) == 2 and 1 + counted[1].detail["repeated"] == statuses.count(429)


def test_cli_revocation_and_decisions_reach_a_running_server(live, proxy_data):
    """The server caches reads; another process's commits must still show up at once."""
    agent = live.agent(proxy_data.token)
    rid = agent.ask("api-key", "cache check").body["id"]
    for _ in range(50):  # warm the server's read cache with this exact request
        assert agent.status(rid).body["status"] == "pending"
    assert cli(proxy_data.settings.data_dir, "deny", rid).returncode == 0
    time.sleep(0.05)  # the documented bound for another process's commit is 20 ms
    assert agent.status(rid).body["status"] == "denied"
    assert cli(proxy_data.settings.data_dir, "agents", "revoke", "alice").returncode == 0
    time.sleep(0.05)
    assert agent.status(rid).status == 401
    assert agent.ask("api-key", "after revocation").status == 401


def test_rotating_the_master_key_with_the_cli_while_serving(live, proxy_data):
    """The server keeps the key it started with; after a rotation it must follow, not answer 500."""
    agent, data = live.agent(proxy_data.token), proxy_data.settings.data_dir
    before = agent.ask("api-key", "approved before the rotation").body["id"]
    assert cli(data, "approve", before).returncode == 0
    rotated = cli(data, "rotate-master-key")
    assert rotated.returncode == 0, rotated.stderr
    got = agent.retrieve(before)
    assert got.status == 200 and got.body["value"] == SECRET_VALUE
    after = agent.ask("api-key", "asked after the rotation").body["id"]
    assert cli(data, "approve", after).returncode == 0
    assert agent.retrieve(after).body["value"] == SECRET_VALUE
    assert cli(data, "audit", "verify").returncode == 0


def test_a_retrieval_that_cannot_decrypt_is_not_recorded(live, proxy_data):
    agent, data = live.agent(proxy_data.token), proxy_data.settings.data_dir
    rid = agent.ask("api-key", "the value will not decrypt").body["id"]
    assert cli(data, "approve", rid).returncode == 0
    db = sqlite3.connect(proxy_data.settings.db_path)
    good = db.execute("SELECT ciphertext FROM secrets WHERE name = 'api-key'").fetchone()[0]
    db.execute("UPDATE secrets SET ciphertext = ? WHERE name = 'api-key'", (good[:-1] + bytes([good[-1] ^ 1]),))
    db.commit()
    failed = agent.retrieve(rid)
    assert failed.status == 500 and failed.body["error"] == "internal_error"
    assert agent.status(rid).body["status"] == "approved"
    with Store(proxy_data.settings) as store:
        assert "secret.retrieved" not in [e.action for e in store.audit_entries() if e.request_id == rid]
    db.execute("UPDATE secrets SET ciphertext = ? WHERE name = 'api-key'", (good,))
    db.commit()
    db.close()
    assert agent.retrieve(rid).body["value"] == SECRET_VALUE  # still approved: retrievable once it decrypts


@pytest.mark.parametrize("proxy_settings", [{"max_waits_per_agent": 4}])
def test_waiting_calls_per_agent_are_capped_and_others_are_still_served(live, proxy_data):
    agent = live.agent(proxy_data.token)
    rid = agent.ask("api-key", "held by many waits").body["id"]
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(agent.status, rid, 20) for _ in range(4)]
        time.sleep(0.5)
        for _ in range(5):  # a fifth wait, once the four are held
            extra = agent.status(rid, wait=1)
            if extra.status == 429:
                break
        assert extra.status == 429 and extra.body["error"] == "rate_limited" and extra.headers["retry-after"]
        assert AgentClient(live.url).health().status == 200
        bob = live.agent(proxy_data.other_token)
        bob_rid = bob.ask("other-key", "not held up").body["id"]
        assert bob.status(bob_rid, wait=0.2).body["status"] == "pending"
        assert agent.status(rid).status == 200  # a poll without wait still answers
        assert cli(proxy_data.settings.data_dir, "approve", rid).returncode == 0
        assert [f.result(10).body["status"] for f in held] == ["approved"] * 4


def test_a_cli_approval_reaches_the_waiting_agent_at_once(live, proxy_data):
    """No poll interval: the CLI's commit wakes the waiter through inotify on the data directory."""
    agent = live.agent(proxy_data.token)
    latencies = []
    for n in range(8):
        rid = agent.ask("api-key", f"latency {n}").body["id"]
        answered: dict = {}

        def wait(rid: str = rid, answered: dict = answered) -> None:
            reply = agent.status(rid, wait=20)
            answered.update(at=time.time(), status=reply.body["status"])

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)
        assert cli(proxy_data.settings.data_dir, "approve", rid).returncode == 0
        waiter.join(20)
        assert answered["status"] == "approved"
        db = sqlite3.connect(proxy_data.settings.db_path)
        decided_at = db.execute("SELECT decided_at FROM requests WHERE id = ?", (rid,)).fetchone()[0]
        db.close()
        latencies.append(answered["at"] - decided_at)
    latencies.sort()
    # A 0.5 s poll gave a median near 0.25 s; decided_at is taken before the CLI's fsync.
    assert latencies[len(latencies) // 2] < 0.1 and latencies[-1] < 0.3, latencies


def test_the_connection_limit_stays_below_the_open_files_limit(tmp_path):
    """uvicorn's limit_concurrency must leave room for the database and Telegram under LimitNOFILE."""
    import subprocess
    import sys

    from .proxy_helpers import ROOT

    probe = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])));"
        "from proxy.config import Settings; from proxy.server import connection_limit;"
        "print(connection_limit(Settings()), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )

    def limits(soft: int, hard: int) -> list[int]:
        out = subprocess.run(
            [sys.executable, "-c", probe, str(soft), str(hard)], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return [int(x) for x in out.stdout.split()]

    assert limits(4096, 4096) == [2048, 4096]  # the guest's unit: LimitNOFILE=4096
    assert limits(1024, 4096) == [2048, 4096]  # the soft limit is raised to the hard one
    assert limits(1024, 1024) == [960, 1024]  # too few files: fewer connections, never more than fit


@pytest.mark.parametrize("proxy_settings", [{"max_connections": 20}])
def test_connections_that_never_send_a_request_are_closed(live, proxy_data):
    """Idle connections fill the connection limit (503 for everyone) only for a few seconds."""
    import socket

    idle = [socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) for _ in range(25)]
    try:
        time.sleep(0.3)
        assert AgentClient(live.url, timeout=5).call("GET", "/health").status == 503  # uvicorn's, plain text
        started = time.monotonic()
        for s in idle:  # every one is closed by the server, not only the first
            s.settimeout(max(0.1, 10 - (time.monotonic() - started)))
            assert s.recv(1) == b""
        assert time.monotonic() - started < 8
        assert AgentClient(live.url, timeout=5).health().status == 200
        assert live.agent(proxy_data.token).ask("api-key", "after the idle flood").status == 201
    finally:
        for s in idle:
            s.close()
