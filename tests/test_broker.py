"""Brokered calls, end to end: a real `proxy serve` (uvicorn on loopback) makes calls to real HTTPS
servers on 127.0.0.1 whose certificates a test CA signed. The agent speaks HTTP; approvals come from
the CLI in another process. Every test checks what the destination saw, not only what the proxy said."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator

import httpx
import pytest

from proxy import redact
from proxy.policy import build_policy
from proxy.schema import SCHEMA_VERSION
from proxy.store import Store

from .broker_helpers import Rig, answer_body
from .broker_upstream import Upstream, make_ca
from .proxy_helpers import SECRET_VALUE, cli, make_settings, provision, start_server


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(tmp_path_factory.mktemp("broker"))
    yield r
    logs = r.stop()
    assert SECRET_VALUE not in logs
    assert base64.b64encode(SECRET_VALUE.encode()).decode() not in logs


def test_a_call_approved_with_the_cli_reaches_the_destination_with_the_value_the_agent_never_sees(rig):
    url = rig.base + "/v1/releases"
    created = rig.ask(url, body=b'{"tag": "v1"}')
    assert created.status_code == 201 and created.json()["status"] == "pending"
    rid = created.json()["id"]
    assert (
        rig.http.post(
            f"/v1/requests/{rid}/call",
            json={
                "method": "POST",
                "url": url,
                "headers": {"Content-Type": "application/json"},
                "body_base64": base64.b64encode(b'{"tag": "v1"}').decode(),
            },
        ).json()["error"]
        == "pending"
    )
    listed = cli(rig.data.settings.data_dir, "requests", "list", "--status", "pending").stdout.decode()
    assert rid in listed and f"call POST {url}" in listed
    approved = cli(rig.data.settings.data_dir, "approve", rid)
    shown = approved.stdout.decode()
    assert approved.returncode == 0 and f"call POST {url}" in shown
    assert "header Content-Type: application/json" in shown and "header Authorization: Bearer ••••••" in shown
    before = len(rig.up.requests)
    made = rig.make(rid, url, body=b'{"tag": "v1"}')
    assert made.status_code == 200, made.text
    assert made.json()["status"] == 200
    seen = rig.up.requests[before]
    assert seen.method == "POST" and seen.path == "/v1/releases" and seen.body == b'{"tag": "v1"}'
    assert seen.headers["Authorization"] == f"Bearer {SECRET_VALUE}"
    assert SECRET_VALUE not in made.text and json.loads(answer_body(made))["path"] == "/v1/releases"
    assert rig.http.get(f"/v1/requests/{rid}").json()["status"] == "used"
    done = [e for e in rig.audit() if e.request_id == rid and e.action == "call.completed"]
    assert len(done) == 1 and done[0].detail["status"] == 200 and done[0].detail["host"] == "localhost"
    assert done[0].detail["request_sha256"] == hashlib.sha256(b'{"tag": "v1"}').hexdigest()
    assert SECRET_VALUE not in json.dumps([e.detail for e in rig.audit()])


def test_the_approved_call_runs_once_and_replay_is_refused(rig):
    url = rig.base + "/v1/once"
    rid = rig.approved(url)
    assert rig.make(rid, url).status_code == 200
    count = len(rig.up.requests)
    again = rig.make(rid, url)
    assert again.status_code == 410 and again.json()["error"] == "already_used"
    assert len(rig.up.requests) == count


@pytest.mark.parametrize("change", ["body", "path", "method", "header"])
def test_an_altered_call_is_refused_and_the_destination_sees_nothing(rig, change):
    url = rig.base + "/v1/items"
    rid = rig.approved(url, body=b"approved body")
    altered = {
        "body": dict(url=url, body=b"other body"),
        "path": dict(url=rig.base + "/v1/admin", body=b"approved body"),
        "method": dict(url=url, method="PUT", body=b"approved body"),
        "header": dict(url=url, body=b"approved body", headers={"Content-Type": "text/evil"}),
    }[change]
    count = rig.up.connections
    refused = rig.make(rid, **altered)  # type: ignore[arg-type]
    assert refused.status_code == 403 and refused.json()["error"] == "call_mismatch"
    assert rig.up.connections == count
    assert [e for e in rig.audit() if e.request_id == rid and e.action == "call.refused"]
    # The approval is still there for the call that was approved.
    assert rig.make(rid, url, body=b"approved body").status_code == 200


def test_a_body_given_by_hash_must_be_that_body(rig):
    url = rig.base + "/v1/upload"
    rid = rig.approved(url, body=b"the real payload", by_hash=True)
    assert rig.make(rid, url, body=b"the fake payload").json()["error"] == "call_mismatch"
    assert rig.make(rid, url, body=b"the real payload").json()["status"] == 200


def test_an_unlisted_host_or_path_is_refused_before_anyone_is_asked_or_connected(rig):
    for url in (
        f"https://localhost:{rig.other.port}/v1/x",
        rig.base + "/v2/x",
        rig.base + "/v1/../admin",
        f"https://127.0.0.1:{rig.up.port}/v1/x",
        f"http://localhost:{rig.up.port}/v1/x",
    ):
        refused = rig.ask(url)
        assert refused.status_code in (400, 403), url
        assert refused.json()["error"] in ("destination_not_allowed", "invalid_request"), url
    assert rig.other.connections == 0


def test_a_listed_name_resolving_to_loopback_is_refused_unless_private_addresses_are_allowed(rig):
    url = rig.base + "/v1/x"
    rid = rig.approved(url, secret="api-loopback")
    count = rig.up.connections
    refused = rig.make(rid, url)
    assert refused.status_code == 403 and refused.json()["error"] == "address_not_allowed"
    assert "127.0.0.1" in refused.json()["detail"]
    assert rig.up.connections == count
    assert [e for e in rig.audit() if e.request_id == rid and e.action == "call.failed"][0].detail[
        "code"
    ] == "address_not_allowed"


def test_a_redirect_to_another_host_is_returned_not_followed(rig):
    url = rig.base + "/v1/redirect"
    rid = rig.approved(url, method="GET", body=b"")
    made = rig.make(rid, url, method="GET", body=b"")
    assert made.status_code == 200 and made.json()["status"] == 302
    assert ["Location", rig.up.redirect_to] in made.json()["headers"]
    assert rig.other.connections == 0


@pytest.mark.parametrize("secret", ["api-call", "api-query", "api-basic"])
def test_the_value_is_redacted_raw_base64_and_url_encoded_from_the_answer(rig, secret):
    url = rig.base + "/v1/leak"
    rid = rig.approved(url, secret=secret, method="GET", body=b"")
    made = rig.make(rid, url, method="GET", body=b"")
    text = answer_body(made)
    # The body held the value three ways: it is withheld whole (its places would be an oracle).
    assert text == redact.WITHHELD and made.json()["redactions"] >= 4
    for spelling in (SECRET_VALUE, base64.b64encode(SECRET_VALUE.encode()).decode()):
        assert spelling not in made.text
    assert ["X-Echo", "[REDACTED]"] in made.json()["headers"]
    seen = rig.up.requests[-1]
    if secret == "api-query":
        assert f"key={SECRET_VALUE}" in seen.path
    if secret == "api-basic":
        assert seen.headers["Authorization"] == "Basic " + base64.b64encode(f"bot:{SECRET_VALUE}".encode()).decode()


def test_the_answer_and_the_time_are_bounded(rig):
    big = rig.base + "/v1/big"
    rid = rig.approved(big, method="GET", body=b"")
    refused = rig.make(rid, big, method="GET", body=b"")
    assert refused.status_code == 502 and refused.json()["error"] == "response_too_large"
    slow = rig.base + "/v1/slow"
    rid = rig.approved(slow, method="GET", body=b"")
    refused = rig.make(rid, slow, method="GET", body=b"")
    assert refused.status_code == 504 and refused.json()["error"] == "upstream_timeout"
    too_big = rig.ask(rig.base + "/v1/x", body=b"x" * 60_000)
    assert too_big.status_code == 413 and too_big.json()["error"] == "too_large"


def test_a_broker_only_secret_cannot_be_retrieved(rig):
    asked = rig.http.post("/v1/requests", json={"secret": "api-call", "reason": "read it"})
    assert asked.status_code == 403 and asked.json()["error"] == "broker_only"
    # Nor can an approved call request be turned into a retrieval, for any secret.
    rid = rig.approved(rig.base + "/v1/x", secret="api-query")
    got = rig.http.get(f"/v1/requests/{rid}/secret")
    assert got.status_code == 403 and got.json()["error"] == "broker_only"
    assert SECRET_VALUE not in got.text


def test_a_secret_without_a_policy_cannot_be_used_in_a_call(rig):
    refused = rig.ask(rig.base + "/v1/x", secret="api-key")
    assert refused.status_code == 403 and refused.json()["error"] == "no_policy"


def test_the_agent_may_not_set_the_injected_header_or_framing(rig):
    for headers in (
        {"Authorization": "Bearer mine"},
        {"Host": "evil"},
        {"X-A": "b\r\nX-Injected: 1"},
        {"Accept-Encoding": "gzip"},
    ):
        refused = rig.ask(rig.base + "/v1/x", headers=headers)
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_request", headers


def test_tls_is_verified(tmp_path):
    """A destination whose certificate no trusted CA signed is refused (the proxy trusts the system CAs only)."""
    ca = make_ca(tmp_path / "ca")
    up = Upstream(ca).start()
    data = provision(make_settings(tmp_path))
    with Store(data.settings) as store:
        store.set_secret(
            "api-tls",
            b"value-123456",
            "operator:test",
            build_policy([], [f"https://localhost:{up.port}/"], "X-Key: {value}"),
        )
    server = start_server(data.settings)
    try:
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {data.token}"}, timeout=30)
        url = f"https://localhost:{up.port}/x"
        created = http.post("/v1/calls", json={"secret": "api-tls", "reason": "r", "method": "GET", "url": url})
        with Store(data.settings) as store:
            store.decide(created.json()["id"], True, "operator:test")
        made = http.post(f"/v1/requests/{created.json()['id']}/call", json={"method": "GET", "url": url})
        assert made.status_code == 502 and made.json()["error"] == "tls_failed"
        assert up.requests == []
    finally:
        server.stop()
        up.stop()


def test_secrets_set_stores_a_policy_and_show_prints_it_never_the_value(tmp_path):
    data = tmp_path / "d"
    cli(data, "init")
    stored = cli(
        data,
        "secrets",
        "set",
        "gh",
        "--allow",
        "https://api.github.com/repos/",
        "--inject",
        "Authorization: Bearer {value}",
        "--broker-only",
        stdin=b"ghp_value123\n",
    )
    assert stored.returncode == 0, stored.stderr
    shown = cli(data, "secrets", "show", "gh")
    out = shown.stdout.decode()
    assert shown.returncode == 0 and "allow https://api.github.com:443/repos/" in out
    assert "Authorization: Bearer {value}" in out and "broker-only" in out and "ghp_value123" not in out
    bad = cli(data, "secrets", "set", "gh", "--allow", "https://api.github.com/", stdin=b"x")
    assert bad.returncode != 0 and "--inject" in bad.stderr.decode()
    plain = cli(data, "secrets", "set", "plain", stdin=b"v")
    assert plain.returncode == 0
    assert "no use policy" in cli(data, "secrets", "show", "plain").stdout.decode()


def test_a_version_2_database_gains_policies_and_its_secrets_stay_retrieve_only(tmp_path):
    import sqlite3

    proxy = provision(make_settings(tmp_path))
    db = sqlite3.connect(proxy.settings.db_path)
    db.execute("ALTER TABLE secrets DROP COLUMN policy")
    db.execute("DROP TABLE calls")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with Store(proxy.settings) as store:
        assert store.get_policy("api-key") is None and store.audit_verify() == []
        agent = store.authenticate(proxy.token)
        req = store.create_request(agent, "api-key", "after the upgrade", 60)
        store.decide(req.id, True, "operator:test")
        assert store.retrieve(agent, req.id) == ("api-key", SECRET_VALUE.encode())
        assert store.get_call(req.id) is None
    db = sqlite3.connect(proxy.settings.db_path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    db.close()


def test_a_retrieval_request_cannot_be_made_into_a_call(rig):
    asked = rig.http.post("/v1/requests", json={"secret": "api-query", "reason": "read it"})
    rid = asked.json()["id"]
    with Store(rig.data.settings) as store:
        store.decide(rid, True, "operator:test")
    count = rig.up.connections
    refused = rig.make(rid, rig.base + "/v1/x")
    assert refused.status_code == 404 and refused.json()["error"] == "not_found"
    assert rig.up.connections == count


def test_concurrent_attempts_at_one_approved_call_make_it_once(rig):
    from concurrent.futures import ThreadPoolExecutor

    url = rig.base + "/v1/race"
    rid = rig.approved(url)
    before = len([r for r in rig.up.requests if r.path == "/v1/race"])

    def attempt(_: int) -> int:
        with httpx.Client(
            base_url=rig.server.url, timeout=30, headers={"Authorization": f"Bearer {rig.data.token}"}
        ) as http:
            return http.post(
                f"/v1/requests/{rid}/call",
                json={
                    "method": "POST",
                    "url": url,
                    "headers": {"Content-Type": "application/json"},
                    "body_base64": base64.b64encode(b"{}").decode(),
                },
            ).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(attempt, range(8)))
    # One is made; the others find it used (410), or find the agent's call slots full (429,
    # broker_max_calls_per_agent) before anything is claimed.
    assert codes.count(200) == 1 and set(codes) <= {200, 410, 429}, codes
    assert len([r for r in rig.up.requests if r.path == "/v1/race"]) == before + 1


def test_requests_list_json_names_the_call(rig):
    url = rig.base + "/v1/listed"
    created = rig.ask(url)
    listed = json.loads(cli(rig.data.settings.data_dir, "requests", "list", "--json").stdout)
    mine = [r for r in listed if r["id"] == created.json()["id"]][0]
    assert mine["call"]["url"] == url and mine["call"]["method"] == "POST"
    assert SECRET_VALUE not in json.dumps(listed)


def test_secrets_destinations_lists_every_policys_scheme_host_and_port_as_json(rig):
    """What the host's `takeover egress sync` reads from the VM: no values, no paths."""
    out = cli(rig.data.settings.data_dir, "secrets", "destinations")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [
        {"url": rig.base, "secrets": ["api-basic", "api-call", "api-loopback", "api-query"]}
    ]
    assert SECRET_VALUE.encode() not in out.stdout
