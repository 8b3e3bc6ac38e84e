"""The agent tools' configuration: one typed object, read from the environment in one place.

SECRET_PROXY_URL        the proxy's base URL, e.g. http://10.0.2.2:3737
SECRET_PROXY_TOKEN      the agent's token, or
SECRET_PROXY_TOKEN_FILE a file holding it (better: not in the environment of every child)
SECRET_PROXY_MCP_WAIT   seconds an MCP tool call waits for a decision before it answers "pending"
SECRET_PROXY_MCP_RETURN_VALUES
                        1 (or true, yes): the MCP server offers `request_secret`, which returns a value
                        into the model's context; unset, no tool ever does

Where the host took the proxy over from an agent machine, it wrote the served address to
/etc/secret-proxy/url and the agent's token to /etc/secret-proxy/token (takeover/agent/nested_vm.py):
they are used when the variables above are unset.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UsageError

MACHINE_URL_FILE = Path("/etc/secret-proxy/url")
MACHINE_TOKEN_FILE = Path("/etc/secret-proxy/token")
DEFAULT_MCP_WAIT_SECONDS = 45.0  # under the 60 s many MCP clients give a tool call
MAX_MCP_WAIT_SECONDS = 600.0


@dataclass(frozen=True)
class AgentConfig:
    url: str
    token: str = field(repr=False)
    mcp_wait_seconds: float = DEFAULT_MCP_WAIT_SECONDS
    mcp_return_values: bool = False


def load_config(env: Mapping[str, str] | None = None) -> AgentConfig:
    env = os.environ if env is None else env
    url = env.get("SECRET_PROXY_URL", "").strip() or _machine_file(MACHINE_URL_FILE)
    if not url:
        raise UsageError(
            "SECRET_PROXY_URL is not set",
            hint="export SECRET_PROXY_URL=http://HOST:PORT (the proxy's address, e.g. http://127.0.0.1:3737)",
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise UsageError(
            f"SECRET_PROXY_URL is not an http(s) base URL: {url!r}", hint="set it like http://127.0.0.1:3737"
        )
    return AgentConfig(
        url=url.rstrip("/"),
        token=_token(env),
        mcp_wait_seconds=_mcp_wait(env),
        mcp_return_values=_opted_in(env, "SECRET_PROXY_MCP_RETURN_VALUES"),
    )


def _opted_in(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise UsageError(f"{name} must be 1 or 0 (true/false, yes/no): {raw!r}", hint=f"unset {name} for the default (0)")


def _token(env: Mapping[str, str]) -> str:
    inline, path = env.get("SECRET_PROXY_TOKEN", "").strip(), env.get("SECRET_PROXY_TOKEN_FILE", "").strip()
    if inline and path:
        raise UsageError(
            "both SECRET_PROXY_TOKEN and SECRET_PROXY_TOKEN_FILE are set",
            hint="unset one of them (the file is better: children do not inherit it)",
        )
    if inline:
        return inline
    if not path and MACHINE_TOKEN_FILE.exists():
        path = str(MACHINE_TOKEN_FILE)
    if not path:
        raise UsageError(
            "no agent token: neither SECRET_PROXY_TOKEN nor SECRET_PROXY_TOKEN_FILE is set",
            hint="export SECRET_PROXY_TOKEN_FILE=/path/to/token (the file the operator gave you)",
        )
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a text file"
        raise UsageError(
            f"cannot read SECRET_PROXY_TOKEN_FILE {path}: {reason}",
            hint="point it at the agent's token file, readable by this user",
        ) from None
    if not token:
        raise UsageError(f"SECRET_PROXY_TOKEN_FILE {path} is empty", hint="put the agent's token in it")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(
            f"secret-proxy-agent: warning: the token file {Path(path)} is open to other users "
            f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it",
            file=sys.stderr,
        )
    return token


def _mcp_wait(env: Mapping[str, str]) -> float:
    raw = env.get("SECRET_PROXY_MCP_WAIT", "").strip()
    if not raw:
        return DEFAULT_MCP_WAIT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_MCP_WAIT_SECONDS:
        raise UsageError(
            f"SECRET_PROXY_MCP_WAIT must be a number of seconds from 0 to {MAX_MCP_WAIT_SECONDS:g}",
            hint=f"unset it for the default ({DEFAULT_MCP_WAIT_SECONDS:g} s)",
        )
    return seconds


def _machine_file(path: Path) -> str:
    """The first line of a file the takeover wrote in this machine, or "" when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(4096).strip().splitlines()[0] if path.stat().st_size else ""
    except (OSError, UnicodeDecodeError, IndexError):
        return ""
