"""The operator CLI: exit codes, one-line errors, values only from stdin and never printed."""

from __future__ import annotations

import sqlite3

from .proxy_helpers import SECRET_VALUE, cli, make_settings, provision


def test_init_refuses_to_overwrite_a_key(tmp_path):
    data = tmp_path / "d"
    assert cli(data, "init").returncode == 0
    again = cli(data, "init")
    assert again.returncode != 0
    assert "refusing to overwrite" in again.stderr.decode()
    assert len(again.stderr.decode().strip().splitlines()) == 1


def test_secrets_come_from_stdin_and_list_shows_names_only(tmp_path):
    data = tmp_path / "d"
    cli(data, "init")
    out = cli(data, "secrets", "set", "gh-token", stdin=b"ghp_supersecret\n")
    assert out.returncode == 0 and b"ghp_supersecret" not in out.stdout + out.stderr
    listed = cli(data, "secrets", "list")
    assert listed.stdout.decode().startswith("gh-token\t")
    assert b"ghp_supersecret" not in listed.stdout
    assert cli(data, "secrets", "delete", "gh-token").returncode == 0
    missing = cli(data, "secrets", "delete", "gh-token")
    assert missing.returncode != 0 and b"unknown_secret" in missing.stderr


def test_bad_secret_name_is_refused(tmp_path):
    data = tmp_path / "d"
    cli(data, "init")
    r = cli(data, "secrets", "set", "../etc/passwd", stdin=b"x")
    assert r.returncode != 0 and b"invalid_request" in r.stderr


def test_agents_add_prints_the_token_once_and_it_works(tmp_path):
    data = tmp_path / "d"
    cli(data, "init")
    token = cli(data, "agents", "add", "ci-bot", "--secrets", "ci-*,deploy-*").stdout.decode().strip()
    assert token.startswith("spx_") and len(token) > 40
    listed = cli(data, "agents", "list").stdout.decode()
    assert "ci-bot\tci-*,deploy-*" in listed and token not in listed
    dup = cli(data, "agents", "add", "ci-bot", "--secrets", "x")
    assert dup.returncode != 0 and b"agent_exists" in dup.stderr
    assert cli(data, "agents", "revoke", "ci-bot").returncode == 0
    assert cli(data, "agents", "revoke", "ci-bot").returncode != 0


def test_approve_deny_and_finality(tmp_path):
    proxy = provision(make_settings(tmp_path))
    from proxy.store import Store

    with Store(proxy.settings) as store:
        agent = store.authenticate(proxy.token)
        first = store.create_request(agent, "api-key", "one", 60)
        second = store.create_request(agent, "api-key", "two", 60)
    data = proxy.settings.data_dir
    pending = cli(data, "requests", "list", "--status", "pending").stdout.decode()
    assert first.id in pending and second.id in pending
    assert cli(data, "approve", first.id).returncode == 0
    assert cli(data, "deny", second.id).returncode == 0
    final = cli(data, "approve", second.id)
    assert final.returncode != 0 and "already denied" in final.stderr.decode()
    unknown = cli(data, "approve", "req_nope")
    assert unknown.returncode != 0 and b"not_found" in unknown.stderr
    shown = cli(data, "audit", "show").stdout.decode()
    assert "request.approved" in shown and "request.denied" in shown and "decision.refused" in shown
    assert SECRET_VALUE not in shown


def test_audit_verify_exit_code_tracks_tampering(tmp_path):
    proxy = provision(make_settings(tmp_path))
    data = proxy.settings.data_dir
    ok = cli(data, "audit", "verify")
    assert ok.returncode == 0 and b"intact" in ok.stdout
    db = sqlite3.connect(proxy.settings.db_path)
    db.execute("UPDATE audit SET actor = 'agent:alice' WHERE seq = 1")
    db.commit()
    db.close()
    bad = cli(data, "audit", "verify")
    assert bad.returncode != 0 and b"NOT intact" in bad.stderr and b"edited" in bad.stderr


def test_rotate_master_key_keeps_secrets_usable(tmp_path):
    proxy = provision(make_settings(tmp_path))
    data = proxy.settings.data_dir
    before = proxy.settings.key_path.read_bytes()
    r = cli(data, "rotate-master-key")
    assert r.returncode == 0 and before not in r.stdout
    assert proxy.settings.key_path.read_bytes() != before
    assert cli(data, "audit", "verify").returncode == 0
    assert b"api-key" in cli(data, "secrets", "list").stdout


def test_missing_data_dir_is_a_clear_one_line_error(tmp_path):
    r = cli(tmp_path / "none", "secrets", "list")
    assert r.returncode != 0
    assert b"run `python -m proxy init` first" in r.stderr


def test_demo_runs_end_to_end():
    import subprocess
    import sys

    from .proxy_helpers import ROOT

    r = subprocess.run([sys.executable, "-m", "proxy", "demo"], cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert b"demo passed" in r.stdout


def test_audit_verify_detects_a_truncated_log_with_a_rewritten_head(tmp_path):
    """Delete the last entries with sqlite3 and set the head to the new last hash: the issue's attack."""
    import json

    proxy = provision(make_settings(tmp_path))
    data = proxy.settings.data_dir
    db = sqlite3.connect(proxy.settings.db_path)
    db.execute("DELETE FROM audit WHERE seq > 2")
    seq, digest = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    head = json.loads(db.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()[0])
    db.execute(
        "UPDATE meta SET value = ? WHERE key = 'audit_head'", (json.dumps({**head, "seq": seq, "hash": digest}),)
    )
    db.commit()
    db.close()
    bad = cli(data, "audit", "verify")
    assert bad.returncode != 0 and b"NOT intact" in bad.stderr and b"head" in bad.stderr

    db = sqlite3.connect(proxy.settings.db_path)  # and all of them, head included
    db.execute("DELETE FROM audit")
    db.execute("DELETE FROM meta WHERE key = 'audit_head'")
    db.commit()
    db.close()
    gone = cli(data, "audit", "verify")
    assert gone.returncode != 0 and b"head of the log is missing" in gone.stderr
