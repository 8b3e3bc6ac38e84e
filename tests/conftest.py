"""Fixtures only; the helpers they use are in proxy_helpers.py (and takeover_helpers.py, vm_fixtures.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from proxy.app import create_app

from .proxy_helpers import LiveServer, Proxy, make_settings, provision, start_server


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
