"""The metrics listener: counters over real HTTP from a real `proxy serve`, on a socket the agent's API is not."""

from __future__ import annotations

import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.client import AgentClient
from proxy.config import ConfigError, check_metrics_listen
from proxy.demo import free_port
from proxy.metrics import Metrics

from .broker_helpers import Rig
from .proxy_helpers import cli, make_settings, provision, start_server
from .telegram_helpers import start_rig, wait_until_polling


def scrape(listen: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the listener at `listen`, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def served(tmp_path):
    """`proxy serve` with a metrics listener on a loopback port of its own, and a budget of 3 asks."""
    proxy = provision(make_settings(tmp_path))
    listen = f"127.0.0.1:{free_port()}"
    server = start_server(proxy.settings, {"SECRET_PROXY_METRICS_LISTEN": listen, "SECRET_PROXY_RATE_BURST": "3"})
    yield proxy, server, listen
    server.stop()


def test_the_agent_api_has_no_metrics_route_and_the_listener_is_another_socket(served):
    proxy, server, listen = served
    app = create_app(proxy.settings, background=False)
    assert not [r for r in app.routes if "metrics" in getattr(r, "path", "")]
    # Over the agent's port, /metrics is the API's 404, with no figure in it.
    answer = AgentClient(server.url).call("GET", "/metrics")
    assert answer.status == 404 and answer.body["error"] == "not_found"
    host, port = check_metrics_listen(listen)
    assert host == "127.0.0.1" and port != server.port
    # The metrics port answers Prometheus text, not the agent's API.
    with urllib.request.urlopen(f"http://{listen}/v1/secrets", timeout=10) as other:
        assert b"secret_proxy_http_requests_total" in other.read()
    # The kernel's own table: the metrics port listens on 127.0.0.1 and nowhere else.
    assert listening_addresses(port) == {"127.0.0.1"}


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port` (IPv4 and IPv6), from /proc/net."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    if len(raw) == 4:
                        found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                    else:
                        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                        found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_requests_refusals_and_rate_limit_hits_are_counted_by_outcome(served):
    proxy, server, listen = served
    agent = server.agent(proxy.token)
    before = scrape(listen)
    assert sample(before, "secret_proxy_http_requests_total", route="create_request", outcome="ok") == 0
    asked = [agent.ask("api-key", f"deploy {n}") for n in range(5)]
    assert [a.status for a in asked] == [201, 201, 201, 429, 429]
    assert AgentClient(server.url, "not-a-token").call("GET", "/v1/secrets").status == 401
    assert agent.ask("db-password", "outside alice's scope").status == 429  # the budget is spent first
    assert agent.call("GET", "/v1/requests/not-an-id").body["error"] == "malformed_id"
    after = scrape(listen)
    assert sample(after, "secret_proxy_http_requests_total", route="create_request", outcome="ok") == 3
    assert sample(after, "secret_proxy_http_requests_total", route="create_request", outcome="rate_limited") == 3
    assert sample(after, "secret_proxy_http_requests_total", route="list_secrets", outcome="unauthorized") == 1
    assert sample(after, "secret_proxy_http_requests_total", route="get_request", outcome="malformed_id") == 1
    hits = sample(after, "secret_proxy_rate_limit_hits_total", action="request.refused", code="rate_limited")
    assert hits == 3
    assert sample(after, "secret_proxy_refusals_total", action="status.refused", code="malformed_id") == 1
    assert sample(after, "secret_proxy_requests", status="pending") == 3
    assert sample(after, "secret_proxy_secrets") == 3 and sample(after, "secret_proxy_agents") == 2
    assert sample(after, "secret_proxy_audit_entries") > sample(before, "secret_proxy_audit_entries")
    assert sample(after, "secret_proxy_store_bytes") > 0
    assert sample(after, "secret_proxy_telegram_configured") == 0


def test_approvals_by_the_cli_are_counted_with_their_latency_and_waiters_are_seen(served):
    proxy, server, listen = served
    agent = server.agent(proxy.token)
    approved, denied = (agent.ask("api-key", f"ask {n}").body["id"] for n in range(2))
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(agent.status, approved, 20)
        deadline = time.monotonic() + 10
        while sample(scrape(listen), "secret_proxy_waiters") != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sample(scrape(listen), "secret_proxy_waiters") == 1
        time.sleep(1.1)  # the approval is more than a second after the ask
        assert cli(proxy.settings.data_dir, "approve", approved).returncode == 0
        assert waiting.result(20).body["status"] == "approved"
    assert cli(proxy.settings.data_dir, "deny", denied).returncode == 0
    figures = scrape(listen)
    assert sample(figures, "secret_proxy_waiters") == 0
    name = "secret_proxy_approval_latency_seconds"
    assert sample(figures, f"{name}_count", decision="approved", by="operator") == 1
    assert sample(figures, f"{name}_bucket", decision="approved", by="operator", le="1.0") == 0
    assert sample(figures, f"{name}_bucket", decision="approved", by="operator", le="5.0") == 1
    assert sample(figures, f"{name}_sum", decision="approved", by="operator") > 1.0
    assert sample(figures, f"{name}_count", decision="denied", by="operator") == 1
    assert sample(figures, "secret_proxy_requests", status="approved") == 1
    assert sample(figures, "secret_proxy_requests", status="denied") == 1


def test_the_cli_prints_the_figures_from_the_listener(served):
    proxy, server, listen = served
    printed = cli(proxy.settings.data_dir, "metrics", "--from", listen)
    assert printed.returncode == 0, printed.stderr
    assert 'secret_proxy_requests{status="pending"}' in printed.stdout.decode()
    nobody = cli(proxy.settings.data_dir, "metrics", "--from", f"127.0.0.1:{free_port()}")
    assert nobody.returncode == 1 and b"did not answer" in nobody.stderr


@pytest.mark.parametrize("listen", ["0.0.0.0:9737", "10.0.2.15:9737", "localhost:9737", "127.0.0.1", "[::]:1"])
def test_the_metrics_listen_only_on_a_loopback_address(tmp_path, listen):
    with pytest.raises(ConfigError, match="loopback"):
        make_settings(tmp_path, metrics_listen=listen)


def test_loopback_addresses_are_accepted():
    assert check_metrics_listen("127.0.0.1:9737") == ("127.0.0.1", 9737)
    assert check_metrics_listen("[::1]:9737") == ("::1", 9737)


def test_serve_refuses_the_api_port_for_the_metrics(tmp_path):
    proxy = provision(make_settings(tmp_path))
    port = free_port()
    refused = cli(proxy.settings.data_dir, "serve", "--port", str(port), "--metrics-listen", f"127.0.0.1:{port}")
    assert refused.returncode == 1 and b"the API's port" in refused.stderr


def test_a_taken_metrics_port_leaves_the_api_serving(tmp_path):
    proxy = provision(make_settings(tmp_path))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        listen = f"127.0.0.1:{squatter.getsockname()[1]}"
        server = start_server(proxy.settings, {"SECRET_PROXY_METRICS_LISTEN": listen})
        try:
            assert server.agent(proxy.token).call("GET", "/v1/secrets").status == 200
        finally:
            server.stop()
        assert b"cannot listen on" in server.process.stderr.read()


def test_each_app_counts_in_a_registry_of_its_own():
    one, two = Metrics(), Metrics()
    one.refused("request.refused", "rate_limited")
    assert one.registry.get_sample_value(
        "secret_proxy_rate_limit_hits_total", {"action": "request.refused", "code": "rate_limited"}
    )
    assert (
        two.registry.get_sample_value(
            "secret_proxy_rate_limit_hits_total", {"action": "request.refused", "code": "rate_limited"}
        )
        is None
    )


def test_brokered_calls_are_counted_by_the_destinations_status_class(tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    rig = Rig(tmp_path, {"SECRET_PROXY_METRICS_LISTEN": listen})
    try:
        url = rig.base + "/v1/counted"
        rid = rig.approved(url)
        assert rig.make(rid, url).json()["status"] == 200
        assert rig.make(rid, url).json()["error"] == "already_used"  # refused: no call made, none counted
        figures = scrape(listen)
    finally:
        rig.stop()
    assert sample(figures, "secret_proxy_brokered_calls_total", status="2xx") == 1
    assert sum(v for (name, _), v in figures.items() if name == "secret_proxy_brokered_calls_total") == 1
    assert sample(figures, "secret_proxy_refusals_total", action="call.refused", code="already_used") == 1


def test_telegram_reachability_follows_the_bot_api(tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    rig = start_rig(tmp_path, {"SECRET_PROXY_METRICS_LISTEN": listen}, down="unreachable")
    try:

        def reachable() -> float:
            return sample(scrape(listen), "secret_proxy_telegram_reachable")

        assert sample(scrape(listen), "secret_proxy_telegram_configured") == 1
        time.sleep(1.0)  # several failed logins
        assert reachable() == 0
        rig.emu.come_back()
        wait_until_polling(rig)
        deadline = time.monotonic() + 15
        while reachable() != 1:
            assert time.monotonic() < deadline, "the gauge never showed Telegram reachable"
            time.sleep(0.1)
        rig.emu.go_down("unreachable")
        rig.ask("posted while Telegram is down")
        while reachable() != 0:
            assert time.monotonic() < deadline + 15, "the gauge never showed Telegram down again"
            time.sleep(0.1)
    finally:
        rig.stop()
