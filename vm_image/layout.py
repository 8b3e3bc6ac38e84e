"""Where `vm_image` keeps everything: one state directory (docs/architecture.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

# The ready file's first line; a JSON object follows (docs/architecture.md). takeover reads it too.
READY_MARKER = "READY_FOR_TAKEOVER"


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    return Path(env["SECRET_PROXY_VM_CACHE"]) if env.get("SECRET_PROXY_VM_CACHE") else None


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("SECRET_PROXY_VM_STATE"):
        return Path(env["SECRET_PROXY_VM_STATE"])
    return Path(env.get("HOME", "/nonexistent")) / ".local/state/secret-proxy-vm"


@dataclass(frozen=True)
class Layout:
    state: Path
    cache_dir: Path | None = None  # shared between state directories (tests); default STATE/cache

    def __post_init__(self) -> None:
        for name in ("state", "cache_dir"):
            path = getattr(self, name)
            if path is None:
                continue
            if not path.is_absolute():
                object.__setattr__(self, name, path.absolute())
            if any(c in str(path) for c in "\n\0,"):
                # QEMU's option syntax uses commas; a path with one would be parsed as two options.
                raise BadInput(f"directory {str(path)!r} contains a comma, newline or NUL")

    @property
    def image(self) -> Path:
        return self.state / "image"

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def cache(self) -> Path:
        return self.cache_dir or self.state / "cache"

    @property
    def disk(self) -> Path:
        return self.image / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.image / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.image / "initrd.img"

    @property
    def seed(self) -> Path:
        return self.image / "seed.iso"

    @property
    def manifest(self) -> Path:
        return self.image / "manifest.json"

    @property
    def setup_key(self) -> Path:
        return self.image / "setup_key"

    @property
    def monitor(self) -> Path:
        return self.run / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "qemu.pid"

    @property
    def serial_log(self) -> Path:
        return self.run / "serial.log"

    @property
    def ready(self) -> Path:
        return self.run / "ready"

    def make_dirs(self) -> None:
        for path in (self.state, self.image, self.run, self.cache):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
