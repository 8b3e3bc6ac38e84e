"""The proxy's configuration: one typed object, built in one place.

Sources, later wins: defaults, `config.toml` in the data directory, environment
variables `SECRET_PROXY_*`. Nothing else in the proxy reads `os.environ`.
"""

from __future__ import annotations

import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = "/var/lib/secret-proxy"


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    host: str = "127.0.0.1"
    port: int = 3737
    pending_timeout_seconds: int = 600
    default_ttl_seconds: int = 300
    max_ttl_seconds: int = 3600
    rate_per_minute: int = 30
    rate_burst: int = 10
    max_pending_per_agent: int = 20
    # Status polls and retrievals have budgets of their own; a `?wait=` poll takes one token however long it waits.
    poll_rate_per_minute: int = 1200
    poll_burst: int = 120
    retrieve_rate_per_minute: int = 120
    retrieve_burst: int = 20
    max_waits_per_agent: int = 32
    # uvicorn answers 503 above this many connections; `serve` keeps it below the open-files limit.
    max_connections: int = 2048
    # Refusals of one kind from one agent: the first is audited at once, the rest as one counted entry per window.
    refusal_audit_window_seconds: float = 60.0
    max_body_bytes: int = 16 * 1024
    # Brokered calls (proxy/broker.py): the request body the agent may send, the answer it may get,
    # the whole call's time, the CA bundle for TLS ("" = the system's), and the budget of calls.
    broker_max_request_bytes: int = 256 * 1024
    broker_max_response_bytes: int = 1024 * 1024
    broker_timeout_seconds: float = 30.0
    broker_ca_file: str = ""
    call_rate_per_minute: int = 30
    call_burst: int = 10
    # Brokered calls under way at once, for one agent and in all; more are refused (too_many_calls), not queued.
    broker_max_calls_per_agent: int = 4
    broker_max_concurrent_calls: int = 16
    # The host's forward proxy (http://IP:PORT) that every outbound connection goes through: Telegram
    # and brokered calls. Set by the takeover, whose host-side allow-list is the only way out of the VM.
    egress_proxy: str = ""
    # The metrics listener (proxy/metrics.py): "IP:PORT" on a loopback address, "" for none. The guest's
    # unit sets 127.0.0.1:9737; the host reads it over its SSH login, the agent never reaches it.
    metrics_listen: str = ""
    telegram_token: str = field(default="", repr=False)
    telegram_chat_id: int = 0
    telegram_approvers: tuple[int, ...] = ()
    telegram_api_url: str = "https://api.telegram.org"
    # The longest wait between attempts to reach Telegram while it is down.
    telegram_retry_max_seconds: float = 30.0

    @property
    def db_path(self) -> Path:
        return self.data_dir / "proxy.db"

    @property
    def key_path(self) -> Path:
        return self.data_dir / "master.key"

    @property
    def telegram_enabled(self) -> bool:
        return bool(self.telegram_token)


_ENV_PREFIX = "SECRET_PROXY_"


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _setting_types() -> dict[str, object]:
    # The real types, not the annotations' strings (`from __future__ import annotations` makes them strings).
    return typing.get_type_hints(Settings)


def _coerce(name: str, raw: object) -> object:
    """`raw` (from TOML or the environment) as the setting's own type, or a ConfigError naming it."""
    kind = _setting_types()[name]
    try:
        if kind is Path:
            return Path(str(raw))
        if kind is bool:  # before int: a bool is an int, and "false" is a truthy string
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text not in _TRUE | _FALSE:
                raise ValueError(raw)
            return text in _TRUE
        if kind in (int, float):
            if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):  # a TOML list, table or date
                raise ValueError(raw)
            return int(raw) if kind is int else float(raw)
        if kind == tuple[int, ...]:
            if isinstance(raw, (list, tuple)):
                return tuple(int(x) for x in raw)
            return tuple(int(x) for x in str(raw).split(",") if x.strip())
        if kind is str:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError(raw)
            return str(raw)
    except ValueError:
        raise ConfigError(f"setting {name!r} has an invalid value; expected {_type_name(kind)}") from None
    raise ConfigError(f"setting {name!r} has a type the loader does not know: {kind}")


def _type_name(kind: object) -> str:
    return getattr(kind, "__name__", None) or str(kind)


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}  # field name -> value of that field's type (_coerce checks it)
    data_dir = Path(str(overrides.get("data_dir") or env.get(_ENV_PREFIX + "DATA_DIR") or DEFAULT_DATA_DIR))
    toml_path = data_dir / "config.toml"
    if toml_path.is_file():
        try:
            loaded = tomllib.loads(toml_path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{toml_path} is not valid TOML: {exc}") from None
        known = {f.name for f in fields(Settings)}
        for key, raw in loaded.items():
            if key not in known:
                raise ConfigError(f"{toml_path}: unknown setting {key!r}")
            values[key] = _coerce(key, raw)
    for f in fields(Settings):
        raw = env.get(_ENV_PREFIX + f.name.upper())
        if raw is not None and raw != "":
            values[f.name] = _coerce(f.name, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["data_dir"] = data_dir
    settings = replace(Settings(), **values)
    if settings.telegram_enabled and not settings.telegram_chat_id:
        raise ConfigError("SECRET_PROXY_TELEGRAM_TOKEN is set but SECRET_PROXY_TELEGRAM_CHAT_ID is not")
    if settings.egress_proxy:
        check_egress_proxy(settings.egress_proxy)
    if settings.metrics_listen:
        check_metrics_listen(settings.metrics_listen)
    if settings.refusal_audit_window_seconds <= 0:
        raise ConfigError("refusal_audit_window_seconds must be a positive number of seconds")
    if settings.telegram_retry_max_seconds <= 0:
        raise ConfigError("telegram_retry_max_seconds must be a positive number of seconds")
    return settings


def check_egress_proxy(url: str) -> tuple[str, int]:
    """`http://IP:PORT`, nothing else: the address the broker opens a CONNECT tunnel through."""
    import ipaddress
    from urllib.parse import urlsplit

    problem = ConfigError(f"egress_proxy {url!r} must be http://IP:PORT (the host's forward proxy)")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
        ipaddress.ip_address(host)
    except ValueError:
        raise problem from None
    if parts.scheme != "http" or port is None or parts.path not in ("", "/") or parts.username or parts.query:
        raise problem
    return host, port


def check_metrics_listen(value: str) -> tuple[str, int]:
    """`IP:PORT` with a loopback IP (127.0.0.0/8, [::1]): the metrics are the host's, never the agent's."""
    import ipaddress

    problem = ConfigError(
        f"metrics_listen {value!r} must be a loopback IP:PORT such as 127.0.0.1:9737 (the metrics are read "
        "inside the VM, over the host's SSH login)"
    )
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        if not sep or not port.isdigit() or not ipaddress.ip_address(host).is_loopback:
            raise problem
    except ValueError:
        raise problem from None
    if not 0 < int(port) < 65536:
        raise problem
    return host, int(port)
