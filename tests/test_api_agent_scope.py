"""What an agent may see of its own scope and requests, and how it withdraws one: `GET /v1/secrets`,
`GET /v1/requests`, `POST /v1/requests/{id}/cancel`, in process and over uvicorn (the `client` fixture)."""

from __future__ import annotations

import json

from proxy.policy import build_policy
from proxy.store import Store

from .proxy_helpers import SECRET_VALUE, Proxy, cli


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def ask(client, token: str, secret: str = "api-key") -> str:
    r = client.post("/v1/requests", json={"secret": secret, "reason": "deploy"}, headers=auth(token))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_the_secrets_list_shows_the_agents_scope_and_how_each_may_be_used_never_a_value(client, proxy_data: Proxy):
    template = "Authorization: Bearer fixed-prefix-{value}"
    with Store(proxy_data.settings) as store:
        policy = build_policy(["https://api.example.com/v1/"], [], template)
        store.set_secret("api-broker", SECRET_VALUE.encode(), "operator:test", policy, broker_only=True)
    r = client.get("/v1/secrets", headers=auth(proxy_data.token))
    assert r.status_code == 200
    listed = {s["name"]: s for s in r.json()["secrets"]}
    assert set(listed) == {"api-key", "api-broker"}  # alice's scope is api-*: not other-key, not db-password
    assert listed["api-key"] == {"name": "api-key", "retrieve": True, "call": False, "destinations": [], "inject": None}
    broker = listed["api-broker"]
    assert broker["retrieve"] is False and broker["call"] is True
    assert broker["destinations"] == ["https://api.example.com:443/v1/"]
    assert broker["inject"] == {"kind": "header", "name": "Authorization"}
    assert SECRET_VALUE not in r.text and "fixed-prefix" not in r.text  # neither the value nor the template

    bob = client.get("/v1/secrets", headers=auth(proxy_data.other_token)).json()["secrets"]
    assert [s["name"] for s in bob] == ["other-key"]
    assert client.get("/v1/secrets").status_code == 401


def test_the_requests_list_holds_the_agents_own_requests_only(client, proxy_data: Proxy):
    mine = [ask(client, proxy_data.token) for _ in range(3)]
    theirs = ask(client, proxy_data.other_token, "other-key")
    with Store(proxy_data.settings) as store:
        store.decide(mine[0], False, "operator:test")
    listed = client.get("/v1/requests", headers=auth(proxy_data.token)).json()["requests"]
    assert [r["id"] for r in listed] == mine[::-1]  # newest first
    assert theirs not in json.dumps(listed)
    pending = client.get("/v1/requests?status=pending&limit=1", headers=auth(proxy_data.token)).json()["requests"]
    assert [r["id"] for r in pending] == [mine[2]]
    bad = client.get("/v1/requests?status=everything", headers=auth(proxy_data.token))
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"


def test_a_cancelled_request_is_audited_and_a_later_approval_changes_nothing(client, proxy_data: Proxy):
    request_id = ask(client, proxy_data.token)
    r = client.post(f"/v1/requests/{request_id}/cancel", headers=auth(proxy_data.token))
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["cancelled"] is True
    assert r.json()["decided_by"] == "agent"

    approve = cli(proxy_data.settings.data_dir, "approve", request_id)  # the human taps too late
    assert approve.returncode != 0 and b"already cancelled" in approve.stderr
    status = client.get(f"/v1/requests/{request_id}", headers=auth(proxy_data.token)).json()
    assert status["status"] == "cancelled"
    retrieved = client.get(f"/v1/requests/{request_id}/secret", headers=auth(proxy_data.token))
    assert retrieved.status_code == 410 and "cancelled" in retrieved.json()["detail"]

    again = client.post(f"/v1/requests/{request_id}/cancel", headers=auth(proxy_data.token)).json()
    assert again["cancelled"] is False and again["status"] == "cancelled"
    with Store(proxy_data.settings) as store:
        actions = [(e.action, e.actor) for e in store.audit_entries() if e.request_id == request_id]
        assert ("request.cancelled", "agent:alice") in actions
        assert actions.count(("request.cancelled", "agent:alice")) == 1
        assert store.audit_verify() == []


def test_an_agent_cannot_cancel_another_agents_request_nor_a_decided_one(client, proxy_data: Proxy):
    theirs = ask(client, proxy_data.other_token, "other-key")
    r = client.post(f"/v1/requests/{theirs}/cancel", headers=auth(proxy_data.token))
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    decided = ask(client, proxy_data.token)
    with Store(proxy_data.settings) as store:
        store.decide(decided, True, "operator:test")
        assert store.get_request(theirs).status == "pending"
    kept = client.post(f"/v1/requests/{decided}/cancel", headers=auth(proxy_data.token)).json()
    assert kept["cancelled"] is False and kept["status"] == "approved"
    value = client.get(f"/v1/requests/{decided}/secret", headers=auth(proxy_data.token)).json()
    assert value["value"] == SECRET_VALUE
