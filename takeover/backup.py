"""`takeover backup` and `takeover restore`: the store and its audit, copied off the one disk they live on.

backup   the guest's `secret-proxy backup` (SQLite's online backup: one committed state while agents
         keep asking), read over the host's pinned SSH login and bounded, sealed at once to the
         operator's public key (takeover/host/backup_seal.py), written 0600 root's from its first
         byte, synced, and recorded in HOST_DIR/backups.json for `status`.
restore  the whole file opened and authenticated first: a damaged, truncated or foreign file is
         refused before the VM is touched. The guest checks the archive again (`restore stage`:
         integrity, key, audit chain) and stages it; the VM is restarted, its unit's ExecStartPre
         swaps the copy in before the proxy starts (proxy/restore.py), and the host then checks
         that the copy is the one applied and that `audit verify` passes.

Nothing here prints or logs a secret: the archive goes from the SSH pipe to the cipher and back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .backup_record import BackupMade, RestoreDone
from .backup_record import load as load_record
from .backup_record import save as save_record
from .config import TakeoverConfig
from .errors import InvalidInput, TakeoverError
from .host import backup_seal
from .host.files import (
    check_trusted_parent,
    create_private_under_trusted_dirs,
    fsync_dir,
    prepared_by_others,
    read_root_only_file,
    write_all,
)
from .host.keys import load_host_keys
from .host.ssh import SSHTarget
from .host.vm_checks import CLI, wait_for_ssh
from .runbook import finished_vm, start_host_vm, stop_host_vm

PRIVATE_KEY = "backup.key"
PUBLIC_KEY = "backup.key.pub"
BACKUPS_DIR = "backups"
SUFFIX = ".spvm-backup"
# What `restore stage` and `restore state` print is a short JSON object.
ANSWER_MAX_BYTES = 64 * 1024
SEALED_MAX_BYTES = backup_seal.MAX_PLAINTEXT_BYTES + 2 * backup_seal.MAX_HEADER_BYTES + 1024 * backup_seal.TAG_BYTES


class BackupFailed(TakeoverError):
    hint = "is the VM running (`python -m takeover start`)? Its proxy answers over the host's SSH login"


class RestoreRefused(TakeoverError):
    hint = "nothing was applied: the VM serves its store as before. Use another backup, or look at the message"


def keygen(out_dir: Path) -> dict[str, Any]:
    """A new key pair in `out_dir` (root's directories only), never over an existing file."""
    private_pem, public_pem, fingerprint = backup_seal.generate()
    private, public = out_dir / PRIVATE_KEY, out_dir / PUBLIC_KEY
    for path in (private, public):
        if os.path.lexists(path):
            raise InvalidInput(f"{path} exists; a backup key is never overwritten", hint="choose another --out")
    for path, data, mode in ((private, private_pem, 0o600), (public, public_pem, 0o644)):
        fd = create_private_under_trusted_dirs(path, "--out")
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(out_dir)
    return {
        "private_key": str(private),
        "public_key": str(public),
        "fingerprint": fingerprint,
        "next": (
            f"move {private} OFF this host (a password manager, or an offline medium in a safe, two copies): "
            "without it no backup can be read, and on this host it would open every backup to whoever takes "
            f"the disk. Keep {public} here and back up with `python -m takeover backup --recipient {public}`"
        ),
    }


def show(path: Path) -> dict[str, Any]:
    """A backup's header, read without any key."""
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            head = f.read(len(backup_seal.MAGIC) + 4 + backup_seal.MAX_HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    header, _ = backup_seal.read_header(head)
    return {"file": str(path), "bytes": size, **header.__dict__}


def take_backup(cfg: TakeoverConfig, recipient: Path, to: Path | None) -> dict[str, Any]:
    spec, runner = finished_vm(cfg)
    public = backup_seal.load_public(
        read_root_only_file(recipient, "--recipient", backup_seal.KEY_FILE_BYTES, secret=False), str(recipient)
    )
    now = datetime.now(UTC)
    target = to if to is not None else backups_dir(cfg.host_dir) / f"backup-{now:%Y%m%dT%H%M%SZ}{SUFFIX}"
    check_trusted_parent(target, "--to")
    if os.path.lexists(target):
        raise InvalidInput(f"{target} exists; a backup never overwrites a file", hint="name a new file with --to")
    if runner.pid(spec) is None:
        raise BackupFailed("the VM is not running")
    started = time.monotonic()
    made = _ssh(cfg).exchange(CLI, "backup", limit=backup_seal.MAX_PLAINTEXT_BYTES)
    if made.returncode != 0:
        raise BackupFailed(f"`secret-proxy backup` failed in the VM: {made.stderr.strip()[-300:]}")
    created = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    sealed = backup_seal.seal(made.stdout, public, created, str(cfg.host_dir))
    fd = create_private_under_trusted_dirs(target, "--to")
    try:
        write_all(fd, sealed)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(Path(os.path.abspath(target)).parent)
    entry = BackupMade(Path(os.path.abspath(target)), created, len(sealed), backup_seal.fingerprint(public))
    save_record(cfg.host_dir, replace(load_record(cfg.host_dir), last_backup=entry))
    return {
        "backup": str(entry.path),
        "created": created,
        "bytes": entry.bytes,
        "sealed_to": entry.recipient,
        "seconds": round(time.monotonic() - started, 1),
    }


def restore_backup(cfg: TakeoverConfig, source: Path, key: Path) -> dict[str, Any]:
    spec, runner = finished_vm(cfg)
    private = backup_seal.load_private(
        read_root_only_file(key, "--key", backup_seal.KEY_FILE_BYTES, secret=True), str(key)
    )
    sealed = read_root_only_file(source, "--from", _size_bound(source), secret=True)
    header, archive = backup_seal.open_sealed(sealed, private)  # all of it, before the VM is touched
    if runner.pid(spec) is None:
        raise RestoreRefused(
            "the VM is not running; nothing was changed", hint="`python -m takeover start`, then rerun"
        )
    ssh = _ssh(cfg)
    staged = ssh.exchange(CLI, "restore", "stage", stdin=archive, limit=ANSWER_MAX_BYTES)
    if staged.returncode != 0:
        raise RestoreRefused(f"the VM refused the backup: {staged.stderr.strip()[-300:]}")
    staged_at = _answer(staged.stdout, "restore stage")["staged_at"]
    # The proxy user cannot restart its unit; a restart of the VM runs it again from boot, and its
    # ExecStartPre swaps the staged copy in before `proxy serve` opens the store.
    stop_host_vm(cfg)
    start_host_vm(cfg)
    wait_for_ssh(ssh, cfg.boot_timeout)
    state = _answer(ssh.run(CLI, "restore", "state").stdout.encode(), "restore state")
    last = state.get("last") or {}
    if last.get("result") != "applied" or last.get("staged_at") != staged_at:
        raise RestoreRefused(
            f"the VM did not apply the staged copy: {json.dumps(last)[:300]}",
            hint="the VM serves its store as before; read `secret-proxy restore state` in the VM",
        )
    verified = ssh.run(CLI, "audit", "verify")
    if verified.returncode != 0 or "intact" not in verified.stdout:
        raise TakeoverError(
            f"the restored store's audit chain does not verify: {(verified.stdout + verified.stderr).strip()[-300:]}",
            hint="the copy it replaced is kept in the VM's /var/lib/secret-proxy/pre-restore",
        )
    counts = {str(k): int(v) for k, v in dict(last.get("counts", {})).items()}
    done = RestoreDone(
        Path(os.path.abspath(source)), header.created, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), counts
    )
    save_record(cfg.host_dir, replace(load_record(cfg.host_dir), last_restore=done))
    return {
        "restored": str(done.source),
        "backup_created": header.created,
        "backup_host_dir": header.host_dir,
        "counts": counts,
        "audit": verified.stdout.strip(),
        "previous_store": "kept in the VM as /var/lib/secret-proxy/pre-restore",
    }


def _size_bound(source: Path) -> int:
    """What to read of `source`: its size (one read asks for all it may take at once), within the bound."""
    try:
        size = os.stat(source).st_size
    except OSError as exc:
        raise InvalidInput(f"--from {source}: {exc.strerror}") from None
    if size > SEALED_MAX_BYTES:
        raise backup_seal.BackupSealError(f"{source} is {size} bytes, larger than any backup ({SEALED_MAX_BYTES})")
    return size


def backups_dir(host_dir: Path) -> Path:
    path = host_dir / BACKUPS_DIR
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    reason = prepared_by_others(path)
    if reason is not None:
        raise InvalidInput(f"{path} {reason}; backups are written only into a directory of root's")
    return path


def _ssh(cfg: TakeoverConfig) -> SSHTarget:
    spec, _ = finished_vm(cfg)
    key, known_hosts = load_host_keys(cfg.host_dir)
    return SSHTarget(spec.ssh_listen, key, known_hosts)


def _answer(text: bytes, what: str) -> dict[str, Any]:
    """The guest's JSON answer, bounded; a TakeoverError if it is not a JSON object."""
    try:
        found = json.loads(text[:ANSWER_MAX_BYTES])
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise RestoreRefused(f"`secret-proxy {what}` in the VM did not answer with a JSON object")
    return found
