"""The guest's side of backups: `secret-proxy backup` makes a consistent archive, `restore stage` takes only a
whole and verified one, and `restore apply-staged` swaps it in so that a crash anywhere leaves old or new."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import threading
import time

import pytest

from proxy import backup, restore
from proxy.backup import DB_NAME, KEY_NAME, BackupError
from proxy.crypto import read_key_file
from proxy.store import Store, init_data_dir
from vm_image import guest_files

from .proxy_helpers import SECRET_VALUE, cli, make_settings, provision


@pytest.fixture
def source(tmp_path):
    """A provisioned store (three secrets, agents alice and bob) to back up."""
    return provision(make_settings(tmp_path / "source"))


@pytest.fixture
def target(tmp_path):
    """A fresh VM's data directory: initialised, with a master key of its own and nothing else."""
    settings = make_settings(tmp_path / "target")
    init_data_dir(settings)
    return settings


def rebuilt(archive: bytes, db: bytes) -> bytes:
    """`archive` with its database replaced by `db` and the manifest made to match: only the deeper checks see it."""
    parsed = backup.read_archive(archive)
    files = {DB_NAME: db, KEY_NAME: parsed.files[KEY_NAME]}
    manifest = {
        "format": backup.FORMAT,
        "created": parsed.created,
        "counts": parsed.counts.__dict__,
        "files": [{"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()],
    }
    head = json.dumps(manifest).encode()
    return backup.MAGIC + len(head).to_bytes(4, "big") + head + b"".join(files.values())


def edited(db: bytes, sql: str) -> bytes:
    conn = sqlite3.connect(":memory:")
    conn.deserialize(db)
    conn.execute(sql)
    conn.commit()
    return conn.serialize()


def assert_nothing_staged(settings) -> None:
    leftovers = [p.name for p in settings.data_dir.iterdir() if p.name.startswith("restore")]
    assert leftovers == [], leftovers


def test_a_backup_restores_secrets_tokens_and_audit_into_a_fresh_data_dir(source, target):
    archive = backup.make_archive(source.settings)
    staged = restore.stage(target, archive)
    assert staged["counts"] == {"secrets": 3, "agents": 2, "audit_entries": 5}
    fresh_key = read_key_file(target.key_path)
    applied = restore.apply_staged(target)
    assert applied["result"] == "applied" and applied["counts"] == staged["counts"]
    assert read_key_file(target.key_path) == read_key_file(source.settings.key_path)
    with Store(target) as store:
        assert store.audit_verify() == []
        assert store.authenticate(source.token).name == "alice"
        assert [name for name, _ in store.list_secrets()] == ["api-key", "db-password", "other-key"]
        req = store.create_request(store.authenticate(source.token), "api-key", "restored?", 60)
        store.decide(req.id, True, "operator:test")
        assert store.retrieve(store.authenticate(source.token), req.id)[1] == SECRET_VALUE.encode()
    # The fresh VM's own files are kept aside, and the state says what happened.
    assert read_key_file(target.data_dir / restore.PRE_RESTORE / KEY_NAME) == fresh_key
    shown = restore.state(target)
    assert shown["staged"] is False and shown["last"]["result"] == "applied"
    assert not (target.data_dir / restore.STAGED).exists() and not (target.data_dir / restore.OLD).exists()


def test_a_backup_taken_while_the_proxy_writes_is_one_committed_state(source):
    stop, writing = threading.Event(), threading.Event()

    def write() -> None:
        with Store(source.settings) as store:
            while not stop.is_set():
                store.record("operator:test", "test.busy")
                writing.set()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert writing.wait(10)
        archives = []
        for _ in range(5):
            archives.append(backup.make_archive(source.settings))
            time.sleep(0.02)
    finally:
        stop.set()
        writer.join()
    seen = [restore.check(a).counts.audit_entries for a in archives]
    assert seen == sorted(seen) and seen[-1] > 5  # each copy verified whole, taken while the log grew


def test_the_archive_and_the_staged_copy_are_private(source, target):
    restore.stage(target, backup.make_archive(source.settings))
    staged = target.data_dir / restore.STAGED
    assert stat.S_IMODE(staged.stat().st_mode) == 0o700
    for path in staged.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize("where", ["magic", "manifest", "database", "key", "last byte"])
def test_a_corrupted_archive_is_refused_and_nothing_is_staged(source, target, where):
    archive = bytearray(backup.make_archive(source.settings))
    head = len(backup.MAGIC) + 4 + int.from_bytes(archive[len(backup.MAGIC) : len(backup.MAGIC) + 4], "big")
    at = {"magic": 0, "manifest": len(backup.MAGIC) + 10, "database": head + 5000, "key": len(archive) - 10}
    archive[at.get(where, len(archive) - 1)] ^= 0x01
    with pytest.raises(BackupError):
        restore.stage(target, bytes(archive))
    assert_nothing_staged(target)


@pytest.mark.parametrize("keep", [0, 7, 100, 5000, -1])
def test_a_truncated_archive_is_refused_with_what_is_missing(source, target, keep):
    archive = backup.make_archive(source.settings)
    with pytest.raises(BackupError, match="truncated|wrong magic|not a secret-proxy"):
        restore.stage(target, archive[:keep])
    assert_nothing_staged(target)


def test_trailing_bytes_and_an_oversized_archive_are_refused(source, target):
    archive = backup.make_archive(source.settings)
    with pytest.raises(BackupError, match="after its last file"):
        restore.stage(target, archive + b"x")

    class Endless:
        def read(self, n: int) -> bytes:
            return b"\0" * n

    with pytest.raises(BackupError, match="over 1000 bytes"):
        restore.read_bounded(Endless(), 1000)
    assert_nothing_staged(target)


def test_a_copy_that_fails_the_integrity_check_is_refused(source, target):
    archive = backup.make_archive(source.settings)
    db = bytearray(backup.read_archive(archive).files[DB_NAME])
    db[4096 : 4096 + 12] = b"\xff" * 12  # the second page's b-tree header, with the SHA-256 made to match
    with pytest.raises(BackupError, match="integrity check|does not open"):
        restore.stage(target, rebuilt(archive, bytes(db)))
    assert_nothing_staged(target)


def test_a_copy_with_an_edited_audit_log_is_refused(source, target):
    archive = backup.make_archive(source.settings)
    db = backup.read_archive(archive).files[DB_NAME]
    forged = edited(db, "UPDATE audit SET actor = 'operator:someone-else' WHERE seq = 2")
    with pytest.raises(BackupError, match="audit chain is NOT intact"):
        restore.stage(target, rebuilt(archive, forged))
    assert_nothing_staged(target)


def test_a_key_that_does_not_seal_the_copy_is_refused(source, target, tmp_path):
    archive = backup.make_archive(source.settings)
    other = provision(make_settings(tmp_path / "other"))
    wrong = backup.make_archive(other.settings)
    mixed = bytearray(archive)
    key_at = len(archive) - len(backup.read_archive(archive).files[KEY_NAME])
    mixed[key_at:] = backup.read_archive(wrong).files[KEY_NAME]
    parsed = backup.read_archive(archive)
    swapped = rebuilt(archive, parsed.files[DB_NAME]).replace(parsed.files[KEY_NAME], bytes(mixed[key_at:]))
    with pytest.raises(BackupError):
        restore.stage(target, swapped)
    assert_nothing_staged(target)


def test_a_staged_copy_that_no_longer_checks_out_is_not_applied(source, target):
    restore.stage(target, backup.make_archive(source.settings))
    with open(target.data_dir / restore.STAGED / DB_NAME, "r+b") as f:  # the disk rotted after staging
        f.seek(4096)
        f.write(b"\xff" * 12)
    before = read_key_file(target.key_path)
    result = restore.apply_staged(target)
    assert result["result"] == "rejected"
    assert read_key_file(target.key_path) == before
    with Store(target) as store:
        assert store.audit_verify() == [] and store.list_secrets() == []
    assert restore.state(target)["last"]["result"] == "rejected"
    assert [p.name for p in target.data_dir.iterdir() if p.name.startswith("restore.")] == [restore.LAST]


POINTS = ["old kept", "stale removed", f"{DB_NAME} replaced", f"{KEY_NAME} replaced", "recorded", "committed"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("point", POINTS)
def test_apply_staged_finishes_a_swap_that_a_crash_interrupted(source, target, point):
    with Store(target) as store:  # the fresh VM served a while: its log is in the -wal
        store.record("operator:test", "test.before-restore")
    fresh_key = read_key_file(target.key_path)
    restore.stage(target, backup.make_archive(source.settings))

    def crash(at: str) -> None:
        if at == point:
            raise Crash(at)

    with pytest.raises(Crash):
        restore.apply_staged(target, fault=crash)
    restore.apply_staged(target)  # the next start
    assert read_key_file(target.key_path) == read_key_file(source.settings.key_path)
    with Store(target) as store:
        assert store.audit_verify() == [] and store.authenticate(source.token) is not None
    old = target.data_dir / restore.PRE_RESTORE
    assert read_key_file(old / KEY_NAME) == fresh_key
    assert sorted(p.name for p in target.data_dir.iterdir() if p.name.startswith("restore")) == [restore.LAST]
    kept = make_settings(target.data_dir.parent / "kept")
    kept.data_dir.mkdir(parents=True)
    for name in os.listdir(old):
        (kept.data_dir / name).write_bytes((old / name).read_bytes())
        os.chmod(kept.data_dir / name, 0o600)
    with Store(kept) as store:  # the old store, whole, with what its log held
        assert store.audit_verify() == [] and store.audit_entries()[-1].action == "test.before-restore"


def test_the_cli_backs_up_to_stdout_and_stages_from_stdin(source, target):
    made = cli(source.settings.data_dir, "backup")
    assert made.returncode == 0, made.stderr
    staged = cli(target.data_dir, "restore", "stage", stdin=made.stdout)
    assert staged.returncode == 0, staged.stderr
    assert json.loads(staged.stdout)["counts"]["secrets"] == 3
    assert json.loads(cli(target.data_dir, "restore", "state").stdout)["staged"] is True
    applied = cli(target.data_dir, "restore", "apply-staged")
    assert json.loads(applied.stdout)["result"] == "applied"
    assert "intact" in cli(target.data_dir, "audit", "verify").stdout.decode()
    refused = cli(target.data_dir, "restore", "stage", stdin=made.stdout[:-1])
    assert refused.returncode == 1 and b"truncated" in refused.stderr
    assert SECRET_VALUE.encode() not in staged.stdout + refused.stderr


def test_the_guest_unit_applies_a_staged_copy_before_the_proxy_starts():
    assert guest_files.RESTORE_DIRS == (restore.STAGED, restore.OLD)
    pre = [line for line in guest_files.UNIT.splitlines() if line.startswith("ExecStartPre=")]
    assert "restore apply-staged" in pre[0] and "proxy init" in pre[1]  # before init: a lost disk's fresh VM
    assert "test -d /var/lib/secret-proxy/restore.staged" in pre[0]
