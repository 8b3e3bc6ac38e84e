"""A broker-only value must stay out of the agent's hands when the destination does not help.

A real `proxy serve` (uvicorn on loopback) makes approved calls to `HostileUpstream`, a destination
on 127.0.0.1 that echoes the header it was sent in every spelling an echo service, an error page or
a debug endpoint uses, compresses its answers unasked, trickles them, or floods its headers. Each test
plays one such destination and checks what the agent would check: that the value is nowhere in what
it got back, in any spelling it could undo, and that every call ends, in time, in the audit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from proxy import broker, redact
from proxy.policy import build_policy
from proxy.store import Store

from .hostile_upstream import ECHOES, HostileUpstream
from .proxy_helpers import SECRET_VALUE, LiveServer, cli, make_settings, provision, start_server

UNICODE_VALUE = "pässwörd-ключ-0123456789"
TIMEOUT = 5.0  # long enough for the held calls of the starvation test, short for the trickles


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.up = HostileUpstream().start()
        self.base = f"http://127.0.0.1:{self.up.port}"
        self.data = provision(
            make_settings(tmp),
            {
                "rate_burst": 1000,
                "call_burst": 1000,
                "max_pending_per_agent": 1000,
                "broker_max_response_bytes": 100_000,
                "broker_timeout_seconds": TIMEOUT,
            },
        )
        loopback = [self.base + "/"]  # allowed as a private address: the destination is this machine
        with Store(self.data.settings) as store:
            bearer = build_policy([], loopback, "Authorization: Bearer {value}")
            store.set_secret("api-hostile", SECRET_VALUE.encode(), "operator:test", bearer, broker_only=True)
            store.set_secret("other-hostile", SECRET_VALUE.encode(), "operator:test", bearer, broker_only=True)
            unicode_policy = build_policy([], loopback, "X-Key: {value}")
            store.set_secret("api-unicode", UNICODE_VALUE.encode(), "operator:test", unicode_policy, broker_only=True)
            store.set_secret("api-broken", b"line\nbreak-0123456789", "operator:test", bearer, broker_only=True)
            routing = build_policy([], loopback, "X-Key: {value}", ["X-HTTP-Method-Override"])
            store.set_secret("api-routing", SECRET_VALUE.encode(), "operator:test", routing, broker_only=True)
        self.server: LiveServer = start_server(self.data.settings)

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url, timeout=60, headers={"Authorization": f"Bearer {token or self.data.token}"}
        )

    def ask(
        self,
        path: str,
        secret: str = "api-hostile",
        headers: dict | None = None,
        token: str | None = None,
        body: bytes = b"",
    ):
        call = {"secret": secret, "reason": "test", "method": "POST" if body else "GET", "url": self.base + path}
        call.update(headers=headers or {}, body_base64=base64.b64encode(body).decode())
        with self.client(token) as http:
            return http.post("/v1/calls", json=call)

    def approved(self, path: str, **kw: object) -> str:
        created = self.ask(path, **kw)  # type: ignore[arg-type]
        assert created.status_code == 201, created.text
        with Store(self.data.settings) as store:
            store.decide(created.json()["id"], True, "operator:test")
        return created.json()["id"]

    def make(
        self, rid: str, path: str, headers: dict | None = None, token: str | None = None, body: bytes = b""
    ) -> httpx.Response:
        with self.client(token) as http:
            call = {"method": "POST" if body else "GET", "url": self.base + path, "headers": headers or {}}
            call["body_base64"] = base64.b64encode(body).decode()
            return http.post(f"/v1/requests/{rid}/call", json=call)

    def call(self, path: str, token: str | None = None, **kw: object) -> httpx.Response:
        return self.make(self.approved(path, token=token, **kw), path, token=token)  # type: ignore[arg-type]

    def audit_of(self, rid: str) -> list[tuple[str, dict]]:
        with Store(self.data.settings) as store:
            return [(e.action, e.detail) for e in store.audit_entries() if e.request_id == rid]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(tmp_path_factory.mktemp("hostile"))
    yield r
    r.server.stop()
    r.up.stop()
    logs = r.server.process.stderr.read().decode(errors="replace")
    assert SECRET_VALUE not in logs and UNICODE_VALUE not in logs


def everything_the_agent_got(made: httpx.Response) -> bytes:
    """The answer's body and headers, as bytes, the way an agent would dig through them."""
    answer = made.json()
    head = "\n".join(f"{n}: {v}" for n, v in answer["headers"]).encode("latin-1")
    return base64.b64decode(answer["body_base64"]) + b"\n" + head


def assert_no_spelling_of(value: str, got: bytes) -> None:
    raw = value.encode()
    for spelling in (
        raw,
        raw.upper(),
        binascii.hexlify(raw),
        base64.b64encode(raw),
        quote(value).encode(),
        quote(value, safe="").encode(),
    ):
        assert spelling.lower() not in got.lower(), spelling


# -- compression --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/gzip", "/v1/deflate", "/v1/deflate-raw", "/v1/gzip-twice"])
def test_a_compressed_answer_is_decoded_and_redacted_never_passed_through(rig, path):
    made = rig.call(path)
    assert made.status_code == 200, made.text
    got = everything_the_agent_got(made)
    # The destination echoed the injected line; decoded, it held the value: withheld whole.
    assert base64.b64decode(made.json()["body_base64"]) == redact.WITHHELD
    assert not any(n.lower() == "content-encoding" for n, _ in made.json()["headers"])
    assert_no_spelling_of(SECRET_VALUE, got)


@pytest.mark.parametrize(
    ("path", "code"),
    [("/v1/br", "encoded_response"), ("/v1/te-gzip", "bad_response"), ("/v1/bomb", "response_too_large")],
)
def test_an_answer_the_proxy_cannot_decode_within_bounds_is_refused_and_audited(rig, path, code):
    rid = rig.approved(path)
    made = rig.make(rid, path)
    assert made.status_code == 502 and made.json()["error"] == code, made.text
    assert SECRET_VALUE not in made.text
    actions = [a for a, _ in rig.audit_of(rid)]
    assert actions[-2:] == ["call.started", "call.failed"]
    assert rig.audit_of(rid)[-1][1]["code"] == code


# -- spellings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("echo", sorted(ECHOES))
def test_the_value_echoed_in_any_common_spelling_is_redacted(rig, echo):
    made = rig.call(f"/v1/echo/{echo}")
    assert made.status_code == 200, made.text
    got = everything_the_agent_got(made)
    assert made.json()["redactions"] >= 1 and got.startswith(redact.WITHHELD)
    assert_no_spelling_of(SECRET_VALUE, got)
    # The header line itself, spelled the destination's way, is gone too.
    sent = f"Authorization: Bearer {SECRET_VALUE}".encode()
    assert ECHOES[echo](sent, sent) not in got


@pytest.mark.parametrize("path", ["/v1/header-name", "/v1/folded", "/v1/header-raw"])
def test_the_value_in_a_response_headers_name_or_cut_by_a_fold_is_redacted(rig, path):
    made = rig.call(path)
    assert made.status_code == 200, made.text
    got = everything_the_agent_got(made)
    assert made.json()["redactions"] >= 1
    squeezed = b"".join(got.split())
    assert SECRET_VALUE.encode() not in squeezed and SECRET_VALUE.encode().lower() not in squeezed.lower()


def test_a_non_ascii_value_echoed_in_a_header_is_redacted(rig):
    made = rig.call("/v1/header-raw", secret="api-unicode")
    assert made.status_code == 200, made.text
    echoed = dict(made.json()["headers"])["X-Echo"]
    assert echoed == "[REDACTED]"
    assert UNICODE_VALUE not in echoed.encode("latin-1").decode("utf-8", "replace")


# -- deadlines and bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/trickle-status", "/v1/trickle-headers", "/v1/trickle-chunks"])
def test_a_destination_that_trickles_is_cut_off_at_the_calls_deadline(rig, path):
    rid = rig.approved(path)
    started = time.monotonic()
    made = rig.make(rid, path)
    took = time.monotonic() - started
    assert made.status_code == 504 and made.json()["error"] == "upstream_timeout", made.text
    assert took < TIMEOUT + 2.0, f"the call took {took:.1f} s against a deadline of {TIMEOUT} s"
    assert [a for a, _ in rig.audit_of(rid)][-1] == "call.failed"


def test_a_flood_of_response_headers_is_refused(rig):
    made = rig.call("/v1/big-headers")
    assert made.status_code == 502 and made.json()["error"] == "response_too_large", made.text
    assert len(made.content) < 4096


def test_slow_calls_of_one_agent_neither_starve_another_agent_nor_waste_approvals(rig):
    """Six held calls of one agent: four run, two are refused at once with their approvals kept,
    and another agent's call is answered while the four are still held."""
    rig.up.release.clear()
    rids = [rig.approved("/v1/hold") for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(rig.make, rid, "/v1/hold") for rid in rids]
        deadline = time.monotonic() + 20
        while rig.up.held < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rig.up.held == 4
        refused = [f.result() for f in pending if f.done()]
        deadline = time.monotonic() + 10
        while len(refused) < 2 and time.monotonic() < deadline:
            refused = [f.result() for f in pending if f.done()]
            time.sleep(0.05)
        assert [r.json()["error"] for r in refused] == ["too_many_calls"] * 2
        other = rig.call("/v1/fast", secret="other-hostile", token=rig.data.other_token)
        assert other.status_code == 200 and base64.b64decode(other.json()["body_base64"]) == b"fast"
        assert rig.up.held == 4  # still held: the other agent did not wait for them
        rig.up.release.set()
        results = [f.result() for f in pending]
    assert sorted(r.status_code for r in results) == [200] * 4 + [429] * 2
    # The two refused ones were never claimed: their approvals still make the call.
    for rid, r in zip(rids, results, strict=True):
        if r.status_code == 429:
            assert rig.make(rid, "/v1/hold").status_code == 200


# -- what the approver sees is what is sent -----------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-HTTP-Method-Override": "DELETE"},
        {"X-Original-URL": "/admin/users"},
        {"X-Forwarded-Host": "evil.example"},
        {"X-Forwarded-Anything": "x"},
        {"Forwarded": "host=evil.example"},
    ],
)
def test_routing_override_headers_are_refused_unless_the_policy_names_them(rig, headers):
    refused = rig.ask("/v1/x", headers=headers)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_request"
    assert "--allow-header" in refused.json()["detail"]


def test_a_routing_header_the_policy_names_is_allowed_and_shown_to_the_approver(rig):
    created = rig.ask("/v1/x", secret="api-routing", headers={"X-HTTP-Method-Override": "DELETE"})
    assert created.status_code == 201, created.text
    listed = cli(rig.data.settings.data_dir, "requests", "list", "--status", "pending").stdout.decode()
    assert "header X-HTTP-Method-Override: DELETE" in listed
    assert "header X-Key: •••••• (added by the proxy)" in listed


@pytest.mark.parametrize("path", ["/v1/..;/admin", "/v1/x;jsessionid=1", "/v1/%2e%2e%3b/admin", "/v1/é", "/v1/%00"])
def test_paths_servers_reinterpret_and_non_ascii_paths_are_refused_before_anyone_is_asked(rig, path):
    count = rig.up.connections
    refused = rig.ask(path)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_request", refused.text
    assert rig.up.connections == count


def test_requests_list_and_approve_show_header_values_escaped(rig):
    created = rig.ask("/v1/x", headers={"X-Note": "nel\x85csi\x9b[31m"})
    assert created.status_code == 201, created.text
    listed = cli(rig.data.settings.data_dir, "requests", "list", "--status", "pending").stdout.decode()
    assert "header X-Note: nel\\x85csi\\x9b[31m" in listed
    assert "\x85" not in listed and "\x9b" not in listed
    approved = cli(rig.data.settings.data_dir, "approve", created.json()["id"]).stdout.decode()
    assert "header X-Note: nel\\x85csi\\x9b[31m" in approved
    assert "header Authorization: Bearer •••••• (added by the proxy)" in approved


# -- every call ends in the audit ---------------------------------------------------------------------


def test_a_call_that_fails_inside_the_proxy_ends_in_call_failed_with_a_json_error(rig):
    rid = rig.approved("/v1/x", secret="api-broken")
    made = rig.make(rid, "/v1/x")
    assert made.status_code == 500 and made.json()["error"] == "internal_error"
    actions = [a for a, _ in rig.audit_of(rid)]
    assert actions[-2:] == ["call.started", "call.failed"]


# -- addresses ----------------------------------------------------------------------------------------


def test_every_checked_address_is_tried_in_turn(rig):
    """127.0.0.2 refuses (nothing listens there); the call goes on to 127.0.0.1."""
    policy = build_policy([], [rig.base + "/"], "X-Key: {value}")
    assert policy is not None
    call = broker.Call("GET", rig.base + "/v1/fast", (), broker.sha256(b""), 0)
    limits = broker.Limits(1000, 100_000, TIMEOUT, "")
    answer = asyncio.run(
        broker.execute(policy, call, b"", b"value-0123456789", limits, lambda host, port: ["127.0.0.2", "127.0.0.1"])
    )
    assert answer.status == 200 and answer.body == b"fast" and answer.address == "127.0.0.1"


def test_a_held_call_is_released_when_the_proxy_stops_holding_it(rig):
    """The per-agent count goes back down after calls end: a fifth call later is not refused."""
    rig.up.release.set()
    for _ in range(5):
        assert rig.call("/v1/fast").status_code == 200


def test_in_flight_bounds_the_sum_as_well_as_each_agent():
    from proxy.ratelimit import InFlight

    slots = InFlight(per_key=2, total=3)
    with slots.hold("a"), slots.hold("a"):
        assert slots.full("a") == "agent" and slots.full("b") is None
        with slots.hold("b"):
            assert slots.full("b") == "total" and slots.full("c") == "total"
    assert slots.full("a") is None


# -- what the review found (2026-12-04) ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/not-http", "/v1/bad-header"])
def test_an_error_about_a_malformed_answer_never_quotes_it(rig, path):
    """h11 quotes the line it could not parse; a destination that echoes the request makes that line the key."""
    made = rig.call(path)
    assert made.status_code == 502 and made.json()["error"] == "bad_response", made.text
    assert_no_spelling_of(SECRET_VALUE, made.content)


def test_an_answer_that_echoes_guesses_tells_the_agent_only_that_one_matched(rig):
    """A thousand candidate values in the approved body, echoed back: redacting the one that is the secret
    in place would point at it. The body is withheld whole, and its digest headers dropped."""
    guesses = [f"sk-live-GUESS-{i:04d}" for i in range(1000)]
    guesses[737] = SECRET_VALUE
    body = "\n".join(guesses).encode()
    rid = rig.approved("/v1/echo-body", body=body)
    made = rig.make(rid, "/v1/echo-body", body=body)
    assert made.status_code == 200, made.text
    answer = base64.b64decode(made.json()["body_base64"])
    assert answer == redact.WITHHELD and b"GUESS" not in answer
    headers = dict(made.json()["headers"])
    assert "ETag" not in headers and headers["Content-Length"] == str(len(answer))


def test_a_header_value_with_white_space_at_its_ends_is_refused_before_anyone_is_asked(rig):
    refused = rig.ask("/v1/x", headers={"X-Note": " padded "})
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_request"
