"""Settings are read by their type, not by the text of their annotation."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from proxy import config
from proxy.config import ConfigError, Settings, load_settings


def _as_text(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


@pytest.mark.parametrize("name", [f.name for f in fields(Settings) if f.name != "data_dir"])
def test_every_setting_read_from_the_environment_is_its_own_type(name, tmp_path):
    default = getattr(Settings(), name)
    if name == "telegram_token":
        return  # a token needs a chat id; its type is plain text like the others below
    sample = {
        "egress_proxy": "http://127.0.0.1:3128",
        "metrics_listen": "127.0.0.1:9737",
        "telegram_approvers": (1, 2),
    }.get(name, default)
    loaded = load_settings(env={"SECRET_PROXY_" + name.upper(): _as_text(sample) or "x"}, data_dir=tmp_path)
    value = getattr(loaded, name)
    assert type(value) is type(default), (name, value)


def test_a_bool_setting_is_parsed_not_taken_as_a_truthy_string(monkeypatch):
    monkeypatch.setattr(config, "_setting_types", lambda: {"flag": bool})
    assert config._coerce("flag", "false") is False
    assert config._coerce("flag", "yes") is True
    assert config._coerce("flag", True) is True
    with pytest.raises(ConfigError, match="expected bool"):
        config._coerce("flag", "maybe")


def test_a_toml_table_for_a_number_is_refused_with_the_settings_name(tmp_path: Path):
    (tmp_path / "config.toml").write_text("port = [1, 2]\n")
    with pytest.raises(ConfigError, match="'port'.*expected int"):
        load_settings(env={}, data_dir=tmp_path)
