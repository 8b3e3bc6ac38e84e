"""The agent's tools keep standard-library copies of the API's wire rules (they import nothing else of
`proxy`); these are the proxy's own."""

from __future__ import annotations

from proxy import store, wire
from proxy.agent import proxy_http
from proxy.agent.mcp_server import reason_with_command


def test_the_agents_copies_of_the_wire_rules_are_the_proxys() -> None:
    assert proxy_http.REQUEST_ID_RE.pattern == f"^{wire.REQUEST_ID}$"
    assert proxy_http.SECRET_NAME_RE.pattern == wire.SECRET_NAME
    assert proxy_http.MAX_REASON_CHARS == wire.MAX_REASON_CHARS
    assert proxy_http.STATUSES == store.STATUSES
    assert proxy_http.MAX_WAIT_SECONDS == wire.MAX_WAIT_SECONDS


def test_the_approver_reads_the_command_a_value_is_run_with_within_the_reasons_limit() -> None:
    assert reason_with_command("deploy", ["gh", "release", "create", "v1.2"]) == (
        "deploy\n[run_with_secret runs: gh release create v1.2]"
    )
    long = reason_with_command("r" * 900, ["sh", "-c", "x" * 500])
    assert len(long) <= wire.MAX_REASON_CHARS and long.startswith("r" * 900) and long.endswith("…]")
