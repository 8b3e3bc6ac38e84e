"""The proxy as it runs: a real uvicorn process on 127.0.0.1, the real CLI, kill -9."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from proxy.client import AgentClient
from proxy.store import Store

from .conftest import SECRET_VALUE, cli, make_settings, provision, start_server


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
    env = {"SECRET_PROXY_RATE_BURST": "100000", "SECRET_PROXY_RATE_PER_MINUTE": "600000",
           "SECRET_PROXY_MAX_PENDING_PER_AGENT": "100000", "SECRET_PROXY_POLL_BURST": "100000"}
    server = start_server(proxy.settings, env)
    agent = server.agent(proxy.token)
    acknowledged: list[str] = []
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set() and len(acknowledged) < 2000:
            try:
                r = agent.ask("api-key", "durability")
            except OSError:
                return  # the server died mid-call: that request was never acknowledged
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
