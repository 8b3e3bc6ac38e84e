"""The agent's HTTP API, in process and over real HTTP to uvicorn (the `client` fixture runs both).

docs/api.md is the spec.
"""

from __future__ import annotations

import threading
import time

import pytest
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.store import Store

from .proxy_helpers import SECRET_VALUE, Proxy, make_settings, provision

WELL_FORMED_UNKNOWN = "req_" + "x" * 32


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def ask(client: TestClient, token: str, secret: str = "api-key", reason: str = "deploy", **extra):
    return client.post("/v1/requests", json={"secret": secret, "reason": reason, **extra}, headers=auth(token))


def decide(proxy: Proxy, request_id: str, approve: bool = True, actor: str = "operator:test"):
    with Store(proxy.settings) as store:
        return store.decide(request_id, approve, actor)


def test_health_needs_no_token(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_openapi_describes_every_route(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/health",
        "/v1/requests",
        "/v1/requests/{id}",
        "/v1/requests/{id}/secret",
        "/v1/calls",
        "/v1/requests/{id}/call",
        "/v1/requests/{id}/cancel",
        "/v1/secrets",
    }


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}])
def test_v1_calls_without_a_valid_token_are_unauthorized(client, headers):
    for method, path in (
        ("POST", "/v1/requests"),
        ("GET", "/v1/requests/x"),
        ("GET", "/v1/requests/x/secret"),
        ("POST", "/v1/calls"),
        ("POST", "/v1/requests/x/call"),
    ):
        r = client.request(method, path, headers=headers, json={"secret": "api-key", "reason": "r"})
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"


def test_full_round_trip_retrieves_once(client, proxy_data):
    r = ask(client, proxy_data.token, ttl_seconds=60)
    assert r.status_code == 201
    body = r.json()
    assert body["status"] == "pending" and body["secret"] == "api-key" and body["expires_at"].endswith("Z")
    assert len(body["id"]) >= 4 + 32  # "req_" + 24 random bytes in base64url

    rid = body["id"]
    assert client.get(f"/v1/requests/{rid}/secret", headers=auth(proxy_data.token)).json()["error"] == "pending"
    assert decide(proxy_data, rid).changed
    status = client.get(f"/v1/requests/{rid}", headers=auth(proxy_data.token)).json()
    assert status["status"] == "approved" and status["decided_by"] == "operator"
    assert set(status) == {
        "id",
        "secret",
        "status",
        "reason",
        "created_at",
        "expires_at",
        "decided_at",
        "decided_by",
        "call",
    }

    got = client.get(f"/v1/requests/{rid}/secret", headers=auth(proxy_data.token))
    assert got.status_code == 200 and got.json() == {"secret": "api-key", "value": SECRET_VALUE}
    again = client.get(f"/v1/requests/{rid}/secret", headers=auth(proxy_data.token))
    assert again.status_code == 410 and again.json()["error"] == "already_retrieved"
    assert client.get(f"/v1/requests/{rid}", headers=auth(proxy_data.token)).json()["status"] == "retrieved"


def test_denied_request_refuses_retrieval(client, proxy_data):
    rid = ask(client, proxy_data.token).json()["id"]
    decide(proxy_data, rid, approve=False)
    r = client.get(f"/v1/requests/{rid}/secret", headers=auth(proxy_data.token))
    assert r.status_code == 403 and r.json()["error"] == "denied"


def test_a_decision_is_final(client, proxy_data):
    rid = ask(client, proxy_data.token).json()["id"]
    assert decide(proxy_data, rid, approve=False).changed
    second = decide(proxy_data, rid, approve=True)
    assert not second.changed and second.request.status == "denied"


@pytest.mark.parametrize(
    "body,why",
    [
        ({"reason": "x"}, "missing secret"),
        ({"secret": "api-key"}, "missing reason"),
        ({"secret": "api key", "reason": "x"}, "space in name"),
        ({"secret": "a" * 129, "reason": "x"}, "name too long"),
        ({"secret": "api-key", "reason": ""}, "empty reason"),
        ({"secret": "api-key", "reason": "   "}, "blank reason"),
        ({"secret": "api-key", "reason": "x" * 1001}, "reason too long"),
        ({"secret": "api-key", "reason": "x", "ttl_seconds": 0}, "ttl zero"),
        ({"secret": "api-key", "reason": "x", "ttl_seconds": "60"}, "ttl not an int"),
        ({"secret": 5, "reason": "x"}, "name not a string"),
        ({"secret": "api-key\n", "reason": "x"}, "newline after the name ($ would let it through)"),
    ],
)
def test_invalid_bodies_are_refused(client, proxy_data, body, why):
    r = client.post("/v1/requests", json=body, headers=auth(proxy_data.token))
    assert r.status_code == 400, why
    assert r.json()["error"] == "invalid_request"


def test_bad_json_is_invalid_request(client, proxy_data):
    for raw in (b"{not json", b"[1,2]", b"\xff\xfe"):
        r = client.post(
            "/v1/requests", content=raw, headers={**auth(proxy_data.token), "Content-Type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_reason_of_exactly_1000_characters_is_accepted(client, proxy_data):
    assert ask(client, proxy_data.token, reason="x" * 1000).status_code == 201


def test_body_over_16_kib_is_too_large(client, proxy_data):
    r = client.post(
        "/v1/requests",
        content=b"{" + b" " * (16 * 1024 + 10) + b"}",
        headers={**auth(proxy_data.token), "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"] == "too_large"


def test_chunked_body_over_the_limit_is_too_large(client, proxy_data):
    def chunks():
        for _ in range(20):
            yield b" " * 1024

    r = client.post(
        "/v1/requests", content=chunks(), headers={**auth(proxy_data.token), "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"] == "too_large"


def test_scope_is_enforced(client, proxy_data):
    r = ask(client, proxy_data.token, secret="db-password")
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


def test_unknown_secret_in_scope(client, proxy_data):
    r = ask(client, proxy_data.token, secret="api-missing")
    assert r.status_code == 404 and r.json()["error"] == "unknown_secret"


def test_another_agents_request_looks_unknown(client, proxy_data):
    rid = ask(client, proxy_data.token).json()["id"]
    decide(proxy_data, rid)
    for path in (f"/v1/requests/{rid}", f"/v1/requests/{rid}/secret"):
        r = client.get(path, headers=auth(proxy_data.other_token))
        assert r.status_code == 404 and r.json()["error"] == "not_found"
    unknown = client.get(f"/v1/requests/{WELL_FORMED_UNKNOWN}", headers=auth(proxy_data.other_token))
    assert unknown.json() == client.get(f"/v1/requests/{rid}", headers=auth(proxy_data.other_token)).json()
    # and the owner can still retrieve it: the other agent's attempt consumed nothing
    assert client.get(f"/v1/requests/{rid}/secret", headers=auth(proxy_data.token)).status_code == 200


def test_wait_returns_as_soon_as_a_decision_lands(client, proxy_data):
    rid = ask(client, proxy_data.token).json()["id"]
    threading.Timer(0.5, decide, args=(proxy_data, rid)).start()
    t0 = time.monotonic()
    r = client.get(f"/v1/requests/{rid}?wait=20", headers=auth(proxy_data.token))
    assert r.json()["status"] == "approved"
    assert time.monotonic() - t0 < 5  # well before the 20 s limit


def test_wait_times_out_while_pending(client, proxy_data):
    rid = ask(client, proxy_data.token).json()["id"]
    t0 = time.monotonic()
    assert client.get(f"/v1/requests/{rid}?wait=1", headers=auth(proxy_data.token)).json()["status"] == "pending"
    assert time.monotonic() - t0 >= 0.9


@pytest.mark.parametrize("wait", ["61", "-1", "abc"])
def test_wait_is_bounded(client, proxy_data, wait):
    rid = ask(client, proxy_data.token).json()["id"]
    r = client.get(f"/v1/requests/{rid}?wait={wait}", headers=auth(proxy_data.token))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_undecided_request_expires(tmp_path):
    proxy = provision(make_settings(tmp_path, pending_timeout_seconds=1))
    with TestClient(create_app(proxy.settings)) as client:
        rid = ask(client, proxy.token).json()["id"]
        time.sleep(1.2)
        assert client.get(f"/v1/requests/{rid}", headers=auth(proxy.token)).json()["status"] == "expired"
        r = client.get(f"/v1/requests/{rid}/secret", headers=auth(proxy.token))
        assert r.status_code == 410 and r.json()["error"] == "expired"
        late = decide(proxy, rid)
        assert not late.changed and late.request.status == "expired"


def test_approved_value_expires_after_its_ttl(client, proxy_data):
    rid = ask(client, proxy_data.token, ttl_seconds=1).json()["id"]
    decide(proxy_data, rid)
    time.sleep(1.2)
    r = client.get(f"/v1/requests/{rid}/secret", headers=auth(proxy_data.token))
    assert r.status_code == 410 and r.json()["error"] == "expired"


def test_rate_limit_answers_429_with_retry_after(tmp_path):
    proxy = provision(make_settings(tmp_path, rate_per_minute=6, rate_burst=3))
    with TestClient(create_app(proxy.settings)) as client:
        codes = [ask(client, proxy.token).status_code for _ in range(4)]
        assert codes == [201, 201, 201, 429]
        r = ask(client, proxy.token)
        assert r.json()["error"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
        # another agent is not affected by alice's flood
        assert ask(client, proxy.other_token, secret="other-key").status_code == 201


def test_pending_cap_per_agent(tmp_path):
    proxy = provision(make_settings(tmp_path, max_pending_per_agent=2, rate_burst=100))
    with TestClient(create_app(proxy.settings)) as client:
        assert [ask(client, proxy.token).status_code for _ in range(3)] == [201, 201, 429]


def test_unknown_route_is_json_404(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_wrong_method_is_json(client):
    r = client.delete("/v1/requests")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_refusals_and_retrievals_are_audited(client, proxy_data):
    ask(client, proxy_data.token, secret="db-password")
    rid = ask(client, proxy_data.token).json()["id"]
    decide(proxy_data, rid)
    client.get(f"/v1/requests/{rid}/secret", headers=auth(proxy_data.token))
    client.get(f"/v1/requests/{rid}/secret", headers=auth(proxy_data.token))
    with Store(proxy_data.settings) as store:
        actions = [(e.actor, e.action, e.detail.get("code")) for e in store.audit_entries()]
    assert ("agent:alice", "request.refused", "forbidden") in actions
    assert ("agent:alice", "request.created", None) in actions
    assert ("operator:test", "request.approved", None) in actions
    assert ("agent:alice", "secret.retrieved", None) in actions
    assert ("agent:alice", "retrieval.refused", "already_retrieved") in actions


def audit_entries(proxy: Proxy) -> list:
    with Store(proxy.settings) as store:
        return store.audit_entries()


def db_bytes(proxy: Proxy) -> int:
    return sum(p.stat().st_size for p in proxy.settings.data_dir.glob("proxy.db*"))


def test_a_lone_surrogate_in_a_reason_is_invalid_not_a_500(client, proxy_data):
    r = client.post(
        "/v1/requests",
        content=b'{"secret": "api-key", "reason": "x \\ud800 y"}',
        headers={**auth(proxy_data.token), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_decided_by_names_a_role_not_a_person(client, proxy_data):
    rid = ask(client, proxy_data.token).json()["id"]
    decide(proxy_data, rid, actor="telegram:123456789")
    status = client.get(f"/v1/requests/{rid}", headers=auth(proxy_data.token)).json()
    assert status["decided_by"] == "approver" and "123456789" not in str(status)


def test_a_flood_of_malformed_ids_costs_no_lookup_and_one_audit_entry(client, proxy_data):
    """The issue's measurement: 300 retrievals of a 6,000-character id grew the database by 6 MB."""
    before = db_bytes(proxy_data)
    huge = "req_" + "A" * 6000
    seen: dict = {}
    for _ in range(300):
        r = client.get(f"/v1/requests/{huge}/secret", headers=auth(proxy_data.token))
        key = (r.status_code, r.json()["error"])
        seen[key] = seen.get(key, 0) + 1
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
    assert set(seen) == {(400, "malformed_id"), (429, "rate_limited")}
    assert 20 <= seen[(400, "malformed_id")] <= 30  # retrieve_burst is 20, refilled at 2/s meanwhile
    mine = [e for e in audit_entries(proxy_data) if e.actor == "agent:alice"]
    assert [(e.action, e.detail) for e in mine] == [
        ("retrieval.refused", {"code": "malformed_id"}),
        ("retrieval.refused", {"code": "rate_limited"}),
    ]
    assert all("AAAAAAAA" not in repr(e) for e in mine)  # the raw path never reaches the database
    assert db_bytes(proxy_data) - before < 100_000


@pytest.mark.parametrize("proxy_settings", [{"poll_burst": 20, "poll_rate_per_minute": 6}])
def test_polls_and_retrievals_have_their_own_budgets(client, proxy_data):
    rid = ask(client, proxy_data.token).json()["id"]
    polls = [client.get(f"/v1/requests/{rid}", headers=auth(proxy_data.token)) for _ in range(25)]
    assert [r.status_code for r in polls].count(200) in (20, 21)
    assert polls[-1].status_code == 429 and polls[-1].json()["error"] == "rate_limited"
    assert int(polls[-1].headers["Retry-After"]) >= 1
    # creating and retrieving are budgeted apart, and another agent is untouched
    assert ask(client, proxy_data.token).status_code == 201
    r = client.get(f"/v1/requests/{rid}/secret", headers=auth(proxy_data.token))
    assert r.status_code == 409 and r.json()["error"] == "pending"
    rid_bob = ask(client, proxy_data.other_token, secret="other-key").json()["id"]
    assert client.get(f"/v1/requests/{rid_bob}", headers=auth(proxy_data.other_token)).status_code == 200


@pytest.mark.parametrize("proxy_settings", [{"poll_burst": 2, "poll_rate_per_minute": 1}])
def test_a_wait_takes_one_token_however_long_it_waits(client, proxy_data):
    rid = ask(client, proxy_data.token).json()["id"]
    threading.Timer(1.2, decide, args=(proxy_data, rid)).start()  # the sweeper looks in meanwhile
    assert client.get(f"/v1/requests/{rid}?wait=10", headers=auth(proxy_data.token)).json()["status"] == "approved"
    assert client.get(f"/v1/requests/{rid}", headers=auth(proxy_data.token)).status_code == 200
    assert client.get(f"/v1/requests/{rid}", headers=auth(proxy_data.token)).status_code == 429


@pytest.mark.parametrize("proxy_settings", [{"refusal_audit_window_seconds": 1.0}])
def test_repeated_refusals_are_audited_as_one_counted_entry_per_window(client, proxy_data):
    for _ in range(50):
        r = ask(client, proxy_data.token, secret="db-password")  # outside alice's scope
        if r.status_code == 429:
            break
        assert r.status_code == 403
    for _ in range(30):
        client.get(f"/v1/requests/{WELL_FORMED_UNKNOWN}/secret", headers=auth(proxy_data.token))
    time.sleep(2.5)  # the window closes; the sweeper writes the counts
    mine = [e for e in audit_entries(proxy_data) if e.actor == "agent:alice" and "refused" in e.action]
    counted: dict = {}
    for e in mine:
        key = (e.action, e.detail["code"])
        counted[key] = counted.get(key, 0) + e.detail.get("repeated", 1)
    assert counted[("request.refused", "forbidden")] in (10, 11)  # the create burst; then rate_limited
    assert counted[("request.refused", "rate_limited")] == 1
    assert counted[("retrieval.refused", "not_found")] + counted[("retrieval.refused", "rate_limited")] == 30
    assert 20 <= counted[("retrieval.refused", "not_found")] <= 23  # the retrieve burst, then 429
    assert len(mine) <= 2 * len(counted)
