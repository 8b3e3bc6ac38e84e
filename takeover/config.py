"""The takeover's settings: one typed object, built in one place (the CLI) and passed down."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import InvalidInput
from .host.files import read_root_only_file
from .models import Endpoint
from .record import from_record, to_record

DEFAULT_HOST_DIR = Path("/var/lib/secret-proxy-vm")
DEFAULT_CACHE_DIR = Path("/var/cache/secret-proxy-vm")  # the host's own system build, shared by takeovers
DEFAULT_SSH = Endpoint("127.0.0.1", 2223)
VM_NAME = "secret-proxy-vm"  # the libvirt domain's and QEMU's -name
DEFAULT_QEMU_USER = "secret-proxy-vm"  # the system user the qemu runner's QEMU runs as
# The system user that reads a disk brought out of an agent machine (it has no local owner to read it as).
DEFAULT_COPY_USER = "secret-proxy-vm-copy"
DEFAULT_LIBVIRT_URI = "qemu:///system"
BOOT_TIMEOUT = 600.0  # a TCG boot of Debian with Python on one core takes one to three minutes
TELEGRAM_API_URL = "https://api.telegram.org"
PROXY_CONFIG_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class TakeoverConfig:
    host_dir: Path = DEFAULT_HOST_DIR
    ready_file: Path | None = None
    monitor: Path | None = None
    disk: Path | None = None
    proxy_listen: Endpoint | None = None  # default: the address the agent's VM used (ready file)
    ssh_listen: Endpoint = DEFAULT_SSH
    runner: str = "qemu"
    libvirt_uri: str = DEFAULT_LIBVIRT_URI
    qemu_user: str | None = DEFAULT_QEMU_USER
    accel: str = "tcg"
    memory_mb: int = 256
    cpus: int = 2  # a decision by the CLI in the guest gets its own vCPU (docs/benchmarks.md)
    keep_source: bool = False
    proxy_config: Path | None = None
    allow_telegram_api_url: str | None = None  # the operator's yes to a Bot API other than Telegram's own
    # The host's VM reaches only Telegram and these destinations (takeover/host/egress.py); off only by choice.
    egress_filter: bool = True
    egress_allow: tuple[str, ...] = ()
    agent_name: str | None = None
    agent_secrets: str = "*"
    token_file: Path | None = None
    vm_name: str = VM_NAME
    boot_timeout: float = BOOT_TIMEOUT
    reinstall_venv: bool = True
    cache_dir: Path = DEFAULT_CACHE_DIR
    rebuild_system: bool = True  # replace the agent's filesystem with the host's own build (scrub.rebuild_system)
    # Prepare the host's VM while the agent's serves, then cut over in about a second (steps.CUT_OVER);
    # False (--in-order): the steps in order, the proxy down from the checkpoint until the new VM boots.
    cut_over: bool = True
    replace_modules: bool = True
    kernel: Path | None = None  # the operator's own kernel and initrd instead of vm_image.boot_files
    initrd: Path | None = None
    kernel_append: str | None = None
    # The agent in a machine of its own (agent/machine.py): the ready file, monitor and disk are paths in it.
    agent_machine: str | None = None  # USER@HOST[:PORT], reached as root over SSH
    agent_machine_key: Path | None = None
    agent_machine_known_hosts: Path | None = None
    serve_on: Endpoint | None = None  # where the host serves the proxy back to that machine
    copy_user: str = DEFAULT_COPY_USER
    fail_after: str | None = None  # tests only: fail right after this step (hidden option)

    def to_dict(self) -> dict[str, Any]:
        """The options as the journal keeps them (`record.to_record`)."""
        record: dict[str, Any] = to_record(self)
        return record

    @classmethod
    def saved(cls, options: dict[str, Any], host_dir: Path) -> TakeoverConfig:
        """The options a run was made with, from its journal, for `start`, `stop` and `rollback`.

        An option the journal lacks was not there yet when it was written, and takes its default,
        except `qemu_user` (before it existed the host's QEMU ran as root) and `cut_over` (before
        it existed every run was in order). The host directory is the one the command names.
        """
        older = {"qemu_user": None, "cut_over": False}
        return replace(from_record(cls, {**older, **options}, "the journal's options"), host_dir=host_dir)


def read_proxy_config(path: Path, *, allow_telegram_api_url: str | None = None) -> bytes:
    """The host's proxy settings (Telegram token, chat, approvers): checked here, copied into the VM.

    The file holds the bot token, so it is read once, without following links, from a
    descriptor checked to be root's and 0600, in directories only root can change
    (`files.read_root_only_file`). Its `telegram_api_url` decides who approves: from the
    guest, 10.0.2.2 is the host's loopback, where the agent can serve a fake Bot API that
    approves its own requests. So any URL but Telegram's own needs the operator to name
    it again on the command line.
    """
    from proxy.config import Settings  # the host's copy of the proxy defines which settings exist

    raw = read_root_only_file(path, "--proxy-config", PROXY_CONFIG_MAX_BYTES)
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"--proxy-config {path}: not a readable TOML file ({exc})") from None
    known = set(Settings.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInput(f"--proxy-config {path}: unknown settings {unknown}; known: {sorted(known)}")
    for fixed in ("data_dir", "egress_proxy"):
        if fixed in data:
            raise InvalidInput(f"--proxy-config {path}: {fixed} is set by the takeover; remove it")
    check_telegram_api_url(data.get("telegram_api_url", TELEGRAM_API_URL), allow_telegram_api_url, path)
    return raw


def telegram_destination(proxy_config: bytes | None) -> list[str]:
    """The Bot API the proxy will call, if its config turns Telegram on: the first entry of the egress list."""
    if proxy_config is None:
        return []
    data = tomllib.loads(proxy_config.decode())
    if not data.get("telegram_token"):
        return []
    return [str(data.get("telegram_api_url", TELEGRAM_API_URL))]


def check_telegram_api_url(url: object, allowed: str | None, path: Path) -> None:
    if not isinstance(url, str):
        raise InvalidInput(f"--proxy-config {path}: telegram_api_url must be a string")
    if url.rstrip("/") == TELEGRAM_API_URL:
        return
    if allowed is not None and url.rstrip("/") == allowed.rstrip("/"):
        return
    raise InvalidInput(
        f"--proxy-config {path} sends the bot to {url!r}, not to Telegram ({TELEGRAM_API_URL}); whoever "
        f"answers there decides every approval (10.0.2.2 is this host's loopback, where any local user can listen)",
        hint=f"if you run that Bot API server yourself, pass --allow-telegram-api-url {url}; "
        f"else remove telegram_api_url from the file",
    )
