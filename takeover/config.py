"""The takeover's settings: one typed object, built in one place (the CLI) and passed down."""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidInput
from .models import Endpoint

DEFAULT_HOST_DIR = Path("/var/lib/secret-proxy-vm")
DEFAULT_CACHE_DIR = Path("/var/cache/secret-proxy-vm")  # the host's own system build, shared by takeovers
DEFAULT_SSH = Endpoint("127.0.0.1", 2223)
VM_NAME = "secret-proxy-vm"


@dataclass(frozen=True)
class TakeoverConfig:
    host_dir: Path = DEFAULT_HOST_DIR
    ready_file: Path | None = None
    monitor: Path | None = None
    disk: Path | None = None
    proxy_listen: Endpoint | None = None  # default: the address the agent's VM used (ready file)
    ssh_listen: Endpoint = DEFAULT_SSH
    runner: str = "qemu"
    libvirt_uri: str = "qemu:///system"
    qemu_user: str | None = "secret-proxy-vm"
    accel: str = "tcg"
    keep_source: bool = False
    proxy_config: Path | None = None
    agent_name: str | None = None
    agent_secrets: str = "*"
    token_file: Path | None = None
    vm_name: str = VM_NAME
    boot_timeout: float = 600.0
    reinstall_venv: bool = True
    cache_dir: Path = DEFAULT_CACHE_DIR
    rebuild_system: bool = True  # replace the agent's filesystem with the host's own build (scrub.rebuild_system)
    replace_modules: bool = True
    kernel: Path | None = None  # the operator's own kernel and initrd instead of vm_image.boot_files
    initrd: Path | None = None
    kernel_append: str | None = None
    fail_after: str | None = None  # tests only: fail right after this step (hidden option)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, (Path, Endpoint)) else v) for k, v in asdict(self).items()}


def read_proxy_config(path: Path) -> bytes:
    """The host's proxy settings (Telegram token, chat, approvers): checked here, copied into the VM."""
    from proxy.config import Settings  # the host's copy of the proxy defines which settings exist

    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"--proxy-config {path}: not a readable TOML file ({exc})") from None
    known = set(Settings.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInput(f"--proxy-config {path}: unknown settings {unknown}; known: {sorted(known)}")
    if "data_dir" in data:
        raise InvalidInput(f"--proxy-config {path}: data_dir is fixed in the VM; remove it")
    if os.stat(path).st_mode & 0o077:
        raise InvalidInput(f"--proxy-config {path} is readable by others; it holds the Telegram token. chmod 600 it")
    return raw
