"""The host's side of backups: a sealed file reveals nothing but its header and opens only whole, under the
operator's key; the key pair is written private and never over anything; `status` shows the last backup."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from takeover import backup, backup_record
from takeover.cli import main
from takeover.errors import InvalidInput
from takeover.host import backup_seal
from takeover.host.backup_seal import BackupKeyError, BackupSealError
from takeover.host.ssh import OutputTooLarge, exchange_bounded

PLAINTEXT = b"SECRET-ARCHIVE-BYTES " * 1000


def pair():
    private_pem, public_pem, _ = backup_seal.generate()
    return backup_seal.load_private(private_pem, "test"), backup_seal.load_public(public_pem, "test")


def sealed_with(plaintext: bytes = PLAINTEXT) -> tuple[bytes, object]:
    private, public = pair()
    return backup_seal.seal(plaintext, public, "2026-12-05T13:00:00Z", "/var/lib/secret-proxy-vm"), private


def test_a_sealed_backup_opens_under_its_key_and_shows_only_its_header():
    sealed, private = sealed_with()
    header, opened = backup_seal.open_sealed(sealed, private)
    assert opened == PLAINTEXT
    assert header.plaintext_bytes == len(PLAINTEXT) and header.host_dir == "/var/lib/secret-proxy-vm"
    assert b"SECRET-ARCHIVE" not in sealed
    assert backup_seal.read_header(sealed)[0] == header  # no key needed for the header


@pytest.mark.parametrize(
    "size", [0, 1, backup_seal.CHUNK_BYTES, backup_seal.CHUNK_BYTES + 1, 3 * backup_seal.CHUNK_BYTES]
)
def test_every_size_round_trips_across_chunks(size):
    data = os.urandom(size)
    sealed, private = sealed_with(data)
    assert backup_seal.open_sealed(sealed, private)[1] == data


def test_a_flipped_byte_anywhere_is_refused():
    data = os.urandom(2 * backup_seal.CHUNK_BYTES + 100)
    sealed, private = sealed_with(data)
    _, body = backup_seal.read_header(sealed)
    for at in [0, 5, len(backup_seal.MAGIC) + 2, body - 3, body, body + backup_seal.CHUNK_BYTES + 20, len(sealed) - 1]:
        flipped = bytearray(sealed)
        flipped[at] ^= 0x01
        with pytest.raises((BackupSealError, BackupKeyError)):
            backup_seal.open_sealed(bytes(flipped), private)


def test_a_changed_header_is_refused_even_when_it_still_parses():
    sealed, private = sealed_with()
    forged = sealed.replace(b"/var/lib/secret-proxy-vm", b"/var/lib/secret-proxy-vX")
    with pytest.raises(BackupSealError, match="fails authentication"):
        backup_seal.open_sealed(forged, private)


@pytest.mark.parametrize("cut", [1, 16, backup_seal.CHUNK_BYTES])
def test_a_truncated_or_extended_backup_is_refused(cut):
    sealed, private = sealed_with(os.urandom(2 * backup_seal.CHUNK_BYTES))
    with pytest.raises(BackupSealError, match="truncated"):
        backup_seal.open_sealed(sealed[:-cut], private)
    with pytest.raises(BackupSealError, match="bytes were added"):
        backup_seal.open_sealed(sealed + b"\0" * cut, private)
    with pytest.raises(BackupSealError, match="no backup header|truncated"):
        backup_seal.open_sealed(sealed[:20], private)


def test_chunks_swapped_are_refused():
    sealed, private = sealed_with(os.urandom(2 * backup_seal.CHUNK_BYTES))
    _, at = backup_seal.read_header(sealed)
    size = backup_seal.CHUNK_BYTES + backup_seal.TAG_BYTES
    first, second = sealed[at : at + size], sealed[at + size : at + 2 * size]
    swapped = sealed[:at] + second + first + sealed[at + 2 * size :]
    with pytest.raises(BackupSealError, match="fails authentication"):
        backup_seal.open_sealed(swapped, private)


def test_the_wrong_key_is_refused_naming_the_right_one():
    sealed, _ = sealed_with()
    other, _ = pair()
    header, _ = backup_seal.read_header(sealed)
    with pytest.raises(BackupSealError, match=f"sealed to key {header.recipient}"):
        backup_seal.open_sealed(sealed, other)


def test_keys_that_are_not_x25519_pem_are_refused():
    with pytest.raises(BackupKeyError):
        backup_seal.load_public(b"not a key", "k.pub")
    with pytest.raises(BackupKeyError):
        backup_seal.load_private(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "k")


@pytest.mark.root
def test_keygen_writes_the_private_key_0600_and_never_overwrites(tmp_path):
    made = backup.keygen(tmp_path)
    private, public = tmp_path / backup.PRIVATE_KEY, tmp_path / backup.PUBLIC_KEY
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    assert "OFF this host" in made["next"] and made["fingerprint"].startswith("sha256:")
    key = backup_seal.load_private(private.read_bytes(), "k")
    assert backup_seal.public_fingerprint(key) == made["fingerprint"]
    before = private.read_bytes()
    with pytest.raises(InvalidInput, match="never overwritten"):
        backup.keygen(tmp_path)
    assert private.read_bytes() == before


@pytest.mark.root
def test_keygen_refuses_a_directory_others_can_change(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(InvalidInput, match="someone other than root"):
        backup.keygen(shared)
    assert list(shared.iterdir()) == []


@pytest.mark.root
def test_backup_show_prints_the_header_without_a_key(tmp_path, capsys):
    sealed, _ = sealed_with()
    path = tmp_path / "b.spvm-backup"
    path.write_bytes(sealed)
    assert main(["backup", "show", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["host_dir"] == "/var/lib/secret-proxy-vm" and shown["plaintext_bytes"] == len(PLAINTEXT)
    path.write_bytes(b"garbage")
    assert main(["backup", "show", str(path)]) == 1
    assert "not a secret-proxy-vm backup" in capsys.readouterr().err


def test_status_shows_never_until_a_backup_is_recorded(tmp_path):
    assert backup_record.glance(tmp_path) == {"last_backup": "never"}
    made = backup_record.BackupMade(tmp_path / "b", "2026-12-05T13:00:00Z", 123, "sha256:ab")
    backup_record.save(tmp_path, backup_record.BackupRecord(last_backup=made))
    assert backup_record.glance(tmp_path)["last_backup"] == {
        "path": str(tmp_path / "b"),
        "created": "2026-12-05T13:00:00Z",
        "bytes": 123,
        "recipient": "sha256:ab",
    }
    assert stat.S_IMODE((tmp_path / backup_record.RECORD_NAME).stat().st_mode) == 0o600
    (tmp_path / backup_record.RECORD_NAME).write_text("{")
    assert backup_record.glance(tmp_path)["last_backup"].startswith("unreadable")


def test_a_guest_that_answers_too_much_is_cut_off_unread():
    flood = [sys.executable, "-c", "import sys\nwhile True: sys.stdout.buffer.write(b'x' * 65536)"]
    with pytest.raises(OutputTooLarge):
        exchange_bounded(flood, b"", 1024 * 1024, 30)


def test_the_exchange_feeds_stdin_and_keeps_stdout_whole():
    echo = [sys.executable, "-c", "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d[::-1])"]
    data = os.urandom(3 * 1024 * 1024)
    done = exchange_bounded(echo, data, len(data), 30)
    assert done.returncode == 0 and done.stdout == data[::-1]


def test_the_backup_command_needs_a_recipient(capsys):
    assert main(["backup", "--host-dir", "/nonexistent-host-dir"]) == 1
    assert "--recipient" in capsys.readouterr().err
