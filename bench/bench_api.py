"""Throughput of the proxy's hot paths as a ratio to a bare Starlette JSON endpoint.

Both servers run the same way in this one run: one uvicorn process (uvloop +
httptools, one worker) on 127.0.0.1, loaded by `wrk` (Debian package) from a
second process with keep-alive connections. The ratio is what to read; absolute
numbers depend on the machine.

    .venv/bin/python bench/bench_api.py [--seconds 4] [--rounds 3] [--connections 16]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.config import load_settings  # noqa: E402
from proxy.demo import free_port  # noqa: E402
from proxy.store import Store, init_data_dir  # noqa: E402

BARE_APP = textwrap.dedent("""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def status(request):
        return JSONResponse({"id": request.path_params["id"], "status": "approved"})

    app = Starlette(routes=[Route("/v1/requests/{id}", status)])
""")


def serve(args: list[str], env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except urllib.error.HTTPError:
            return proc  # it answers (the bare app has no /health)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"server on port {port} did not start")


def wrk(url: str, seconds: int, connections: int, token: str | None, script: Path | None) -> float:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"benchmark invalid: {non2xx.group(1)} error responses from {url}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--retrievals", type=int, default=30000, help="approved requests prepared for /secret")
    opts = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")

    with tempfile.TemporaryDirectory(prefix="spx-bench-") as tmp:
        settings = load_settings(env={}, data_dir=Path(tmp) / "data")
        init_data_dir(settings)
        with Store(settings) as store:
            store.set_secret("bench-key", b"sk-bench-" + os.urandom(16).hex().encode(), "operator:bench")
            token = store.add_agent("bench", ["bench-*"], "operator:bench")
            agent = store.authenticate(token)
            assert agent is not None
            poll_id = store.create_request(agent, "bench-key", "poll", 3600).id
            ids = []
            # Prepared straight through the store: the benchmark measures serving, not setup.
            with store.transaction() as conn:
                now = time.time()
                for i in range(opts.retrievals):
                    rid = f"req_bench{i:027d}"  # the shape the proxy issues: req_ + 32 characters
                    conn.execute(
                        "INSERT INTO requests VALUES (?, 'bench', 'bench-key', 'r', 3600, 'approved',"
                        " ?, ?, ?, 'operator:bench', NULL)",
                        (rid, now, now + 3600, now),
                    )
                    ids.append(rid)

        script = Path(tmp) / "retrieve.lua"
        script.write_text(
            "ids = {"
            + ",".join(f'"{i}"' for i in ids)
            + "}\n"
            + textwrap.dedent("""
            n = 0
            request = function()
              n = n + 1
              return wrk.format("GET", "/v1/requests/" .. ids[n] .. "/secret")
            end
        """)
        )
        (Path(tmp) / "bare_app.py").write_text(BARE_APP)

        bare_env = dict(os.environ, PYTHONPATH=f"{tmp}:{ROOT}")
        # One agent at full speed: its per-agent budgets (docs/api.md) are lifted for the measurement.
        proxy_env = dict(
            os.environ,
            SECRET_PROXY_DATA_DIR=str(settings.data_dir),
            SECRET_PROXY_POLL_BURST="100000000",
            SECRET_PROXY_POLL_RATE_PER_MINUTE="100000000",
            SECRET_PROXY_RETRIEVE_BURST="100000000",
            SECRET_PROXY_RETRIEVE_RATE_PER_MINUTE="100000000",
        )
        uvicorn_args = ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
        bare_port, proxy_port = free_port(), free_port()
        servers = [
            serve(
                [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(bare_port), *uvicorn_args],
                bare_env,
                bare_port,
            ),
            serve([sys.executable, "-m", "proxy", "serve", "--port", str(proxy_port)], proxy_env, proxy_port),
        ]
        # Interleaved rounds, so a noisy moment on the machine hits both sides alike.
        rows: dict[str, list[float]] = {"bare": [], "poll": [], "retrieval": []}
        try:
            for _ in range(opts.rounds):
                rows["bare"].append(
                    wrk(f"http://127.0.0.1:{bare_port}/v1/requests/x", opts.seconds, opts.connections, None, None)
                )
                rows["poll"].append(
                    wrk(
                        f"http://127.0.0.1:{proxy_port}/v1/requests/{poll_id}",
                        opts.seconds,
                        opts.connections,
                        token,
                        None,
                    )
                )
            rows["retrieval"].append(
                wrk(f"http://127.0.0.1:{proxy_port}/", opts.seconds, opts.connections, token, script)
            )
        finally:
            for proc in servers:
                proc.terminate()
                proc.wait()

    bare, poll, retrieval = (statistics.median(rows[k]) for k in ("bare", "poll", "retrieval"))
    ratios = [p / b for p, b in zip(rows["poll"], rows["bare"], strict=True)]
    print(f"rounds: {opts.rounds} x {opts.seconds} s, {opts.connections} connections, medians")
    print(f"bare Starlette JSON endpoint            : {bare:8.0f} req/s  (1.00)")
    print(
        f"status poll (GET /v1/requests/ID)       : {poll:8.0f} req/s  ({poll / bare:.2f} of bare;"
        f" per round {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print(
        f"retrieval (GET /v1/requests/ID/secret)  : {retrieval:8.0f} req/s  ({retrieval / bare:.2f} of bare;"
        " each one a durable write)"
    )


if __name__ == "__main__":
    main()
