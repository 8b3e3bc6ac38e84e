"""The host's VM reaches the Telegram Bot API and the brokered destinations, and nothing else.

Enforced on the host, outside the guest, so root inside the guest cannot widen it:

* QEMU's user network turns every connection the guest makes into a socket of the
  QEMU process. An nftables table for QEMU's uid lets that uid send TCP only: replies
  on its own listening sockets (the forwarded proxy and SSH ports) and connections to
  the forward proxy on 127.0.0.1. No UDP at all, whatever conntrack says: a datagram a
  local user sent first to slirp's socket would make the guest's answer a "reply".
* tinyproxy, Debian's small forward proxy, holds the allow-list: `CONNECT host:port`
  (and for http destinations absolute URLs) of the listed destinations, default deny.
  It resolves names on the host. Root starts it on a port below 1024 (no local user can
  take that port if it dies); it drops to its own system user. Only QEMU's uid may
  connect to it: any other local user could hold its MaxClients connections.
* The same table keeps tinyproxy's uid away from loopback, private, link-local and
  metadata addresses unless a destination names that address literally: a listed
  name whose DNS answer points inside cannot open the host's or the LAN's services.
  Its DNS goes only to the host's resolvers (resolv.conf), and no destination may use
  port 53. An address of this host is reachable only when listed literally and only on
  a port below net.ipv4.ip_unprivileged_port_start: a listener on a higher port is
  whoever bound it last, and an agent binds an abandoned one to receive the brokered key.

The table is per QEMU uid (nftables matches the socket's owner), so each running host VM
runs QEMU as a user of its own; a second one with the same user is refused while the
first one's forward proxy runs. Changing the list makes tinyproxy read it again
(SIGUSR1; its files are root's, readable by its group), so neither the VM restarts
nor the port is ever let go. A guest reaches the proxy as 10.0.2.2 (slirp's name
for the host's loopback); the guest's proxy is told so in its config (`egress_proxy`).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import ipaddress
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vm_image import proc

from ..errors import InvalidInput, RestartError
from ..models import Endpoint
from .detached import start_detached
from .files import fsync_dir, prepared_by_others, write_atomic, write_json_atomic
from .ports import check_port_free
from .terminal import log_tail
from .users import ensure_system_user

RECORD_NAME = "egress.json"
PROCESS_NAME = "egress.process.json"
CONF_NAME = "egress.tinyproxy.conf"
FILTER_NAME = "egress.filter"
LOG_NAME = "egress.log"
PROPOSAL_NAME = "egress.proposal.json"  # what `egress sync` showed, for `sync --apply` to apply exactly
FILES = (RECORD_NAME, PROCESS_NAME, LOG_NAME, PROPOSAL_NAME)
CONFIG_ROOT = Path("/run/secret-proxy-vm-egress")  # tinyproxy's config and filter, per forward-proxy user
EGRESS_USER_PREFIX = "spvm-egress-"  # + QEMU's uid: one forward-proxy user per table (see nft_ruleset)
GUEST_SEES_HOST = "10.0.2.2"  # slirp: the guest's address for the host's loopback
START_TIMEOUT = 10.0
TABLE_PREFIX = "secret_proxy_vm_egress_uid"
HOST_NAME_RE = re.compile(r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
# Where tinyproxy may not connect unless a destination names the address itself.
INSIDE_V4 = (
    "0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, "
    "192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/3"
)
# fec0::/10 (site-local), 64:ff9b:1::/48 (local-use NAT64) and 2002::/16 (6to4, which embeds an IPv4
# address) as the broker's `blocked()` refuses them.
INSIDE_V6 = (
    "::/127, ::ffff:0.0.0.0/96, 64:ff9b::/96, 64:ff9b:1::/48, 2002::/16, fc00::/7, fe80::/10, fec0::/10, ff00::/8"
)
DNS_PORT = 53
RESOLV_CONF = Path("/etc/resolv.conf")
UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
# Where a new forward proxy listens: below 1024, so that if tinyproxy dies no local user can take
# its port and pose as it (an agent's own proxy there would forward the guest anywhere).
PROXY_PORTS = range(700, 1000)


@dataclass(frozen=True, order=True)
class Destination:
    """One place the guest may reach: scheme, host (a DNS name or an IP literal) and port."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Destination:
        """`https://api.example.com` or `http://127.0.0.1:8080/`: a path is allowed but not kept."""
        if not url.isprintable() or any(c.isspace() for c in url):  # urlsplit drops tabs and newlines
            raise InvalidInput(f"egress destination {url!r} holds spaces or control characters")
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise InvalidInput(f"egress destination {url!r} is not a URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise InvalidInput(f"egress destination {url!r} must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
            raise InvalidInput(f"egress destination {url!r} may not hold a user, password, query or fragment")
        host = (parts.hostname or "").lower()
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
            # The last label starts with a letter: "0x7f.1" or "2130706433" are addresses to a resolver.
            if not HOST_NAME_RE.fullmatch(host) or not host.rpartition(".")[2][:1].isalpha():
                raise InvalidInput(f"egress destination {url!r}: {host!r} is not a host name or IP address") from None
        if ip is not None and str(ip) != host:
            raise InvalidInput(f"egress destination {url!r}: write the address as {ip}")
        if ip is not None and ip in ipaddress.ip_network("10.0.2.0/24"):
            raise InvalidInput(
                f"egress destination {url!r} is an address of QEMU's user network, which means nothing on the host",
                hint=f"the forward proxy runs on the host: for the host's own loopback write 127.0.0.1, "
                f"not {GUEST_SEES_HOST}",
            )
        return cls(parts.scheme, host, port or (443 if parts.scheme == "https" else 80))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def filter_patterns(self) -> list[str]:
        """tinyproxy's regular expressions (POSIX ERE, with `FilterURLs On`) for this destination."""
        host = re.sub(r"([.\[\]])", r"\\\1", f"[{self.host}]" if ":" in self.host else self.host)
        patterns = [f"^{host}:{self.port}$"]  # CONNECT's request target
        if self.scheme == "http":  # a plain-HTTP client sends the absolute URL instead
            default = "(:80)?" if self.port == 80 else f":{self.port}"
            patterns.append(f"^http://{host}{default}/")
        return patterns


@dataclass(frozen=True)
class EgressPlan:
    """What the host's VM may reach, where the forward proxy listens, and whose QEMU it filters."""

    listen: Endpoint
    destinations: tuple[Destination, ...]
    qemu_user: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "listen": str(self.listen),
            "destinations": [d.url for d in self.destinations],
            "qemu_user": self.qemu_user,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EgressPlan:
        return cls(
            Endpoint.parse(data["listen"]),
            tuple(sorted({Destination.parse(u) for u in data["destinations"]})),
            str(data["qemu_user"]),
        )

    @property
    def guest_proxy_url(self) -> str:
        return f"http://{GUEST_SEES_HOST}:{self.listen.port}"

    def with_destinations(self, destinations: set[Destination]) -> EgressPlan:
        return EgressPlan(self.listen, tuple(sorted(destinations)), self.qemu_user)


def unprivileged_port_start() -> int:
    """The lowest port any local user may bind (net.ipv4.ip_unprivileged_port_start; 1024 by default)."""
    try:
        return int(UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        return 1024  # kernels before 4.11 have no such setting: the fixed limit


def is_host_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is this host's own (loopback, or an interface's): a local process may listen there."""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((str(ip), 0))  # succeeds only for a local address (no IP_FREEBIND here)
        except OSError:
            return False
    return True


def refuse_unsafe(destinations: set[Destination] | tuple[Destination, ...]) -> None:
    """Refuse to list a destination on the DNS port, or on this host at a port any local user may bind.

    Checked when a destination is listed (a stored list is enforced by the rules alone). Whoever
    listens on a host address receives what the VM sends there, a brokered key in its header
    included; an agent binds the port the moment its server stops (or before it starts). Below
    ip_unprivileged_port_start only root (or CAP_NET_BIND_SERVICE) can listen, which the kernel
    checks at every bind: no window. nftables enforces the same at each connection (nft_ruleset).
    """
    start = unprivileged_port_start()
    for d in sorted(destinations):
        if d.port == DNS_PORT:
            raise InvalidInput(
                f"egress destination {d.url} is on port {DNS_PORT}: the forward proxy reaches port {DNS_PORT} only "
                "for its own name resolution, at the host's resolvers, and a destination there would reach them",
                hint="a brokered API is not served on the DNS port; name its real port",
            )
        if d.ip is not None and d.port >= start and is_host_address(d.ip):
            raise InvalidInput(
                f"egress destination {d.url} is on this host, at a port any local user may listen on "
                f"(from {start} up): whoever binds it when its server is not running, an agent too, receives "
                "what the VM sends there, brokered keys included",
                hint=f"serve it on a port below {start} (only root or CAP_NET_BIND_SERVICE can listen there) "
                "and list that, e.g. http://127.0.0.1:900",
            )


def free_privileged_port(host: str, ports: range = PROXY_PORTS) -> int:
    """A port below 1024 that nobody holds on `host`, picked at random from `ports`."""
    candidates = [p for p in ports if p < unprivileged_port_start()]
    random.shuffle(candidates)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in candidates:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise RestartError(
        f"no free port in {ports.start}..{ports.stop - 1} below net.ipv4.ip_unprivileged_port_start "
        f"({unprivileged_port_start()}) on {host}: the forward proxy listens where no local user can",
        hint="free one of those ports, or set net.ipv4.ip_unprivileged_port_start back to 1024",
    )


def new_plan(urls: list[str], qemu_user: str | None) -> EgressPlan:
    """A plan for a new takeover: a free privileged loopback port for the forward proxy, and the listed URLs."""
    if not qemu_user:
        raise InvalidInput(
            "the egress filter needs QEMU to run as a user of its own (--qemu-user), not as root",
            hint="pass --qemu-user NAME, or --no-egress-filter and accept that the VM can reach anything",
        )
    destinations = tuple(sorted({Destination.parse(u) for u in urls}))
    refuse_unsafe(destinations)
    return EgressPlan(Endpoint("127.0.0.1", free_privileged_port("127.0.0.1")), destinations, qemu_user)


def host_resolvers(path: Path = RESOLV_CONF) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The name servers the host's resolver (glibc) asks: resolv.conf's first three, else 127.0.0.1."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append(ipaddress.ip_address(words[1].partition("%")[0]))
            except ValueError:
                continue  # glibc skips it too
    return found[:3] or [ipaddress.ip_address("127.0.0.1")]


def load_plan(host_dir: Path) -> EgressPlan | None:
    try:
        data = json.loads((host_dir / RECORD_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RestartError(f"{host_dir / RECORD_NAME} is unreadable: {exc}") from None
    return EgressPlan.from_dict(data)


def save_plan(host_dir: Path, plan: EgressPlan) -> None:
    write_json_atomic(host_dir / RECORD_NAME, plan.to_dict())


@dataclass(frozen=True)
class Proposal:
    """Destinations `egress sync` showed the operator, and their digest: `sync --apply` adds exactly
    these, never what the VM answers later (a guest could plant one between the two commands)."""

    destinations: tuple[Destination, ...]

    @property
    def digest(self) -> str:
        text = "\n".join(d.url for d in sorted(self.destinations))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def save_proposal(host_dir: Path, proposal: Proposal) -> None:
    write_json_atomic(
        host_dir / PROPOSAL_NAME,
        {"destinations": [d.url for d in proposal.destinations], "digest": proposal.digest},
    )


def take_proposal(host_dir: Path, digest: str | None) -> Proposal:
    """The list the last `sync` showed, if its digest is `digest` (when given); removed once taken."""
    path = host_dir / PROPOSAL_NAME
    try:
        data = json.loads(path.read_text())
        proposal = Proposal(tuple(sorted({Destination.parse(u) for u in data["destinations"]})))
    except FileNotFoundError:
        raise InvalidInput(
            "`egress sync --apply` applies the list `egress sync` showed, and there is none to apply",
            hint="run `python -m takeover egress sync`, read what it proposes, then `egress sync --apply DIGEST`",
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RestartError(f"{path} is unreadable: {exc}", hint=f"remove {path} and run `egress sync` again") from None
    if digest is not None and digest != proposal.digest:
        raise InvalidInput(
            f"the last list `egress sync` showed has digest {proposal.digest}, not {digest}: it is not the list "
            "you read (the VM's answer may have changed since)",
            hint="run `python -m takeover egress sync` again and apply the digest it prints",
        )
    path.unlink()
    return proposal


def tinyproxy_config(plan: EgressPlan, filter_path: Path, user: str, group: str) -> str:
    ports = sorted({d.port for d in plan.destinations})
    lines = [
        f"User {user}",
        f"Group {group}",
        f"Listen {plan.listen.host}",
        f"Port {plan.listen.port}",
        "Allow 127.0.0.1",
        "Timeout 120",
        "MaxClients 64",
        # Notice logs refusals; the connection-level lines would log plain-HTTP URLs.
        "LogLevel Notice",
        "DisableViaHeader Yes",
        "FilterType ere",
        f'Filter "{filter_path}"',
        "FilterURLs On",
        "FilterDefaultDeny Yes",
        # CONNECT only to listed ports; with no destination at all, to none (0 is no port).
        *(f"ConnectPort {p}" for p in ports or [0]),
    ]
    return "\n".join(lines) + "\n"


def filter_text(plan: EgressPlan) -> str:
    lines = [p for d in plan.destinations for p in d.filter_patterns()]
    return "\n".join(lines or ["^$"]) + "\n"  # an empty filter file is an error to tinyproxy


def table_name(qemu_uid: int) -> str:
    return f"{TABLE_PREFIX}{qemu_uid}"


def nft_ruleset(
    plan: EgressPlan,
    host_dir: Path,
    qemu_uid: int,
    egress_uid: int,
    resolvers: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    unprivileged_start: int,
) -> str:
    """One atomic nft transaction: replace this QEMU uid's table with the plan's rules."""
    name = table_name(qemu_uid)
    literal4 = sorted({f"{d.ip} . {d.port}" for d in plan.destinations if d.ip is not None and d.ip.version == 4})
    literal6 = sorted({f"{d.ip} . {d.port}" for d in plan.destinations if d.ip is not None and d.ip.version == 6})
    dns4 = sorted({str(r) for r in resolvers if r.version == 4})
    dns6 = sorted({str(r) for r in resolvers if r.version == 6})
    proxy = plan.listen
    family = "ip6" if ":" in proxy.host else "ip"
    eu = f"meta skuid {egress_uid}"
    rules = [
        # The forward proxy serves QEMU's uid alone: another local user could hold its MaxClients.
        f"{family} daddr {proxy.host} tcp dport {proxy.port} ct state new meta skuid != {qemu_uid} counter reject",
        # The host's VM: TCP only, whatever conntrack says (a local user's datagram to slirp's UDP
        # socket would make the guest's answer "established"); replies on its own listening sockets
        # (the forwarded ports: others opened those), and connections to the forward proxy.
        f"meta skuid {qemu_uid} meta l4proto != tcp counter reject",
        f"meta skuid {qemu_uid} ct direction reply ct state established accept",
        f"meta skuid {qemu_uid} {family} daddr {proxy.host} tcp dport {proxy.port} accept",
        f"meta skuid {qemu_uid} counter reject",
        # The forward proxy: names resolve at the host's resolvers only (no destination has port 53).
        *(f"{eu} ip daddr {{ {', '.join(dns4)} }} {p} dport {DNS_PORT} accept" for p in ("udp", "tcp") if dns4),
        *(f"{eu} ip6 daddr {{ {', '.join(dns6)} }} {p} dport {DNS_PORT} accept" for p in ("udp", "tcp") if dns6),
        f"{eu} meta l4proto != tcp counter reject",
        # This host's own addresses at a port any local user may bind: whoever listens there is not
        # the destination, even one listed literally (an agent binds it once the server is gone).
        f"{eu} ct state new fib daddr type local tcp dport >= {unprivileged_start} counter reject",
        *([f"{eu} ip daddr . tcp dport {{ {', '.join(literal4)} }} accept"] if literal4 else []),
        *([f"{eu} ip6 daddr . tcp dport {{ {', '.join(literal6)} }} accept"] if literal6 else []),
        f"{eu} ct state new fib daddr type local counter reject",
        f"{eu} ct state new ip daddr {{ {INSIDE_V4} }} counter reject",
        f"{eu} ct state new ip6 daddr {{ {INSIDE_V6} }} counter reject",
    ]
    body = "\n".join(f"    {r}" for r in rules)
    return (
        f"table inet {name} {{}}\n"
        f"delete table inet {name}\n"
        f"table inet {name} {{\n"
        f'  comment "{host_dir}"\n'
        f"  chain output {{\n"
        f"    type filter hook output priority 0; policy accept;\n"
        f"{body}\n"
        f"  }}\n"
        f"}}\n"
    )


def run_nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    return subprocess.run([nft, *args], input=stdin, capture_output=True, text=True, timeout=30)


def table_owner(qemu_uid: int) -> str | None:
    """The host directory whose VM this uid's table filters (its comment), or None if there is none."""
    out = run_nft(["list", "table", "inet", table_name(qemu_uid)])
    if out.returncode != 0:
        return None
    # nft 1.0.6's JSON leaves the comment out; the text form has it on the table's second line.
    found = re.search(r'^\s*comment "([^"]*)"$', out.stdout, re.MULTILINE)
    return found.group(1) if found else ""


def in_use(host_dir: Path) -> bool:
    """Whether another host directory's VM still relies on its table: its forward proxy runs."""
    try:
        return (host_dir / RECORD_NAME).is_file() and running_pid(host_dir) is not None
    except OSError:
        return False


def egress_user(qemu_uid: int) -> str:
    """The forward proxy's own user for this QEMU uid. Not shared: every table rejects its forward
    proxy's inside addresses but the ones it lists, and nftables lets any table's reject win."""
    return f"{EGRESS_USER_PREFIX}{qemu_uid}"


def apply_rules(plan: EgressPlan, host_dir: Path, qemu_uid: int) -> None:
    owner = table_owner(qemu_uid)
    if owner is not None and owner != str(host_dir) and in_use(Path(owner)):
        raise RestartError(
            f"QEMU's user {plan.qemu_user} (uid {qemu_uid}) already runs the host VM of {owner}; the egress "
            "filter matches connections by that user, so two VMs cannot share it",
            hint="give this takeover a QEMU user of its own (--qemu-user NAME)",
        )
    egress_uid = pwd.getpwnam(egress_user(qemu_uid)).pw_uid
    # Read at each enforce: `takeover start` and every list change follow the host's resolvers.
    ruleset = nft_ruleset(plan, host_dir, qemu_uid, egress_uid, host_resolvers(), unprivileged_port_start())
    out = run_nft(["-f", "-"], ruleset)
    if out.returncode != 0:
        raise RestartError(
            f"nftables refused the egress rules: {out.stderr.strip()[-400:]}",
            hint="install nftables (apt-get install nftables) on a kernel with nf_tables, or pass "
            "--no-egress-filter and accept that the VM can reach anything",
        )


def remove_rules(plan: EgressPlan, host_dir: Path) -> bool:
    try:
        qemu_uid = pwd.getpwnam(plan.qemu_user).pw_uid
    except KeyError:
        return False
    if table_owner(qemu_uid) != str(host_dir):
        return False
    return run_nft(["delete", "table", "inet", table_name(qemu_uid)]).returncode == 0


# -- the forward proxy's process ------------------------------------------------------------------


def _process_record(host_dir: Path) -> dict[str, int] | None:
    try:
        data = json.loads((host_dir / PROCESS_NAME).read_text())
        if data["boot_id"] != proc.current_boot_id():
            return None
        return {"pid": int(data["pid"]), "start_ticks": int(data["start_ticks"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_pid(host_dir: Path) -> int | None:
    """tinyproxy's pid if the one this host directory started is still running."""
    record = _process_record(host_dir)
    if record is None or not proc.alive(record["pid"], record["start_ticks"]):
        return None
    return record["pid"]


def stop_forward_proxy(host_dir: Path) -> bool:
    record = _process_record(host_dir)
    (host_dir / PROCESS_NAME).unlink(missing_ok=True)
    if record is None or not proc.alive(record["pid"], record["start_ticks"]):
        return False
    proc.terminate(record["pid"], record["start_ticks"], grace=5)
    return True


def config_dir(user: str) -> Path:
    """Where tinyproxy's config and filter live: root's files its own user can read, so that a change
    is a reload (SIGUSR1) and the port is never let go (an agent could take it in the gap)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
        raise InvalidInput(f"forward proxy user {user!r} is not a plain user name")
    return CONFIG_ROOT / user


def write_config(plan: EgressPlan, user: str) -> Path:
    entry = pwd.getpwnam(user)
    group = grp.getgrgid(entry.pw_gid)
    for directory, mode, gid in ((CONFIG_ROOT, 0o755, 0), (config_dir(user), 0o750, group.gr_gid)):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            pass
        reason = prepared_by_others(directory)  # root's: the takeover runs as root
        if reason is not None:
            raise RestartError(f"{directory} {reason}; someone else may have prepared it", hint=f"remove {directory}")
        os.chown(directory, 0, gid, follow_symlinks=False)
        os.chmod(directory, mode, follow_symlinks=False)
    conf, filt = config_dir(user) / CONF_NAME, config_dir(user) / FILTER_NAME
    for path, text in ((filt, filter_text(plan)), (conf, tinyproxy_config(plan, filt, user, group.gr_name))):
        # 0640: root writes it, tinyproxy's user reads it again at a reload.
        write_atomic(path, text.encode(), mode=0o640, gid=group.gr_gid)
    return conf


def reload_forward_proxy(plan: EgressPlan, host_dir: Path, user: str) -> int | None:
    """Tell the running tinyproxy to read its list again; its pid, or None if none runs or it died of it."""
    pid = running_pid(host_dir)
    if pid is None:
        return None
    write_config(plan, user)
    os.kill(pid, signal.SIGUSR1)
    time.sleep(0.3)  # the reload is synchronous in tinyproxy's main loop; a failed one ends the process
    if running_pid(host_dir) != pid or (plan.listen.host, plan.listen.port) not in proc.listening_tcp(pid):
        return None
    return pid


def start_forward_proxy(plan: EgressPlan, host_dir: Path, user: str) -> int:
    """Start tinyproxy for `plan`, dropping to `user`, or reload the running one; the port must be free."""
    binary = shutil.which("tinyproxy")
    if binary is None:
        raise RestartError(
            "tinyproxy is not installed; it is the host-side allow-list of the VM's egress",
            hint="apt-get install tinyproxy-bin, or pass --no-egress-filter and accept that the VM can reach anything",
        )
    reloaded = reload_forward_proxy(plan, host_dir, user)
    if reloaded is not None:
        return reloaded
    stop_forward_proxy(host_dir)
    check_port_free(plan.listen, "the egress proxy's port")
    conf = write_config(plan, user)
    child = start_detached(
        [binary, "-d", "-c", str(conf)],
        host_dir / LOG_NAME,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        append=True,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while (plan.listen.host, plan.listen.port) not in proc.listening_tcp(child.pid):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise RestartError(
                f"tinyproxy did not start on {plan.listen}: {log_tail(host_dir / LOG_NAME)}",
                hint="read the log; the port may have been taken meanwhile",
            )
        time.sleep(0.05)
    write_json_atomic(
        host_dir / PROCESS_NAME,
        {"boot_id": proc.current_boot_id(), "pid": child.pid, "start_ticks": proc.start_ticks(child.pid)},
    )
    fsync_dir(host_dir)
    return child.pid


def enforce(plan: EgressPlan, host_dir: Path) -> dict[str, Any]:
    """Rules first, then the proxy: the VM never runs with a wider path out than the plan's."""
    ensure_system_user(plan.qemu_user, "secret-proxy-vm QEMU", host_dir=host_dir)
    qemu_uid = pwd.getpwnam(plan.qemu_user).pw_uid
    user = egress_user(qemu_uid)
    ensure_system_user(user, f"secret-proxy-vm egress proxy for {plan.qemu_user}", host_dir=host_dir)
    apply_rules(plan, host_dir, qemu_uid)
    save_plan(host_dir, plan)
    pid = start_forward_proxy(plan, host_dir, user)
    return {**plan.to_dict(), "forward_proxy_pid": pid, "nft_table": table_name(qemu_uid)}


def release(host_dir: Path, *, drop_rules: bool = False) -> dict[str, Any]:
    """Stop the forward proxy. The rules stay while the host's VM may run again (they only ever
    narrow what QEMU's own user can reach); a rollback, which gives the VM back, drops them."""
    plan = load_plan(host_dir)
    if plan is None:
        return {"egress": "none"}
    stopped = stop_forward_proxy(host_dir)
    removed = False
    if drop_rules:
        removed = remove_rules(plan, host_dir)
        with contextlib.suppress(OSError, KeyError):
            shutil.rmtree(config_dir(egress_user(pwd.getpwnam(plan.qemu_user).pw_uid)))
    return {"forward_proxy_stopped": stopped, "rules_removed": removed}
