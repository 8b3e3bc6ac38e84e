from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.client import AgentClient
from proxy.config import Settings, load_settings
from proxy.demo import free_port
from proxy.store import Store, init_data_dir

ROOT = Path(__file__).resolve().parent.parent
SECRET_VALUE = "sk-live-TESTVALUE-0123456789abcdef"


@dataclass
class Proxy:
    settings: Settings
    token: str  # agent "alice": may ask for api-*
    other_token: str  # agent "bob": may ask for other-*


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(env={}, data_dir=tmp_path / "data", **overrides)


def provision(settings: Settings) -> Proxy:
    init_data_dir(settings)
    store = Store(settings)
    try:
        store.set_secret("api-key", SECRET_VALUE.encode(), "operator:test")
        store.set_secret("other-key", b"other-value", "operator:test")
        store.set_secret("db-password", b"hunter2", "operator:test")
        alice = store.add_agent("alice", ["api-*"], "operator:test")
        bob = store.add_agent("bob", ["other-*"], "operator:test")
    finally:
        store.close()
    return Proxy(settings, alice, bob)


@pytest.fixture
def proxy_data(tmp_path: Path) -> Proxy:
    return provision(make_settings(tmp_path))


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


def cli(data_dir: Path, *args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "--data-dir", str(data_dir), *args], input=stdin,
                          capture_output=True, cwd=ROOT, env=env, timeout=60)


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str
    settings: Settings

    def agent(self, token: str) -> AgentClient:
        return AgentClient(self.url, token, timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(settings: Settings, extra_env: dict | None = None) -> LiveServer:
    port = free_port()
    env = dict(os.environ, SECRET_PROXY_DATA_DIR=str(settings.data_dir), **(extra_env or {}))
    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = LiveServer(process, f"http://127.0.0.1:{port}", settings)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("proxy exited: " + process.stderr.read().decode()[-2000:])
        try:
            if AgentClient(server.url, timeout=1).health().status == 200:
                return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError("proxy did not answer /health within 30 s")


@pytest.fixture
def live(proxy_data: Proxy) -> Iterator[LiveServer]:
    server = start_server(proxy_data.settings)
    yield server
    server.stop()
