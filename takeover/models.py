"""Plain data passed between the runbook's steps and kept in the journal."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput
from .record import from_record, to_record

CHECKPOINT_TAG = "takeover-checkpoint"
# The host's VM booted and checked in private, resumed at the cut-over, deleted once verified (steps/first_boot.py).
PREPARED_TAG = "takeover-prepared"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __post_init__(self) -> None:
        # Both end up in a QEMU hostfwd rule and in URLs: only an IP literal and a real port. Python
        # accepts an IPv6 scope id after '%' with any text in it ("1::%,hostfwd=..."): never one here.
        if not isinstance(self.host, str) or "%" in self.host:
            raise InvalidInput(f"address {self.host!r} is not a plain IP address (no IPv6 scope id)")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise InvalidInput(f"address {self.host!r} is not an IP address") from None
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise InvalidInput(f"port {self.port!r} is not a TCP port number")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidInput(f"{text!r} is not HOST:PORT (for example 127.0.0.1:2223)")
        return cls(host.strip("[]"), int(port))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class SourceVM:
    """The agent's VM as step 1 found and checked it; what a rollback needs to start it again."""

    monitor: str
    disk: str  # real path, checked against what QEMU has open
    disk_dev: int
    disk_ino: int
    disk_uid: int
    pid: int  # from the socket's peer credentials, not from the ready file
    pid_start_ticks: int
    uid: int  # the QEMU process's owner: the agent; a rollback runs QEMU as this user again
    gid: int
    groups: list[int]
    cwd: str
    cmdline: list[str]
    proxy: Endpoint
    memory_mb: int
    cpus: int
    block_nodes: list[str]  # writable qcow2 nodes that take part in the checkpoint
    vmstate_node: str
    ready_file: str | None = None
    pidfile: str | None = None
    setup_key_pub: str | None = None
    notes: list[str] = field(default_factory=list)
    # Set when the agent's VM was nested in an agent machine (agent/nested_vm.py): then every path,
    # pid and id above is that machine's, and its claim; `proxy` is where the host serves the proxy
    # back to it, and `machine_proxy` where the nested VM served it inside the machine.
    machine: str | None = None
    machine_proxy: Endpoint | None = None

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = to_record(self)
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceVM:
        # Earlier versions also wrote `agent_files`, never read: from_record ignores it, so their journals resume.
        return from_record(cls, data, "step find_vm's result")
