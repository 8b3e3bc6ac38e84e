"""The proxy's counters, in Prometheus' text format, on a listener of their own that the agent never reaches.

Guarantee: the agent-facing app has no metrics route; the figures are served by `prometheus_client`'s own
server on a second socket, and only on a loopback address (`Settings.metrics_listen`, checked by
`proxy.config.check_metrics_listen`). In the guest that is 127.0.0.1:9737 (`vm_image/guest_files.py`):
QEMU's forwards reach the guest's 10.0.2.15, never its loopback, so the host reads the figures through
its own SSH login (`secret-proxy metrics`, `takeover status`) and the agent, who has no login after the
takeover, cannot. The threat answered is an agent learning who approves what and when (approval
latency, refusal counts) or probing the proxy's state through a side door.

No figure carries a secret's name, an agent's name, a request id or a value: every label is one of a
closed set (a route's handler, an error code, an audit action, a request status), so the listener
can show nothing an operator would not print on a dashboard.

Each app has its own `CollectorRegistry` (never the library's global one): two proxies in one process
(the tests) count apart. What the serving process does (HTTP outcomes, brokered calls, refusals,
rate-limit hits, waiters, Telegram) is counted as it happens; what the database holds (secrets,
agents, requests by status, the audit chain's length, its size, the approvals' latency, decisions by
the CLI included) is read from it at each scrape, on the metrics server's thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import OUTCOME_KEY

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("proxy")

PREFIX = "secret_proxy"
# Seconds from a request's creation to its approval or denial: a tap within seconds, a CLI in minutes.
LATENCY_BOUNDS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# Refusal codes that mean "a budget is spent", counted again as rate-limit hits.
RATE_LIMIT_CODES = frozenset({"rate_limited", "too_many_waits", "too_many_calls", "too_many_pending"})


class Metrics:
    """The live counters of one app, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "Agent API requests by route handler and outcome (ok, or the error code answered)",
            ["route", "outcome"],
            registry=r,
        )
        self.calls = Counter(
            f"{PREFIX}_brokered_calls",
            "Brokered calls made, by the destination's status class (2xx..5xx) or the error code",
            ["status"],
            registry=r,
        )
        self.refusals = Counter(
            f"{PREFIX}_refusals",
            "Refused agent calls by audit action and code (every one, before the audit counts repeats)",
            ["action", "code"],
            registry=r,
        )
        self.rate_limited = Counter(
            f"{PREFIX}_rate_limit_hits",
            "Calls refused because a budget was spent, by audit action and code",
            ["action", "code"],
            registry=r,
        )
        self.waiters = Gauge(f"{PREFIX}_waiters", "Agent calls waiting (?wait=) for a request to change", registry=r)
        self.telegram_configured = Gauge(f"{PREFIX}_telegram_configured", "1 when a bot token is set", registry=r)
        self.telegram_reachable = Gauge(
            f"{PREFIX}_telegram_reachable",
            "1 while the last call to Telegram worked, 0 after one failed (0 until the bot has logged in)",
            registry=r,
        )

    def refused(self, action: str, code: str) -> None:
        self.refusals.labels(action, code).inc()
        if code in RATE_LIMIT_CODES:
            self.rate_limited.labels(action, code).inc()

    def watch_store(self, store: Store) -> None:
        self.registry.register(StoreCollector(store))


class StoreCollector(Collector):
    """What the database holds, read at each scrape (on the metrics server's thread, never the event loop's)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        try:
            figures = self.store.figures(LATENCY_BOUNDS)
        except Exception as exc:  # a scrape must not take the server down; the figure is missing instead
            log.warning("metrics: reading the store failed: %s", type(exc).__name__)
            return
        yield GaugeMetricFamily(f"{PREFIX}_secrets", "Secrets stored", value=figures.secrets)
        yield GaugeMetricFamily(f"{PREFIX}_agents", "Agent tokens that work", value=figures.agents)
        requests = GaugeMetricFamily(f"{PREFIX}_requests", "Requests in the store by status", labels=["status"])
        for status, count in sorted(figures.requests_by_status.items()):
            requests.add_metric([status], count)
        yield requests
        yield GaugeMetricFamily(f"{PREFIX}_audit_entries", "Length of the audit chain", value=figures.audit_entries)
        yield GaugeMetricFamily(
            f"{PREFIX}_store_bytes", "The database's size on disk, its WAL included", value=figures.store_bytes
        )
        latency = HistogramMetricFamily(
            f"{PREFIX}_approval_latency_seconds",
            "Seconds from a request to a person's decision, by decision and by whom (telegram, operator)",
            labels=["decision", "by"],
        )
        for (decision, by), hist in sorted(figures.decisions.items()):
            buckets = [(_bound(b), c) for b, c in zip(LATENCY_BOUNDS, hist.cumulative, strict=True)]
            latency.add_metric([decision, by], [*buckets, ("+Inf", hist.count)], hist.total_seconds)
        yield latency


def _bound(value: float) -> str:
    return str(int(value)) + ".0" if value == int(value) else str(value)


class CountRequests:
    """ASGI middleware: each request of the agent's API counted by route handler and outcome.

    The outcome is "ok" below 400, else the error code the handler answered (left in the scope by
    `proxy/errors.py`); an exception that escapes is "internal_error" (the outer handler answers 500).
    The route is the handler's name, a closed set, never the path (which holds request ids)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def noting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting)
        except Exception:
            self._count(scope, "internal_error")
            raise
        self._count(scope, "ok" if 0 < status < 400 else str(scope.get(OUTCOME_KEY) or f"http_{status}"))

    def _count(self, scope: Scope, outcome: str) -> None:
        endpoint = scope.get("endpoint")
        route = getattr(endpoint, "__name__", "unmatched") if endpoint is not None else "unmatched"
        self.metrics.requests.labels(route, outcome).inc()


class MetricsListener:
    """`prometheus_client`'s HTTP server for one registry, on its own thread and socket."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @classmethod
    def start(cls, metrics: Metrics, host: str, port: int) -> MetricsListener:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
        return cls(server, thread)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
