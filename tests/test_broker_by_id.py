"""An approved call made by its id alone (`POST /v1/requests/{id}/call` with `{}`): the proxy keeps the call
and its body from the ask, so an approval outlives the agent process that asked. Against a real `proxy serve`
and a real HTTPS destination on 127.0.0.1."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.schema import SCHEMA_VERSION
from proxy.store import Store

from .broker_helpers import Rig
from .proxy_helpers import SECRET_VALUE, make_settings, provision


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(tmp_path_factory.mktemp("broker-by-id"))
    yield r
    assert SECRET_VALUE not in r.stop()


def test_an_approved_call_is_made_by_its_id_with_the_body_asked_and_only_once(rig: Rig) -> None:
    request_id = rig.approved(rig.base + "/v1/releases", body=b'{"tag": "v3"}')
    made = rig.http.post(f"/v1/requests/{request_id}/call", json={})
    assert made.status_code == 200, made.text
    seen = rig.up.requests[-1]
    assert seen.body == b'{"tag": "v3"}' and seen.path == "/v1/releases"
    assert seen.headers["Authorization"] == f"Bearer {SECRET_VALUE}"
    again = rig.http.post(f"/v1/requests/{request_id}/call", json={})
    assert again.status_code == 410 and again.json()["error"] == "already_used"
    with sqlite3.connect(rig.data.settings.db_path) as db:  # the body is not kept once the call is made
        assert db.execute("SELECT body FROM calls WHERE request_id = ?", (request_id,)).fetchone() == (None,)


def test_a_call_asked_by_hash_cannot_be_made_by_id_and_its_approval_stays_unused(rig: Rig) -> None:
    body = b'{"tag": "v4"}'
    request_id = rig.approved(rig.base + "/v1/releases", body=body, by_hash=True)
    by_id = rig.http.post(f"/v1/requests/{request_id}/call", json={})
    assert by_id.status_code == 400 and "body_base64" in by_id.json()["detail"]
    full = {
        "method": "POST",
        "url": rig.base + "/v1/releases",
        "headers": {"Content-Type": "application/json"},
        "body_base64": base64.b64encode(body).decode(),
    }
    assert rig.http.post(f"/v1/requests/{request_id}/call", json=full).status_code == 200


def test_a_pending_call_by_id_says_pending_and_a_narrowed_policy_still_applies(rig: Rig) -> None:
    created = rig.ask(rig.base + "/v1/releases")
    pending = rig.http.post(f"/v1/requests/{created.json()['id']}/call", json={})
    assert pending.status_code == 409 and pending.json()["error"] == "pending"


def test_a_version_3_database_gains_call_bodies_and_its_calls_are_made_as_before(tmp_path: Path) -> None:
    proxy = provision(make_settings(tmp_path))
    db = sqlite3.connect(proxy.settings.db_path)
    db.execute("ALTER TABLE calls DROP COLUMN body")
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with Store(proxy.settings) as store:
        assert store.audit_verify() == []
        agent = store.authenticate(proxy.token)
        req = store.create_request(agent, "api-key", "after the upgrade", 60)
        assert store.call_body(req.id) is None and store.get_call(req.id) is None
    db = sqlite3.connect(proxy.settings.db_path)
    assert "body" in [c[1] for c in db.execute("PRAGMA table_info(calls)")]
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    db.close()
