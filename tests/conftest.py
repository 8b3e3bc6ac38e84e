"""Fixtures only; the helpers they use are in proxy_helpers.py (and takeover_helpers.py, vm_fixtures.py)."""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from proxy.app import create_app
from takeover.host.files import ensure_host_dir

from .proxy_helpers import LiveServer, Proxy, make_settings, provision, start_server
from .takeover_helpers import AGENT
from .vm_fixtures import AgentVM, launch_agent_vm


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked `root` is skipped, saying why, when the suite does not run as root."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (creates users, chowns files to them, owns host directories)")
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)


@pytest.fixture
def proxy_settings() -> dict:
    """Settings for `proxy_data` (and so `client` and `live`); override with
    `@pytest.mark.parametrize("proxy_settings", [{"rate_burst": 3}])`."""
    return {}


@pytest.fixture
def proxy_data(tmp_path: Path, proxy_settings: dict) -> Proxy:
    return provision(make_settings(tmp_path, **proxy_settings), proxy_settings)


@pytest.fixture(params=["in-process", "uvicorn"])
def client(request: pytest.FixtureRequest, proxy_data: Proxy) -> Iterator[httpx.Client]:
    """Every API test runs twice: in process (Starlette's TestClient) and over real HTTP to `proxy serve`."""
    if request.param == "in-process":
        with TestClient(create_app(proxy_data.settings)) as c:
            yield c
        return
    server = start_server(proxy_data.settings)
    try:
        with httpx.Client(base_url=server.url, timeout=90) as c:
            yield c
    finally:
        server.stop()


@pytest.fixture
def live(proxy_data: Proxy) -> Iterator[LiveServer]:
    server = start_server(proxy_data.settings)
    yield server
    server.stop()


# -- an agent user of its own, for the takeover's relocation and cloud tests -------------------------


@pytest.fixture(scope="session")
def agent_user() -> pwd.struct_passwd:
    """A real unprivileged account, ours alone (created once; kept for later runs)."""
    try:
        return pwd.getpwnam(AGENT)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", AGENT],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(AGENT)


@pytest.fixture
def agent_dir(agent_user):
    """The agent's own directory, where it can reach (not under root's 0700 pytest temp)."""
    path = Path(tempfile.mkdtemp(prefix="spvm-ct-agent-", dir="/tmp"))
    os.chmod(path, 0o755)
    os.chown(path, agent_user.pw_uid, agent_user.pw_gid)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def host_dir(tmp_path):
    return ensure_host_dir(tmp_path / "host")


@pytest.fixture
def agent_vm() -> Iterator[AgentVM]:
    """The agent builds (cached) and launches its VM with vm_image, as the unprivileged agent user
    (tests/test_takeover_e2e.py, tests/test_backup_e2e.py)."""
    vm = launch_agent_vm()  # returns once the proxy answers /health (vm_image launch waits for it)
    try:
        yield vm
    finally:
        vm.discard()
