"""A backup sealed to the operator's public key: the file alone reveals nothing but its header.

The only module of the host that touches the backup's keys. The recipe, for each file:

    an ephemeral X25519 key pair; shared = X25519(ephemeral private, recipient public)
    key = HKDF-SHA256(shared, info = LABEL | ephemeral public | recipient public), 32 bytes
    the plaintext in 1 MiB chunks, each AES-256-GCM under `key`, nonce = chunk number (11 bytes)
    and a last-chunk flag (1 byte), the whole header as associated data of every chunk

The header (magic, format version, the recipient key's fingerprint, the ephemeral public key, when,
from which host directory, the plaintext's length) is plain JSON, so `takeover backup show` reads
it without a key, and authenticated, so a changed header fails like a changed byte anywhere else.
A truncated file, one chunk too many, chunks swapped or a wrong key all fail authentication
before a byte of plaintext is used: `open_sealed` decrypts the whole file or raises.

What the seal does not say is who sealed it: the public key is not secret. Restore therefore reads
only a file that root owns in directories only root can change (takeover/backup.py).

The private key belongs off the host (docs/operations.md, "Backups"): root on the host can write
backups, and a thief of the host's disk, or of the backups, reads none of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import TakeoverError

MAGIC = b"SPVM-BACKUP\n"
VERSION = 1
CIPHER = "X25519-HKDF-SHA256-AES-256-GCM"
LABEL = b"secret-proxy-vm backup v1"
CHUNK_BYTES = 1024 * 1024
TAG_BYTES = 16
MAX_HEADER_BYTES = 4096
# What the host holds in memory, sealing and opening: the guest's archive is bounded by the same.
MAX_PLAINTEXT_BYTES = 1024 * 1024 * 1024
KEY_FILE_BYTES = 4096


class BackupSealError(TakeoverError):
    hint = (
        "the backup file is damaged, truncated, not a backup, or sealed to another key; nothing was changed. "
        "Use another copy of the backup (and the private key its header's recipient names)"
    )


class BackupKeyError(TakeoverError):
    hint = (
        "give the key pair `python -m takeover backup keygen` wrote (backup.key.pub to back up, backup.key to restore)"
    )


@dataclass(frozen=True)
class Header:
    version: int
    cipher: str
    recipient: str  # the fingerprint of the public key it is sealed to
    ephemeral: str  # hex: this file's ephemeral X25519 public key
    created: str  # UTC, ISO 8601
    host_dir: str
    plaintext_bytes: int
    chunk_bytes: int

    def encoded(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


def generate() -> tuple[bytes, bytes, str]:
    """A new key pair as PEM (private, public) and the public key's fingerprint."""
    private = X25519PrivateKey.generate()
    public = private.public_key()
    return (
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        fingerprint(public),
    )


def fingerprint(public: X25519PublicKey) -> str:
    return "sha256:" + hashlib.sha256(_raw(public)).hexdigest()[:32]


def load_public(pem: bytes, where: str) -> X25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise BackupKeyError(f"{where} is not a PEM public key") from None
    if not isinstance(key, X25519PublicKey):
        raise BackupKeyError(f"{where} is not an X25519 public key")
    return key


def load_private(pem: bytes, where: str) -> X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise BackupKeyError(f"{where} is not an unencrypted PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise BackupKeyError(f"{where} is not an X25519 private key")
    return key


def public_fingerprint(private: X25519PrivateKey) -> str:
    return fingerprint(private.public_key())


def seal(plaintext: bytes, recipient: X25519PublicKey, created: str, host_dir: str) -> bytes:
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise BackupSealError(f"the backup is {len(plaintext)} bytes, over the limit of {MAX_PLAINTEXT_BYTES}")
    ephemeral = X25519PrivateKey.generate()
    header = Header(
        VERSION,
        CIPHER,
        fingerprint(recipient),
        _raw(ephemeral.public_key()).hex(),
        created,
        host_dir,
        len(plaintext),
        CHUNK_BYTES,
    )
    head = header.encoded()
    aead = AESGCM(_key(ephemeral.exchange(recipient), ephemeral.public_key(), recipient))
    parts = [MAGIC, len(head).to_bytes(4, "big"), head]
    chunks = _chunk_count(len(plaintext))
    for i in range(chunks):
        piece = plaintext[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]
        parts.append(aead.encrypt(_nonce(i, i == chunks - 1), piece, head))
    return b"".join(parts)


def read_header(data: bytes) -> tuple[Header, int]:
    """The header of a sealed file (no key needed) and where its chunks begin; BackupSealError if none."""
    if not data.startswith(MAGIC):
        raise BackupSealError("this is not a secret-proxy-vm backup (no backup header)")
    at = len(MAGIC) + 4
    size = int.from_bytes(data[len(MAGIC) : at], "big")
    if size > MAX_HEADER_BYTES or at + size > len(data):
        raise BackupSealError("the backup's header is truncated or oversized")
    try:
        fields = json.loads(data[at : at + size])
        header = Header(**fields)
    except (ValueError, TypeError) as exc:
        raise BackupSealError(f"the backup's header is malformed: {exc}") from None
    if header.version != VERSION or header.cipher != CIPHER:
        raise BackupSealError(f"backup format {header.version} ({header.cipher}); this host reads {VERSION} ({CIPHER})")
    if not 0 <= header.plaintext_bytes <= MAX_PLAINTEXT_BYTES or header.chunk_bytes != CHUNK_BYTES:
        raise BackupSealError("the backup's header names an impossible size")
    return header, at + size


def open_sealed(data: bytes, private: X25519PrivateKey) -> tuple[Header, bytes]:
    """The header and the plaintext, every chunk authenticated; BackupSealError naming what failed."""
    header, at = read_header(data)
    head = data[len(MAGIC) + 4 : at]
    if header.recipient != public_fingerprint(private):
        raise BackupSealError(
            f"the backup is sealed to key {header.recipient}, not to this one ({public_fingerprint(private)})",
            hint="give --key the private key whose fingerprint the backup's header names",
        )
    chunks = _chunk_count(header.plaintext_bytes)
    expected = at + header.plaintext_bytes + chunks * TAG_BYTES
    if len(data) != expected:
        raise BackupSealError(
            f"the backup is {len(data)} bytes where its header promises {expected}: "
            f"{'truncated' if len(data) < expected else 'bytes were added'}"
        )
    try:
        ephemeral = X25519PublicKey.from_public_bytes(bytes.fromhex(header.ephemeral))
        aead = AESGCM(_key(private.exchange(ephemeral), ephemeral, private.public_key()))
    except ValueError:
        raise BackupSealError("the backup's header holds no usable ephemeral key") from None
    pieces = []
    for i in range(chunks):
        length = min(CHUNK_BYTES, header.plaintext_bytes - i * CHUNK_BYTES) + TAG_BYTES
        try:
            pieces.append(aead.decrypt(_nonce(i, i == chunks - 1), data[at : at + length], head))
        except InvalidTag:
            raise BackupSealError(
                f"chunk {i + 1} of {chunks} fails authentication: the file (or its header) was changed"
            ) from None
        at += length
    return header, b"".join(pieces)


def _chunk_count(plaintext_bytes: int) -> int:
    return max(1, -(-plaintext_bytes // CHUNK_BYTES))  # an empty backup is one empty chunk


def _nonce(index: int, last: bool) -> bytes:
    # Each file has its own key (its own ephemeral pair), so a counter never repeats under one key.
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _key(shared: bytes, ephemeral: X25519PublicKey, recipient: X25519PublicKey) -> bytes:
    info = LABEL + _raw(ephemeral) + _raw(recipient)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
