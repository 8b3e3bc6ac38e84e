"""`takeover status` at a glance: the proxy's figures as the host reads them, the VM's uptime, its egress list."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from proxy.demo import free_port
from takeover import glance
from takeover.host import egress
from takeover.host.ssh import SSHTarget
from takeover.models import Endpoint

from .proxy_helpers import ROOT, cli, make_settings, provision, start_server


class LocalLogin(SSHTarget):
    """The host's SSH login, with the guest played by this machine: the remote words run here, the
    guest's wrapper (`secret-proxy`) as `python -m proxy` on the test's data directory."""

    data_dir: Path = Path("/nonexistent")

    def run(self, *remote: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        assert remote[0] == glance.CLI
        argv = [sys.executable, "-m", "proxy", "--data-dir", str(self.data_dir), *remote[1:]]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture
def served(tmp_path):
    proxy = provision(make_settings(tmp_path))
    listen = f"127.0.0.1:{free_port()}"
    server = start_server(proxy.settings, {"SECRET_PROXY_METRICS_LISTEN": listen, "SECRET_PROXY_RATE_BURST": "2"})
    login = LocalLogin(Endpoint("127.0.0.1", 22), tmp_path / "key", tmp_path / "known_hosts")
    object.__setattr__(login, "data_dir", proxy.settings.data_dir)
    yield proxy, server, listen, login
    server.stop()


def test_the_figures_are_a_real_proxys_read_over_the_login(served):
    proxy, server, listen, login = served
    agent = server.agent(proxy.token)
    asked = [agent.ask("api-key", f"ask {n}") for n in range(3)]
    assert [a.status for a in asked] == [201, 201, 429]
    assert cli(proxy.settings.data_dir, "approve", asked[0].body["id"]).returncode == 0
    figures = glance.fetch_figures(login, listen)
    assert figures.requests_by_status["pending"] == 1 and figures.requests_by_status["approved"] == 1
    assert figures.http_requests_by_outcome == {"ok": 3, "rate_limited": 1}  # the /health start_server waited on
    assert figures.rate_limit_hits == 1 and figures.refusals_by_code == {"rate_limited": 1}
    assert figures.approvals == 1 and figures.denials == 0 and figures.approval_seconds_mean is not None
    assert (figures.secrets, figures.agents, figures.waiters) == (3, 2, 0)
    assert figures.audit_entries > 0 and figures.store_bytes > 0
    assert figures.telegram == "not configured"


def test_a_listener_that_does_not_answer_is_an_error_not_figures(served):
    proxy, server, listen, login = served
    with pytest.raises(glance.TakeoverError, match="did not answer"):
        glance.fetch_figures(login, f"127.0.0.1:{free_port()}")


@pytest.mark.parametrize("text", ["<html>not metrics</html>", "secret_proxy_secrets three\n"])
def test_text_that_is_not_prometheus_is_refused(text):
    with pytest.raises(ValueError):
        glance.read_figures(text)


def test_oversized_metrics_are_refused_before_parsing():
    with pytest.raises(ValueError, match="over"):
        glance.read_figures("#" * (glance.METRICS_MAX_BYTES + 1))


def test_a_guests_unknown_figures_are_left_out(served):
    proxy, server, listen, login = served
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    figures = glance.read_figures(text + 'planted_total{secret="api-key"} 7\n')
    assert "api-key" not in repr(figures)


def test_uptime_is_the_processs_own():
    child = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(1.2)
        assert 1.0 <= glance.uptime_seconds(child.pid) < 10
        assert glance.uptime_seconds(os.getpid()) >= glance.uptime_seconds(child.pid)
    finally:
        child.kill()
        child.wait()


class Stopped:
    def pid(self, spec: object) -> None:
        return None


def test_a_stopped_vm_is_said_so_and_nothing_is_asked_of_it(tmp_path):
    login = LocalLogin(Endpoint("127.0.0.1", 22), tmp_path / "key", tmp_path / "known_hosts")
    shown = glance.vm_glance(object(), Stopped(), login)  # type: ignore[arg-type]
    assert shown["vm"]["running"] is False and "takeover start" in shown["vm"]["detail"]
    assert "metrics" not in shown


def test_the_egress_list_is_the_saved_plans(tmp_path):
    assert glance.egress_glance(tmp_path) == {}
    plan = egress.EgressPlan(
        Endpoint("127.0.0.1", 3128),
        (egress.Destination.parse("https://api.telegram.org"), egress.Destination.parse("https://example.com:8443")),
        "nobody",
    )
    egress.save_plan(tmp_path, plan)
    assert glance.egress_glance(tmp_path) == {
        "egress_allowed": ["https://api.telegram.org:443", "https://example.com:8443"]
    }
