"""What the host counts in its VM's store over its pinned SSH login: secrets, agents, requests by status, audit length.

`takeover upgrade` reads them from the old VM just before stopping it and from the new one once it
serves; equal figures (and an intact audit chain) are what "nothing was lost" means. Only counts
cross: never a value, a token or a reason. Every answer is the guest's text, so each is bounded
and parsed strictly; a failure is a VerifyError that names the command.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from ..errors import VerifyError
from .ssh import SSHTarget
from .vm_checks import CLI

ANSWER_MAX = 64 * 1024 * 1024
CLI_TIMEOUT = 300.0  # a CLI start under TCG takes seconds; a store of many requests, more
AUDIT_INTACT = re.compile(r"^audit log intact: (\d+) entries$")


@dataclass(frozen=True)
class Figures:
    secrets: int
    agents: int
    audit_entries: int
    requests: dict[str, int] = field(default_factory=dict)  # status -> count

    def differences(self, after: Figures) -> list[str]:
        """What `after` counts differently, in words; empty when nothing was lost or added."""
        found = []
        for what in ("secrets", "agents", "audit_entries"):
            if getattr(self, what) != getattr(after, what):
                found.append(f"{what.replace('_', ' ')}: {getattr(self, what)} before, {getattr(after, what)} after")
        for status in sorted(set(self.requests) | set(after.requests)):
            was, now = self.requests.get(status, 0), after.requests.get(status, 0)
            if was != now:
                found.append(f"{status} requests: {was} before, {now} after")
        return found

    def words(self) -> str:
        requests = ", ".join(f"{n} {status}" for status, n in sorted(self.requests.items())) or "none"
        return (
            f"{self.secrets} secrets, {self.agents} agent tokens, requests: {requests}, "
            f"audit chain of {self.audit_entries} entries (intact)"
        )


def read_figures(ssh: SSHTarget) -> Figures:
    """The store's counts, read by the operator CLI in the VM; the audit chain must verify."""
    secrets = _lines(_run(ssh, "secrets", "list"))
    agents = _lines(_run(ssh, "agents", "list"))
    # `requests list` expires what is due first (and audits it): the chain's length is read after it.
    try:
        listed = json.loads(_run(ssh, "requests", "list", "--json"))
        statuses = Counter(str(item["status"]) for item in listed)
    except (ValueError, TypeError, KeyError) as exc:
        raise VerifyError(
            f"`secret-proxy requests list --json` in the VM is not what the proxy prints: {exc}"
        ) from None
    verified = _run(ssh, "audit", "verify").strip()
    match = AUDIT_INTACT.match(verified)
    if match is None:
        raise VerifyError(f"`secret-proxy audit verify` in the VM says {verified[-300:]!r}, not that it is intact")
    return Figures(len(secrets), len(agents), int(match.group(1)), dict(sorted(statuses.items())))


def _run(ssh: SSHTarget, *words: str) -> str:
    result = ssh.run(CLI, *words, timeout=CLI_TIMEOUT)
    if result.returncode != 0:
        raise VerifyError(
            f"`secret-proxy {' '.join(words)}` failed in the VM (exit {result.returncode}): "
            f"{(result.stdout + result.stderr).strip()[-300:]}"
        )
    if len(result.stdout) > ANSWER_MAX:
        raise VerifyError(f"`secret-proxy {' '.join(words)}` printed more than {ANSWER_MAX} bytes")
    return result.stdout


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]
