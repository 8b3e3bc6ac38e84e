"""Serving the proxy back to an agent machine: on which address, and so that only that machine reaches it.

Where the agent runs in a machine of its own, the host's VM listens on an address of this host
that the machine reaches (`--serve-on`, by default this host's side of the route to the machine:
Multipass's or libvirt's bridge). An address on a bridge is reachable by every machine on that
bridge, and by every local user; so an nftables table, applied before QEMU binds the port and
removed when the VM stops, lets through exactly:

- the agent machine's own address, from outside this host (input hook);
- root's own connections on this host (output hook: the takeover's checks of /health).

Everything else to that address and port is dropped (from elsewhere: no answer at all) or refused
(a local user: at once). The VM's SSH is forwarded on loopback only, never here.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

from ..errors import InvalidInput, RestartError
from ..models import Endpoint
from .egress import run_nft
from .ports import bind_refusal

TABLE_PREFIX = "secret_proxy_vm_serve_"


def route_source(machine_ip: str) -> str:
    """This host's address on the route to `machine_ip`: where the machine reaches us."""
    ip = _ip_literal(machine_ip, "the agent machine's address")
    done = subprocess.run(["ip", "-j", "route", "get", ip], capture_output=True, text=True, timeout=10)
    try:
        source = json.loads(done.stdout)[0]["prefsrc"]
    except (ValueError, LookupError, TypeError):
        raise InvalidInput(
            f"this host has no route to the agent machine {ip}: {done.stderr.strip()[-200:]}",
            hint="pass --serve-on ADDRESS:PORT, an address of this host the agent machine reaches",
        ) from None
    return _ip_literal(str(source), "the route's source address")


def check_serve_on(serve_on: Endpoint, machine_ip: str) -> None:
    """An address of this host, not loopback nor 'every address', free to bind, not the machine's own."""
    address = ipaddress.ip_address(serve_on.host)
    if address.is_loopback or address.is_unspecified or address.is_multicast:
        raise InvalidInput(
            f"--serve-on {serve_on}: the agent machine cannot reach a loopback address, and "
            f"{address} would serve the proxy to every network of this host",
            hint="name this host's address on the agent machine's network (e.g. the bridge's)",
        )
    if serve_on.host == machine_ip:
        raise InvalidInput(f"--serve-on {serve_on} is the agent machine's own address, not this host's")
    reason = bind_refusal(serve_on, reuse_addr=True)  # as QEMU binds it: a TIME_WAIT from an earlier VM holds nothing
    if reason is not None:
        raise InvalidInput(
            f"--serve-on {serve_on} cannot be served from this host: {reason}",
            hint="name an address of this host (ip -brief address) and a port nothing else holds",
        )


def table_name(serve_on: Endpoint) -> str:
    return f"{TABLE_PREFIX}{serve_on.port}"


def ruleset(serve_on: Endpoint, machine_ip: str, host_dir: Path) -> str:
    """One atomic nft transaction: this served port's table replaced by its two rules."""
    family = "ip6" if ":" in serve_on.host else "ip"
    if ("ip6" if ":" in machine_ip else "ip") != family:
        raise InvalidInput(f"--serve-on {serve_on} and the agent machine {machine_ip} are not of one IP family")
    to_us = f"{family} daddr {serve_on.host} tcp dport {serve_on.port}"
    name = table_name(serve_on)
    return (
        f"table inet {name} {{}}\n"
        f"delete table inet {name}\n"
        f"table inet {name} {{\n"
        f'  comment "{host_dir}"\n'
        f"  chain input {{\n"
        f"    type filter hook input priority -5; policy accept;\n"
        f'    {to_us} iifname != "lo" {family} saddr != {machine_ip} counter drop\n'
        f"  }}\n"
        f"  chain output {{\n"
        f"    type filter hook output priority -5; policy accept;\n"
        f"    {to_us} meta skuid != 0 counter reject with tcp reset\n"
        f"  }}\n"
        f"}}\n"
    )


def apply(serve_on: Endpoint, machine_ip: str, host_dir: Path) -> str:
    """Let only the agent machine (and root here) reach `serve_on`; returns the table's name."""
    out = run_nft(["-f", "-"], ruleset(serve_on, _ip_literal(machine_ip, "the agent machine's address"), host_dir))
    if out.returncode != 0:
        raise RestartError(
            f"nftables refused the rules that keep {serve_on} to the agent machine: {out.stderr.strip()[-300:]}",
            hint="install nftables (apt-get install nftables); the VM was not started without them",
        )
    return table_name(serve_on)


def remove(serve_on: Endpoint) -> bool:
    return run_nft(["delete", "table", "inet", table_name(serve_on)]).returncode == 0


def _ip_literal(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise InvalidInput(
            f"{what} {text!r} is not an IP address; the served address is filtered by address",
            hint="name the agent machine by its IP address in --agent-machine",
        ) from None
