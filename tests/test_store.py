"""The encrypted store: envelope encryption, key rotation, no plaintext on disk, the audit chain."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pytest

from proxy import crypto
from proxy.approval import DEFAULT, ApprovalRule
from proxy.errors import StoreError
from proxy.key_files import ensure_key_rotation_finished
from proxy.schema import SCHEMA_VERSION
from proxy.store import Store, init_data_dir

from .proxy_helpers import SECRET_VALUE, make_settings, provision


def test_init_creates_a_private_dir_and_key(tmp_path):
    settings = make_settings(tmp_path)
    init_data_dir(settings)
    assert stat.S_IMODE(settings.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(settings.key_path.stat().st_mode) == 0o600
    with pytest.raises(StoreError) as exc:
        init_data_dir(settings)
    assert exc.value.code == "already_initialized"


def test_key_file_is_never_world_readable_even_under_a_loose_umask(tmp_path):
    old = os.umask(0)
    try:
        crypto.write_key_file(tmp_path / "k", crypto.new_master_key())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_a_readable_key_file_is_refused(tmp_path):
    settings = make_settings(tmp_path)
    init_data_dir(settings)
    settings.key_path.chmod(0o644)
    with pytest.raises(crypto.CryptoError, match="readable by group or others"):
        Store(settings)


def test_ciphertext_moved_to_another_row_does_not_decrypt(tmp_path):
    proxy = provision(make_settings(tmp_path))
    db = sqlite3.connect(proxy.settings.db_path)
    wrapped, ct = db.execute("SELECT wrapped_key, ciphertext FROM secrets WHERE name='api-key'").fetchone()
    db.execute("UPDATE secrets SET wrapped_key=?, ciphertext=? WHERE name='other-key'", (wrapped, ct))
    db.commit()
    db.close()
    with Store(proxy.settings) as store:
        agent = store.add_agent("mover", ["other-*"], "operator:test")
        agent_obj = store.authenticate(agent)
        req = store.create_request(agent_obj, "other-key", "r", 60)
        store.decide(req.id, True, "operator:test")
        with pytest.raises(crypto.CryptoError):
            store.retrieve(agent_obj, req.id)


def test_wrong_master_key_is_refused(tmp_path):
    proxy = provision(make_settings(tmp_path))
    with pytest.raises(StoreError) as exc:
        Store(proxy.settings, crypto.new_master_key())
    assert exc.value.code == "wrong_master_key"


def _files_bytes(settings) -> bytes:
    blob = b""
    for path in settings.data_dir.iterdir():
        if path.name != "master.key":
            blob += path.read_bytes()
    return blob


def test_no_secret_value_or_token_in_the_database_or_its_wal(tmp_path):
    proxy = provision(make_settings(tmp_path))
    with Store(proxy.settings) as store:
        agent = store.authenticate(proxy.token)
        req = store.create_request(agent, "api-key", "reason", 60)
        store.decide(req.id, True, "operator:test")
        assert store.retrieve(agent, req.id) == ("api-key", SECRET_VALUE.encode())
        # the WAL still holds the pages while this connection is open
        assert (proxy.settings.data_dir / "proxy.db-wal").exists()
        on_disk = _files_bytes(proxy.settings)
    key_hex = proxy.settings.key_path.read_text().strip()
    for needle in (SECRET_VALUE, proxy.token, proxy.other_token, key_hex, "hunter2"):
        assert needle.encode() not in on_disk
        assert needle.encode("utf-16-le") not in on_disk
    assert bytes.fromhex(key_hex) not in on_disk
    assert b"api-key" in on_disk  # the grep itself works: names are stored in clear


def test_rotation_rewraps_and_values_still_open(tmp_path):
    proxy = provision(make_settings(tmp_path))
    old_key = proxy.settings.key_path.read_text()
    with Store(proxy.settings) as store:
        old_wrapped = (
            store._conn().execute("SELECT wrapped_key, ciphertext FROM secrets WHERE name='api-key'").fetchone()
        )
        store.rotate_master_key("operator:test")
        new_wrapped = (
            store._conn().execute("SELECT wrapped_key, ciphertext FROM secrets WHERE name='api-key'").fetchone()
        )
    assert proxy.settings.key_path.read_text() != old_key
    assert stat.S_IMODE(proxy.settings.key_path.stat().st_mode) == 0o600
    assert new_wrapped[0] != old_wrapped[0] and new_wrapped[1] == old_wrapped[1]  # value untouched
    with Store(proxy.settings) as store:  # reopened from the new key file
        agent = store.authenticate(proxy.token)
        req = store.create_request(agent, "api-key", "after rotation", 60)
        store.decide(req.id, True, "operator:test")
        assert store.retrieve(agent, req.id)[1] == SECRET_VALUE.encode()
        assert store.audit_verify() == []


def test_rotation_interrupted_before_commit_keeps_the_old_key(tmp_path):
    proxy = provision(make_settings(tmp_path))
    pending = proxy.settings.key_path.with_suffix(".key.new")
    crypto.write_key_file(pending, crypto.new_master_key())  # crash: new key written, nothing committed
    ensure_key_rotation_finished(proxy.settings)
    assert not pending.exists()
    with Store(proxy.settings):
        pass


def test_rotation_interrupted_after_commit_finishes_at_next_start(tmp_path):
    proxy = provision(make_settings(tmp_path))
    real_replace = os.replace
    os.replace = lambda *a: (_ for _ in ()).throw(OSError("crash before rename"))  # type: ignore[assignment]
    try:
        with Store(proxy.settings) as store, pytest.raises(OSError):
            store.rotate_master_key("operator:test")
    finally:
        os.replace = real_replace  # type: ignore[assignment]
    with Store(proxy.settings) as store:  # must pick up master.key.new
        assert store.list_secrets()
        agent = store.authenticate(proxy.token)
        req = store.create_request(agent, "api-key", "r", 60)
        store.decide(req.id, True, "operator:test")
        assert store.retrieve(agent, req.id)[1] == SECRET_VALUE.encode()


def test_tokens_are_stored_only_as_hashes(tmp_path):
    proxy = provision(make_settings(tmp_path))
    db = sqlite3.connect(proxy.settings.db_path)
    hashes = [r[0] for r in db.execute("SELECT token_hash FROM agents")]
    db.close()
    assert crypto.hash_token(proxy.token) in hashes
    assert proxy.token not in hashes


def test_revoked_agent_cannot_authenticate(tmp_path):
    proxy = provision(make_settings(tmp_path))
    with Store(proxy.settings) as store:
        assert store.authenticate(proxy.token) is not None
        store.revoke_agent("alice", "operator:test")
        assert store.authenticate(proxy.token) is None


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE audit SET actor = 'operator:someone-else' WHERE seq = 2",
        "UPDATE audit SET detail = '{\"replaced\":true}' WHERE seq = 1",
        "DELETE FROM audit WHERE seq = 2",
        "DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)",
        "UPDATE audit SET seq = 1000 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3;"
        " UPDATE audit SET seq = 3 WHERE seq = 1000",
    ],
)
def test_audit_verify_detects_tampering(tmp_path, tamper):
    proxy = provision(make_settings(tmp_path))
    with Store(proxy.settings) as store:
        assert store.audit_verify() == []
    db = sqlite3.connect(proxy.settings.db_path)
    db.executescript(tamper)
    db.commit()
    db.close()
    with Store(proxy.settings) as store:
        assert store.audit_verify() != []


def test_audit_rows_swapped_in_place_are_detected(tmp_path):
    """Swap the contents of two rows, keeping seq order: a reorder that a seq check alone misses."""
    proxy = provision(make_settings(tmp_path))
    db = sqlite3.connect(proxy.settings.db_path)
    cols = "ts, actor, action, request_id, secret, detail, prev_hash, hash"
    a = db.execute(f"SELECT {cols} FROM audit WHERE seq = 2").fetchone()
    b = db.execute(f"SELECT {cols} FROM audit WHERE seq = 3").fetchone()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    db.execute(f"UPDATE audit SET {sets} WHERE seq = 2", b)
    db.execute(f"UPDATE audit SET {sets} WHERE seq = 3", a)
    db.commit()
    db.close()
    with Store(proxy.settings) as store:
        assert store.audit_verify() != []


def _truncate_and_rewrite_head(db_path, keep: int) -> None:
    """The issue's attack: delete the last entries, then point the head at what is left."""
    db = sqlite3.connect(db_path)
    db.execute("DELETE FROM audit WHERE seq > ?", (keep,))
    last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    if last is None:
        db.execute("DELETE FROM meta WHERE key = 'audit_head'")
    else:
        head = json.loads(db.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()[0])
        head.update(seq=last[0], hash=last[1])  # the old MAC stays: the attacker cannot make a new one
        db.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (json.dumps(head),))
    db.commit()
    db.close()


@pytest.mark.parametrize("keep", [3, 0])
def test_truncating_the_audit_log_and_rewriting_its_head_is_detected(tmp_path, keep):
    proxy = provision(make_settings(tmp_path))
    _truncate_and_rewrite_head(proxy.settings.db_path, keep)
    with Store(proxy.settings) as store:
        problems = store.audit_verify()
    assert problems and ("head" in problems[0])


def test_an_empty_log_with_a_forged_genesis_head_is_detected(tmp_path):
    proxy = provision(make_settings(tmp_path))
    db = sqlite3.connect(proxy.settings.db_path)
    db.execute("DELETE FROM audit")
    db.execute(
        "UPDATE meta SET value = ? WHERE key = 'audit_head'",
        (json.dumps({"seq": 0, "hash": "0" * 64, "mac": "0" * 64}),),
    )
    db.commit()
    db.close()
    with Store(proxy.settings) as store:
        assert store.audit_verify() == ["the recorded head of the log does not match its MAC (rewritten)"]


def test_a_fresh_database_verifies_and_so_does_each_append(tmp_path):
    settings = make_settings(tmp_path)
    init_data_dir(settings)
    with Store(settings) as store:
        assert store.audit_entries() == [] and store.audit_verify() == []
        store.set_secret("k", b"v", "operator:test")
        assert store.audit_verify() == []


def test_a_version_1_database_is_migrated(tmp_path):
    """Schema 1: `agents.revoked_at` and an audit head without a MAC."""
    proxy = provision(make_settings(tmp_path))
    db = sqlite3.connect(proxy.settings.db_path)
    db.execute("ALTER TABLE agents ADD COLUMN revoked_at REAL")
    last_hash = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()[0]
    db.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (last_hash,))
    db.execute("DELETE FROM meta WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with Store(proxy.settings) as store:
        assert store.audit_verify() == []
        assert store.authenticate(proxy.token) is not None
    db = sqlite3.connect(proxy.settings.db_path)
    assert "revoked_at" not in [c[1] for c in db.execute("PRAGMA table_info(agents)")]
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    db.close()


def test_a_truncated_version_1_log_is_not_blessed_by_the_migration(tmp_path):
    proxy = provision(make_settings(tmp_path))
    db = sqlite3.connect(proxy.settings.db_path)
    last_hash = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()[0]
    db.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (last_hash,))
    db.execute("DELETE FROM meta WHERE key = 'schema_version'")
    db.execute("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
    db.commit()
    db.close()
    with Store(proxy.settings) as store:
        assert store.audit_verify() != []


def test_a_running_store_follows_a_rotation_made_by_another(tmp_path):
    proxy = provision(make_settings(tmp_path))
    with Store(proxy.settings) as server:
        agent = server.authenticate(proxy.token)
        req = server.create_request(agent, "api-key", "before rotation", 60)
        server.decide(req.id, True, "operator:test")
        with Store(proxy.settings) as cli:
            cli.rotate_master_key("operator:test")
        assert server.retrieve(agent, req.id)[1] == SECRET_VALUE.encode()
        assert server.audit_verify() == []


def test_a_value_that_does_not_decrypt_is_not_recorded_as_retrieved(tmp_path):
    proxy = provision(make_settings(tmp_path))
    with Store(proxy.settings) as store:
        agent = store.authenticate(proxy.token)
        req = store.create_request(agent, "api-key", "r", 60)
        store.decide(req.id, True, "operator:test")
        store._conn().execute("UPDATE secrets SET ciphertext = ? WHERE name = 'api-key'", (b"\x01" + b"0" * 40,))
        with pytest.raises(crypto.CryptoError):
            store.retrieve(agent, req.id)
        assert store.get_request(req.id).status == "approved"
        assert "secret.retrieved" not in [e.action for e in store.audit_entries()]


def test_key_bytes_stay_inside_crypto():
    key, audit_key = crypto.new_master_key(), crypto.new_audit_key()
    for obj in (key, audit_key):
        assert not hasattr(obj, "raw") and not hasattr(obj, "__dict__")
        assert "_raw" not in repr(obj)
    assert not hasattr(crypto.MasterKey, "derive")


def test_a_proxy_starting_during_a_rotation_waits_for_it_instead_of_deleting_the_new_key(tmp_path):
    """A start in the middle of a rotation used to delete master.key.new before the rotation committed."""
    import threading

    proxy = provision(make_settings(tmp_path))
    pending = proxy.settings.key_path.with_suffix(".key.new")
    with Store(proxy.settings) as rotating:
        starters: list[threading.Thread] = []
        real_rewrap = crypto.rewrap

        def slow_rewrap(*args):  # the rotation, holding the write lock with the new key written
            starting = threading.Thread(target=ensure_key_rotation_finished, args=(proxy.settings,))
            starting.start()
            starting.join(0.5)
            assert starting.is_alive() and pending.exists()  # the starting proxy waits
            starters.append(starting)
            return real_rewrap(*args)

        crypto.rewrap = slow_rewrap  # type: ignore[assignment]
        try:
            new_id = rotating.rotate_master_key("operator:test")
        finally:
            crypto.rewrap = real_rewrap  # type: ignore[assignment]
        for starting in starters:
            starting.join(10)
    assert crypto.read_key_file(proxy.settings.key_path).key_id == new_id and not pending.exists()
    with Store(proxy.settings) as store:
        agent = store.authenticate(proxy.token)
        req = store.create_request(agent, "api-key", "r", 60)
        store.decide(req.id, True, "operator:test")
        assert store.retrieve(agent, req.id)[1] == SECRET_VALUE.encode()


def test_a_version_4_database_gains_approval_rules_and_grants_and_its_requests_need_one_approver(tmp_path):
    """Schema 4: no approval rules, votes or grants (5 added the first two, 6 grants). Secrets and requests
    from before keep today's rule, `approve`, which allows no grant."""
    proxy = provision(make_settings(tmp_path))
    with Store(proxy.settings) as store:
        pending = store.create_request(store.authenticate(proxy.token), "api-key", "before the upgrade", 60)
    db = sqlite3.connect(proxy.settings.db_path)
    db.execute("DROP TABLE votes")
    db.execute("DROP TABLE grants")
    for table, column in (("secrets", "approval"), ("requests", "approval"), ("telegram_messages", "votes_shown")):
        db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with Store(proxy.settings) as store:
        assert store.audit_verify() == []
        assert store.get_approval("api-key") == DEFAULT and store.request_rule(pending.id) == DEFAULT
        decision = store.decide(pending.id, True, "operator:test")
        assert decision.changed and decision.request.status == "approved"
        store.remember_message(pending.id, -100, 7)  # the message table's new column has its default
        assert store.list_grants() == [] and store.get_approval("api-key").max_grant == 0
    db = sqlite3.connect(proxy.settings.db_path)
    assert "approval" in [c[1] for c in db.execute("PRAGMA table_info(requests)")]
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    db.close()


def test_a_version_6_database_moves_broker_only_from_the_use_policy_into_the_approval_rule(tmp_path):
    """Schema 6 kept `broker_only` in the use policy; 7 keeps it in the approval rule. A broker-only secret
    stays broker-only, whatever its rule; a policy that only said so becomes no policy."""
    proxy = provision(make_settings(tmp_path))
    destinations = [{"scheme": "https", "host": "api.example.com", "port": 443, "path_prefix": "/v1/"}]
    injection = {"kind": "header", "name": "Authorization", "template": "Bearer {value}"}
    quorum = '{"kind": "quorum", "needed": 2, "approvers": [], "max_grant": 0}'  # as schema 6 wrote it
    old = {
        "api-key": ({"destinations": destinations, "injection": injection, "broker_only": True}, quorum),
        "other-key": ({"destinations": destinations, "injection": injection, "broker_only": False}, None),
        "db-password": ({"destinations": [], "injection": None, "broker_only": True}, None),
    }
    db = sqlite3.connect(proxy.settings.db_path)
    for name, (policy, rule) in old.items():
        db.execute("UPDATE secrets SET policy = ?, approval = ? WHERE name = ?", (json.dumps(policy), rule, name))
    db.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with Store(proxy.settings) as store:
        assert store.audit_verify() == []
        assert store.get_approval("api-key") == ApprovalRule("quorum", 2, broker_only=True)
        assert store.get_policy("api-key") is not None and store.get_policy("api-key").destinations
        assert store.get_approval("other-key") == DEFAULT and store.get_policy("other-key") is not None
        assert store.get_approval("db-password").broker_only and store.get_policy("db-password") is None
        with pytest.raises(StoreError) as refused:
            store.create_request(store.authenticate(proxy.token), "api-key", "after the upgrade", 60)
        assert refused.value.code == "broker_only"
        other = store.create_request(store.authenticate(proxy.other_token), "other-key", "still retrievable", 60)
        assert other.status == "pending"
    db = sqlite3.connect(proxy.settings.db_path)
    assert all("broker_only" not in (p or "") for (p,) in db.execute("SELECT policy FROM secrets"))
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    db.close()
