"""Key handling and encryption: the only module that touches raw keys or nonces.

Envelope encryption: every secret gets its own random 256-bit data key; the value
is sealed with AES-256-GCM under that data key, and the data key is sealed
("wrapped") under the master key. The secret's name is bound into both as
associated data, so a ciphertext copied onto another row does not decrypt.
Rotating the master key re-wraps data keys only; values are never decrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
_FORMAT = b"\x01"  # version byte in front of every sealed blob


class CryptoError(Exception):
    """A blob did not decrypt: wrong key, wrong name, or tampered data."""


class MasterKey:
    """The key that wraps every data key and the audit key. Its bytes never leave this module."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise CryptoError(f"master key must be {KEY_BYTES} bytes, got {len(raw)}")
        self._raw = raw

    @property
    def key_id(self) -> str:
        """A public fingerprint, so the database can name the key that wraps it."""
        return hmac.new(self._raw, b"secret-proxy key-id", hashlib.sha256).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MasterKey) and hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __repr__(self) -> str:  # never let a key reach a log line through repr()
        return f"MasterKey(id={self.key_id})"


class AuditKey:
    """The key that authenticates the audit chain and its head; only `mac` and `verify` use it."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise CryptoError(f"audit key must be {KEY_BYTES} bytes, got {len(raw)}")
        self._raw = raw

    def mac(self, message: bytes) -> str:
        return hmac.new(self._raw, message, hashlib.sha256).hexdigest()

    def verify(self, message: bytes, digest: str) -> bool:
        return hmac.compare_digest(digest, self.mac(message))

    def __repr__(self) -> str:
        return "AuditKey(<hidden>)"


def new_master_key() -> MasterKey:
    return MasterKey(os.urandom(KEY_BYTES))


def write_key_file(path: Path, key: MasterKey) -> None:
    """Create a key file 0600 from its first byte; refuse to overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, key_file_text(key))
        os.fsync(fd)
    finally:
        os.close(fd)


def key_file_text(key: MasterKey) -> bytes:
    """What a key file holds: a backup carries the master key as this text, or it restores nothing."""
    return key._raw.hex().encode() + b"\n"


def key_from_text(text: bytes, where: str) -> MasterKey:
    """The master key in a key file's text (`key_file_text`); `where` names the file in the error."""
    try:
        return MasterKey(bytes.fromhex(text.decode("ascii").strip()))
    except (ValueError, CryptoError):
        raise CryptoError(f"master key file {where} is not a hex-encoded 32-byte key") from None


def read_key_file(path: Path) -> MasterKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CryptoError(f"no master key at {path}; run `python -m proxy init` first") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise CryptoError(
                f"master key {path} is readable by group or others (mode {st.st_mode & 0o777:o}); "
                "fix with chmod 600 and consider the key compromised"
            )
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    return key_from_text(text, str(path))


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return _FORMAT + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != _FORMAT:
        raise CryptoError("sealed blob is malformed")
    nonce = blob[1 : 1 + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, blob[1 + NONCE_BYTES :], aad)
    except InvalidTag:
        raise CryptoError("sealed blob failed authentication (wrong key, wrong name, or tampered)") from None


def _aad(kind: str, name: str) -> bytes:
    return f"secret-proxy:{kind}:{name}".encode()


@dataclass(frozen=True)
class Sealed:
    wrapped_key: bytes
    ciphertext: bytes


def seal(master: MasterKey, name: str, value: bytes) -> Sealed:
    data_key = os.urandom(KEY_BYTES)
    return Sealed(
        wrapped_key=_seal(master._raw, data_key, _aad("data-key", name)),
        ciphertext=_seal(data_key, value, _aad("value", name)),
    )


def open_sealed(master: MasterKey, name: str, sealed: Sealed) -> bytes:
    data_key = _open(master._raw, sealed.wrapped_key, _aad("data-key", name))
    return _open(data_key, sealed.ciphertext, _aad("value", name))


def rewrap(old: MasterKey, new: MasterKey, name: str, wrapped_key: bytes) -> bytes:
    """Move a data key from one master key to another without touching the value."""
    data_key = _open(old._raw, wrapped_key, _aad("data-key", name))
    return _seal(new._raw, data_key, _aad("data-key", name))


def new_audit_key() -> AuditKey:
    return AuditKey(os.urandom(KEY_BYTES))


def wrap_audit_key(master: MasterKey, key: AuditKey) -> bytes:
    return _seal(master._raw, key._raw, _aad("internal-key", "audit"))


def unwrap_audit_key(master: MasterKey, blob: bytes) -> AuditKey:
    return AuditKey(_open(master._raw, blob, _aad("internal-key", "audit")))


def hash_token(token: str) -> str:
    """Agent tokens carry 256 random bits, so a plain SHA-256 cannot be brute-forced."""
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
