"""A brokered call's overhead, as a ratio to the same call made directly, in one run.

One HTTPS destination on 127.0.0.1 (a certificate from a test CA made here), one `proxy serve`
(uvicorn, one worker) on 127.0.0.1. Each round makes the same GET three ways, one after another,
each on a fresh TLS connection as the broker makes it:

- direct: the client connects to the destination itself (TLS verified with the test CA);
- brokered (make): `POST /v1/requests/{id}/call` for a call already approved: the proxy claims the
  approval (a durable write), resolves, connects, injects, redacts and audits (another write);
- brokered (ask + approve + make): also `POST /v1/calls` and the approval (the operator's store call in
  this process, standing in for the human, whose minutes are not the proxy's cost);
- brokered through the host's forward proxy (make): as in a taken-over VM, a second `proxy serve` with
  `egress_proxy` set tunnels the call through tinyproxy (`takeover/host/egress.py`, started here as the
  takeover starts it; needs root and tinyproxy) instead of resolving and connecting itself.

The ratio is what to read; absolute numbers depend on the machine (and the disk, for the fsyncs).

    .venv/bin/python bench/bench_broker.py [--calls 200]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from proxy.config import load_settings  # noqa: E402
from proxy.demo import free_port  # noqa: E402
from proxy.policy import build_policy  # noqa: E402
from proxy.store import Store, init_data_dir  # noqa: E402
from takeover.host import egress  # noqa: E402
from takeover.models import Endpoint  # noqa: E402
from tests.broker_upstream import Upstream, make_ca  # noqa: E402
from tests.proxy_helpers import start_server  # noqa: E402

VALUE = b"sk-bench-0123456789abcdef0123456789"


def direct(port: int, context: ssl.SSLContext) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    conn.request(
        "GET", "/v1/items", headers={"Authorization": "Bearer " + VALUE.decode(), "Accept-Encoding": "identity"}
    )
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        ca = make_ca(Path(tmp) / "ca")
        up = Upstream(ca).start()
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        (data_dir / "config.toml").write_text(
            f"broker_ca_file = {str(ca.ca_file)!r}\nrate_burst = 100000\nrate_per_minute = 100000\n"
            "call_burst = 100000\ncall_rate_per_minute = 100000\nmax_pending_per_agent = 100000\n"
        )
        settings = load_settings(env={}, data_dir=data_dir)
        init_data_dir(settings)
        url = f"https://localhost:{up.port}/v1/items"
        with Store(settings) as store:
            store.set_secret(
                "bench-key",
                VALUE,
                "operator:bench",
                build_policy([], [f"https://localhost:{up.port}/v1/"], "Authorization: Bearer {value}"),
                broker_only=True,
            )
            token = store.add_agent("bench", ["bench-*"], "operator:bench")
        server = start_server(settings, quiet=True)
        host_dir = Path(tmp) / "host"
        host_dir.mkdir(mode=0o700)
        plan = egress.EgressPlan(
            Endpoint("127.0.0.1", free_port()), (egress.Destination.parse(f"https://localhost:{up.port}"),), "-"
        )
        egress.start_forward_proxy(plan, host_dir, "nobody")
        tunnelled = start_server(
            settings, {"SECRET_PROXY_EGRESS_PROXY": f"http://127.0.0.1:{plan.listen.port}"}, quiet=True
        )
        context = ssl.create_default_context(cafile=str(ca.ca_file))
        call = {"method": "GET", "url": url, "headers": {}, "body_base64": ""}
        times: dict[str, list[float]] = {"direct": [], "make": [], "whole": [], "egress": []}
        headers = {"Authorization": f"Bearer {token}"}
        try:
            with (
                httpx.Client(base_url=server.url, headers=headers, timeout=30) as client,
                httpx.Client(base_url=tunnelled.url, headers=headers, timeout=30) as via_egress,
                Store(settings) as store,
            ):

                def ask() -> str:
                    created = client.post("/v1/calls", json={"secret": "bench-key", "reason": "bench", **call})
                    assert created.status_code == 201, created.text
                    store.decide(created.json()["id"], True, "operator:bench")
                    return created.json()["id"]

                def make(request_id: str, through: httpx.Client = client) -> None:
                    made = through.post(f"/v1/requests/{request_id}/call", json=call)
                    assert made.status_code == 200 and made.json()["status"] == 200, made.text
                    assert VALUE not in base64.b64decode(made.json()["body_base64"])

                for _ in range(5):  # warm up every path
                    direct(up.port, context)
                    make(ask())
                    make(ask(), via_egress)
                for _ in range(args.calls):
                    times["direct"].append(direct(up.port, context))
                    request_id = ask()
                    started = time.perf_counter()
                    make(request_id)
                    times["make"].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    make(ask())
                    times["whole"].append(time.perf_counter() - started)
                    request_id = ask()
                    started = time.perf_counter()
                    make(request_id, via_egress)
                    times["egress"].append(time.perf_counter() - started)
        finally:
            server.stop()
            tunnelled.stop()
            egress.stop_forward_proxy(host_dir)
            up.stop()
    base_ms = statistics.median(times["direct"]) * 1000
    print(f"{args.calls} calls each, medians; fresh TLS connection per call, GET with a ~100 byte answer")
    print(f"{'direct call':34} {base_ms:8.2f} ms   {1.0:5.2f}x")
    for key, label in (
        ("make", "brokered, approved call made"),
        ("whole", "brokered, ask + approve + make"),
        ("egress", "brokered via the host's tinyproxy"),
    ):
        ms = statistics.median(times[key]) * 1000
        print(f"{label:34} {ms:8.2f} ms   {ms / base_ms:5.2f}x")


if __name__ == "__main__":
    main()
