"""`python -m proxy demo`: a local round trip on loopback, with the real server and CLI.

The operator stores a secret and creates an agent; the agent asks; the operator
approves with the CLI (the approval channel when Telegram is not configured);
the agent retrieves the value once and is refused the second time.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .client import AgentClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cli(data_dir: Path, *args: str, stdin: bytes | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "--data-dir", str(data_dir), *args],
        input=stdin,
        capture_output=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"`python -m proxy {' '.join(args)}` failed: {out.stderr.decode().strip()}")
    return out.stdout.decode().strip()


def _step(n: int, text: str) -> float:
    print(f"[{n}] {text}", flush=True)
    return time.monotonic()


def _done(start: float, text: str) -> None:
    print(f"    {text} ({time.monotonic() - start:.2f} s)", flush=True)


def run_demo(port: int = 0) -> None:
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="secret-proxy-demo-") as tmp:
        data_dir = Path(tmp) / "data"
        t = _step(1, f"operator: init a data directory in {data_dir}")
        _cli(data_dir, "init")
        value = "demo-" + secrets.token_hex(8)
        _cli(data_dir, "secrets", "set", "demo-api-key", stdin=value.encode())
        token = _cli(data_dir, "agents", "add", "demo-agent", "--secrets", "demo-*")
        _done(t, "stored secret demo-api-key and created agent demo-agent (token shown to the agent only)")

        t = _step(2, f"operator: start the proxy on http://127.0.0.1:{port}")
        env = dict(os.environ, SECRET_PROXY_DATA_DIR=str(data_dir))
        env.pop("SECRET_PROXY_TELEGRAM_TOKEN", None)
        server = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            agent = AgentClient(f"http://127.0.0.1:{port}", token)
            deadline = time.monotonic() + 30
            while True:
                try:
                    if agent.health().status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    errors = server.stderr.read() if server.stderr else b""
                    raise SystemExit("the proxy did not start: " + errors.decode()[-2000:])
                time.sleep(0.1)
            _done(t, "GET /health answered ok")

            t = _step(3, "agent: POST /v1/requests for demo-api-key")
            created = agent.ask("demo-api-key", "demo: call the example API")
            request_id = created.body["id"]
            _done(t, f"{created.status} {created.body['status']}, id {request_id[:10]}…")

            t = _step(4, "approver: python -m proxy approve ID  (no Telegram configured)")
            print("    " + _cli(data_dir, "approve", request_id))
            _done(t, "approved through the CLI channel")

            t = _step(5, "agent: GET /v1/requests/ID?wait=10, then /secret")
            status = agent.status(request_id, wait=10)
            got = agent.retrieve(request_id)
            ok = got.status == 200 and got.body.get("value") == value
            _done(
                t,
                f"status {status.body['status']}; value retrieved: {'matches' if ok else 'MISMATCH'} "
                f"({len(value)} characters, not printed)",
            )
            again = agent.retrieve(request_id)
            print(f"[6] agent: a second retrieval answers {again.status} {again.body.get('error')}")

            verify = _cli(data_dir, "audit", "verify")
            print(f"[7] operator: {verify}")
            if not ok or again.status != 410:
                raise SystemExit("demo FAILED")
            print("demo passed: one approval, one retrieval, the second refused")
        finally:
            server.terminate()
            server.wait(timeout=10)
