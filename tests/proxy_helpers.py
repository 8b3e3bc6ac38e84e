"""Helpers for the proxy's tests: a provisioned data directory, the CLI, a live `proxy serve`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def provision(settings: Settings, config: dict | None = None) -> Proxy:
    """A data directory with three secrets and two agents; `config` goes to its config.toml,
    where `proxy serve` in another process reads it too."""
    init_data_dir(settings)
    if config:
        (settings.data_dir / "config.toml").write_text("".join(f"{k} = {v!r}\n" for k, v in config.items()))
    with Store(settings) as store:
        store.set_secret("api-key", SECRET_VALUE.encode(), "operator:test")
        store.set_secret("other-key", b"other-value", "operator:test")
        store.set_secret("db-password", b"hunter2", "operator:test")
        alice = store.add_agent("alice", ["api-*"], "operator:test")
        bob = store.add_agent("bob", ["other-*"], "operator:test")
    return Proxy(settings, alice, bob)


def cli(data_dir: Path, *args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--data-dir", str(data_dir), *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str
    settings: Settings

    def agent(self, token: str) -> AgentClient:
        return AgentClient(self.url, token, timeout=30)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        stop_process(self.process, 10)


def stop_process(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_serving(url: str, process: subprocess.Popen, output: Callable[[], str], timeout: float = 30) -> None:
    """Until `url`/health answers; a proxy that exits first fails with the end of its `output()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("proxy exited: " + output()[-2000:])
        try:
            if AgentClient(url, timeout=1).health().status == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"proxy did not answer /health within {timeout:.0f} s")


def start_server(settings: Settings, extra_env: dict | None = None, *, quiet: bool = False) -> LiveServer:
    """`python -m proxy serve` on a free loopback port, once it answers /health.

    Its settings are `settings`' data directory and `extra_env`, none inherited from the caller's
    SECRET_PROXY_* variables. `quiet` drops its log (a benchmark's load would fill a pipe nobody reads).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECRET_PROXY_")}
    env.update(SECRET_PROXY_DATA_DIR=str(settings.data_dir), **(extra_env or {}))
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if quiet else subprocess.PIPE,
    )
    server = LiveServer(process, f"http://127.0.0.1:{port}", settings)
    try:
        wait_until_serving(server.url, process, lambda: "" if quiet else process.stderr.read().decode())
    except RuntimeError:
        server.stop()
        raise
    return server
