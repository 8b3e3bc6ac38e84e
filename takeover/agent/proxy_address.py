"""Where the host's VM serves the proxy: the host decides, not the agent's ready file.

The address becomes the host QEMU's `hostfwd` rule, bound while that QEMU is
still root. Taken from the ready file as written, `0.0.0.0:443` would put the
proxy on every interface and a privileged port, and an IPv6 scope id
(`1::%,hostfwd=...`) would smuggle text into QEMU's -netdev option (the
Endpoint type refuses scope ids). So, unless the operator names the address
with --proxy-listen:

- the address must be one the agent's QEMU really forwarded to the guest's
  proxy port: in QEMU's `info usernet` *and* held in LISTEN by that very
  process according to the kernel (/proc/PID/net/tcp);
- it must be IPv4 loopback (127.0.0.0/8), with a port of 1024 or more.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from vm_image.guest_files import PROXY_PORT as GUEST_PROXY_PORT

from ..errors import UnsafeProxyAddress
from ..models import Endpoint

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
FIRST_UNPRIVILEGED_PORT = 1024
# HMP `info usernet`:  "  TCP[HOST_FORWARD]  13       127.0.0.1 45123       10.0.2.15  3737     0     0"
HOST_FORWARD = re.compile(r"^\s*TCP\[HOST_FORWARD\]\s+-?\d+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)\b", re.MULTILINE)


@dataclass(frozen=True)
class Forward:
    host: str  # "0.0.0.0" for every interface ("*" in QEMU's listing)
    port: int
    guest_port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port} -> guest port {self.guest_port}"


def parse_usernet(text: str) -> list[Forward]:
    forwards = []
    for host, port, _guest, guest_port in HOST_FORWARD.findall(text):
        forwards.append(Forward("0.0.0.0" if host == "*" else host, int(port), int(guest_port)))
    return forwards


def confirmed_forwards(usernet: str, listening: set[tuple[str, int]]) -> list[Forward]:
    """The forwards QEMU reports that the kernel shows the same process listening on."""
    return [f for f in parse_usernet(usernet) if (f.host, f.port) in listening]


def choose_proxy_address(claimed: Endpoint | None, forwards: list[Forward], operator: Endpoint | None) -> Endpoint:
    """The operator's --proxy-listen if given; else the agent's address, checked against its QEMU and the policy."""
    if operator is not None:
        return operator
    to_proxy = [f for f in forwards if f.guest_port == GUEST_PROXY_PORT]
    seen = ", ".join(str(f) for f in forwards) or "nothing"
    if claimed is not None:
        if not any((f.host, f.port) == (claimed.host, claimed.port) for f in to_proxy):
            raise UnsafeProxyAddress(
                f"the ready file puts the proxy at {claimed}, but the agent's QEMU does not "
                f"forward that address to the guest's port {GUEST_PROXY_PORT} (it forwards "
                f"{seen})"
            )
        chosen = claimed
    elif len(to_proxy) == 1:
        chosen = Endpoint(to_proxy[0].host, to_proxy[0].port)
    else:
        raise UnsafeProxyAddress(
            f"cannot tell the proxy's address: the agent's QEMU forwards {seen}, and "
            f"{len(to_proxy)} of those to the guest's port {GUEST_PROXY_PORT}"
        )
    check_agent_address(chosen)
    return chosen


def check_agent_address(endpoint: Endpoint) -> None:
    address = ipaddress.ip_address(endpoint.host)
    if address.version != 4 or address not in LOOPBACK:
        raise UnsafeProxyAddress(
            f"the agent's proxy address {endpoint} is not an IPv4 loopback address; the "
            f"host's QEMU would serve the proxy beyond this machine"
        )
    if endpoint.port < FIRST_UNPRIVILEGED_PORT:
        raise UnsafeProxyAddress(
            f"the agent's proxy address {endpoint} is a privileged port (below "
            f"{FIRST_UNPRIVILEGED_PORT}); the host's QEMU binds it as root"
        )
