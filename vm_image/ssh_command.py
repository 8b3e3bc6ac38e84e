"""The ssh command lines, built in one place: the host's pinned login and the agent's own.

Every one runs with `-F /dev/null`, so no user or system ssh_config can add options, keys
or a ProxyCommand, and with `--` before the remote command. The host's login after the
takeover pins the key it made (`takeover.verify.SSHTarget`). The agent's login to the VM
it built a moment ago has no earlier host key to pin (the manifest holds the fingerprint
for whoever wants to compare), so it does not check one: `agent_login_argv`, for the
agent's setup, the benchmarks, the demo and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

AGENT_LOGIN_OPTIONS = (
    "BatchMode=yes",
    "StrictHostKeyChecking=no",
    "UserKnownHostsFile=/dev/null",
    "LogLevel=ERROR",
    "IdentitiesOnly=yes",
    "ConnectTimeout=30",
)


def ssh_argv(
    host: str, port: int, user: str, remote: Sequence[str], *, options: Sequence[str], key: Path | None
) -> list[str]:
    """ssh to `user@host:port` running `remote`, with `options` (each one `-o`) and `key` if any."""
    argv = ["ssh", "-F", "/dev/null"]
    for option in options:
        argv += ["-o", option]
    if key is not None:
        argv += ["-i", str(key)]
    return [*argv, "-p", str(port), f"{user}@{host}", "--", *remote]


def agent_login_argv(
    port: int, *remote: str, key: Path | None = None, user: str = "proxy", options: Sequence[str] = ()
) -> list[str]:
    """The agent's ssh to its VM forwarded on 127.0.0.1:`port` (no `key`: only what `options` allow)."""
    return ssh_argv("127.0.0.1", port, user, remote, options=(*AGENT_LOGIN_OPTIONS, *options), key=key)
