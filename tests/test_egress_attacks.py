"""Issue 19: the ways around the host's egress filter that a local user or a rooted guest had, each played for real.

The agent is a real unprivileged user of this machine; a real user stands in for the host VM's
QEMU (the rules match sockets by owner, so what it can send is what the guest can send through
slirp); nftables and tinyproxy are the real ones. Every target is a listener on 127.0.0.1 that
this test starts, and a block is proven by that listener seeing nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeover import runbook
from takeover.cli import build_parser, config_from_args, main
from takeover.config import TakeoverConfig
from takeover.errors import InvalidInput
from takeover.host import egress
from takeover.host.egress import Destination, EgressPlan
from takeover.host.files import ensure_host_dir
from tests.egress_helpers import as_user, finish, privileged_listener, through_proxy
from tests.takeover_helpers import ensure_user

pytestmark = pytest.mark.root

QEMU_STANDIN = "spvm-egress-qemu"
AGENT = "spvm-egress-agent"


@pytest.fixture
def host_dir(tmp_path: Path) -> Iterator[Path]:
    ensure_user(QEMU_STANDIN)
    ensure_user(AGENT)
    path = ensure_host_dir(tmp_path / "host")
    yield path
    egress.release(path, drop_rules=True)


# 1 -------------------------------------------------------------------------------------------------

QEMU_UDP_ECHO = """
import socket
import subprocess
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
s.settimeout(15)
data, peer = s.recvfrom(100)
try:
    s.sendto(b"answer-from-the-guest", peer)
    print("sent")
except OSError as exc:
    print(type(exc).__name__)
"""

QEMU_TCP_FORWARD = """
import socket
import subprocess
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
s.settimeout(15)
conn, _ = s.accept()
conn.sendall(b"served-by-the-vm")
conn.close()
"""

AGENT_UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.settimeout(3)
s.sendto(b"hello-slirp", ("127.0.0.1", int(sys.argv[1])))
try:
    print(s.recvfrom(100)[0].decode())
except TimeoutError:
    print("nothing")
"""


def test_a_local_users_datagram_to_slirps_socket_gets_no_answer_from_the_guest(host_dir):
    """A datagram a local user sends first made QEMU's answer an "established" reply: a two-way channel."""
    egress.enforce(egress.new_plan([], QEMU_STANDIN), host_dir)
    qemu = as_user(QEMU_STANDIN, QEMU_UDP_ECHO)
    assert qemu.stdout is not None
    udp_port = int(qemu.stdout.readline())
    assert finish(as_user(AGENT, AGENT_UDP_ASK, str(udp_port))) == ["nothing"]
    assert finish(qemu) in (["sent"], ["PermissionError"])  # sent into the reject, or refused at once
    # What QEMU's uid must still do: answer on its forwarded (listening) TCP ports.
    forward = as_user(QEMU_STANDIN, QEMU_TCP_FORWARD)
    assert forward.stdout is not None
    tcp_port = int(forward.stdout.readline())
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as conn:
        assert conn.recv(100) == b"served-by-the-vm"
    finish(forward)


# 2 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["https://localhost:53", "https://127.0.0.1:53", "http://dns.example.org:53/"])
def test_no_destination_may_use_the_dns_port(url):
    with pytest.raises(InvalidInput, match="port 53"):
        egress.refuse_unsafe({Destination.parse(url)})


def test_a_destination_on_port_53_reaches_no_local_listener_through_the_forward_proxy(host_dir):
    """`meta skuid EGRESS tcp dport 53 accept` came before the inside-address rejects: any :53 was open."""
    resolv_conf = Path("/etc/resolv.conf").read_text()
    assert "nameserver 127.0.0.1" not in resolv_conf, "this test needs a host whose resolver is not 127.0.0.1"
    listener = socket.create_server(("127.0.0.1", 53))
    listener.settimeout(3)
    try:
        # As an older list or a hand-edited plan could hold it: the rules alone must stop it.
        plan = egress.new_plan([], QEMU_STANDIN).with_destinations({Destination("https", "localhost", 53)})
        egress.enforce(plan, host_dir)
        assert through_proxy(QEMU_STANDIN, plan.listen.port, "localhost:53").startswith("HTTP/1.1 5")
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def test_dns_is_allowed_only_to_the_hosts_resolvers(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver bogus\noptions edns0\n")
    resolvers = egress.host_resolvers(conf)
    assert [str(r) for r in resolvers] == ["127.0.0.53", "fe80::1"]
    conf.write_text("search example.org\n")
    assert [str(r) for r in egress.host_resolvers(conf)] == ["127.0.0.1"]  # glibc's default
    plan = EgressPlan(egress.Endpoint("127.0.0.1", 799), (), "q")
    rules = egress.nft_ruleset(plan, tmp_path, 1000, 1001, resolvers, 1024)
    assert "meta skuid 1001 ip daddr { 127.0.0.53 } udp dport 53 accept" in rules
    assert "meta skuid 1001 ip6 daddr { fe80::1 } tcp dport 53 accept" in rules
    assert "meta skuid 1001 udp dport 53 accept" not in rules and "1001 tcp dport 53 accept" not in rules


# 3 -------------------------------------------------------------------------------------------------

AGENT_SQUAT = """
import socket, sys
s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
s.settimeout(6)
try:
    conn, _ = s.accept()
    conn.settimeout(3)
    print("got-a-connection", conn.recv(200).decode().split()[0])
except TimeoutError:
    print("nothing")
"""


def test_an_agent_listening_on_an_abandoned_loopback_destination_receives_nothing(host_dir):
    """The demo's stand-in API left its listing behind; an agent bound the port and waited for the key."""
    abandoned = socket.create_server(("127.0.0.1", 0))
    port = abandoned.getsockname()[1]
    abandoned.close()  # the API is gone; its listing is not
    plan = egress.new_plan([], QEMU_STANDIN)
    plan = plan.with_destinations({Destination.parse(f"http://127.0.0.1:{port}")})  # as an older list holds it
    egress.enforce(plan, host_dir)
    squatter = as_user(AGENT, AGENT_SQUAT, str(port))
    assert squatter.stdout is not None and squatter.stdout.readline().strip() == "listening"
    assert through_proxy(QEMU_STANDIN, plan.listen.port, f"127.0.0.1:{port}").startswith("HTTP/1.1 5")
    assert finish(squatter) == ["nothing"]


def test_a_loopback_destination_any_local_user_could_listen_on_is_refused_when_listed(host_dir, tmp_path):
    url = "http://127.0.0.1:8080"
    with pytest.raises(InvalidInput, match="any local user may listen on"):
        egress.new_plan([url], QEMU_STANDIN)
    # `takeover run --egress-allow`, refused before anything is taken over
    argv = ["run", "--ready-file", str(tmp_path / "ready"), "--host-dir", str(tmp_path / "h"), "--accel", "tcg"]
    with pytest.raises(InvalidInput, match="any local user may listen on"):
        config_from_args(build_parser().parse_args([*argv, "--egress-allow", url]))
    with pytest.raises(InvalidInput, match="any local user may listen on"):  # whoever answers decides approvals
        config_from_args(build_parser().parse_args([*argv, "--allow-telegram-api-url", "http://127.0.0.1:8081"]))
    # `takeover egress allow`
    egress.save_plan(host_dir, egress.new_plan([], QEMU_STANDIN))
    assert main(["egress", "allow", "--host-dir", str(host_dir), url, "https://[::1]:8443"]) == 1
    assert egress.load_plan(host_dir).destinations == ()  # type: ignore[union-attr]
    # A privileged port on the host's loopback is only ever root's: that one may be listed.
    with privileged_listener() as listed:
        assert main(["egress", "allow", "--host-dir", str(host_dir), f"http://127.0.0.1:{listed.port}"]) == 0
        plan = egress.load_plan(host_dir)
        assert plan is not None and [d.url for d in plan.destinations] == [f"http://127.0.0.1:{listed.port}"]
        egress.enforce(plan, host_dir)
        assert through_proxy(QEMU_STANDIN, plan.listen.port, f"127.0.0.1:{listed.port}").endswith("established")
        assert listed.seen == 1


# 4 -------------------------------------------------------------------------------------------------


def test_sync_apply_adds_exactly_what_sync_showed_not_what_the_guest_planted_since(host_dir, monkeypatch, capsys):
    """`sync --apply` asked the VM again and added whatever the guest had planted after `sync`."""
    egress.save_plan(host_dir, egress.new_plan([], QEMU_STANDIN))
    shown, planted = Destination.parse("https://api.example.com"), Destination.parse("https://planted.example.net")
    answer = {shown}
    monkeypatch.setattr(runbook, "policy_destinations", lambda cfg: (set(answer), []))

    def egress_cli(*argv: str) -> dict:
        capsys.readouterr()
        assert main(["egress", *argv, "--host-dir", str(host_dir)]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    proposed = egress_cli("sync")
    assert proposed["missing"] == [shown.url] and proposed["applied"] is False
    answer.add(planted)  # the guest (its root) changes its policies between the two commands
    applied = egress_cli("sync", "--apply")
    assert applied["destinations"] == [shown.url]
    assert [d.url for d in egress.load_plan(host_dir).destinations] == [shown.url]  # type: ignore[union-attr]

    # With the digest the operator read: a list that is not the one shown is refused, nothing added.
    again = egress_cli("sync")
    assert again["missing"] == [planted.url]
    assert main(["egress", "sync", "--apply", proposed["digest"], "--host-dir", str(host_dir)]) == 1
    assert "not the list you read" in capsys.readouterr().err
    assert [d.url for d in egress.load_plan(host_dir).destinations] == [shown.url]  # type: ignore[union-attr]
    # The digest of the list the operator did read applies it; then nothing is left to apply.
    assert egress_cli("sync", "--apply", again["digest"])["destinations"] == sorted([shown.url, planted.url])
    # Nothing shown, nothing to apply: `--apply` never asks the VM itself.
    assert main(["egress", "sync", "--apply", "--host-dir", str(host_dir)]) == 1
    assert "there is none to apply" in capsys.readouterr().err


def test_sync_does_not_propose_a_loopback_destination_any_local_user_could_serve(host_dir, monkeypatch):
    egress.save_plan(host_dir, egress.new_plan([], QEMU_STANDIN))
    wanted = {Destination.parse("http://127.0.0.1:8080"), Destination.parse("https://api.example.com")}
    monkeypatch.setattr(runbook, "policy_destinations", lambda cfg: (wanted, []))
    proposed = runbook.change_egress(TakeoverConfig(host_dir=host_dir), "sync", [])
    assert proposed["missing"] == ["https://api.example.com:443"]
    assert any("127.0.0.1:8080" in reason for reason in proposed["unusable"])


# 5 -------------------------------------------------------------------------------------------------

AGENT_HOLD = """
import socket, sys
held, refused = [], 0
for _ in range(70):
    try:
        held.append(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3))
    except OSError:
        refused += 1
print(len(held), refused)
"""


def test_a_local_user_cannot_hold_the_forward_proxys_connections_and_qemu_still_gets_through(host_dir):
    """tinyproxy serves MaxClients 64: 70 idle connections of an agent stalled the VM's egress."""
    with privileged_listener() as listed:
        plan = egress.new_plan([f"https://127.0.0.1:{listed.port}"], QEMU_STANDIN)
        egress.enforce(plan, host_dir)
        holder = as_user(AGENT, AGENT_HOLD + "import time; time.sleep(20)\n", str(plan.listen.port))
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().split() == ["0", "70"]
            assert through_proxy(QEMU_STANDIN, plan.listen.port, f"127.0.0.1:{listed.port}").endswith("established")
            assert listed.seen == 1
        finally:
            holder.kill()
            holder.communicate()


SQUAT_PROXY_PORT = """
import socket, sys
try:
    socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("listening")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_a_dead_forward_proxy_is_reported_its_port_stays_roots_and_start_brings_it_back(host_dir):
    plan = egress.new_plan([], QEMU_STANDIN)
    assert plan.listen.port < 1024  # where only root can listen
    pid = egress.enforce(plan, host_dir)["forward_proxy_pid"]
    os.kill(pid, 9)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    assert "not running" in str(runbook.egress_status(host_dir)["forward_proxy"])
    assert finish(as_user(AGENT, SQUAT_PROXY_PORT, str(plan.listen.port))) == ["PermissionError"]
    again = runbook.restart_forward_proxy(TakeoverConfig(host_dir=host_dir))
    assert again["egress"]["forward_proxy"] == "restarted"
    assert runbook.egress_status(host_dir)["forward_proxy"] == egress.running_pid(host_dir)


def test_the_demo_withdraws_its_stand_in_apis_secret_and_listing_before_the_api_stops(host_dir, monkeypatch):
    """`make demo` left http://127.0.0.1:PORT listed (and brokered) after its API exited with it."""
    from scripts import demo

    demo_run = demo.Demo(demo.parse_args(["--host-dir", str(host_dir)]))
    demo_run.api = api = demo.StandInApi("sk-api-test")
    assert api.port < 1024  # while it runs, and after, no local user can listen there
    plan = egress.new_plan([api.url], QEMU_STANDIN)
    egress.save_plan(host_dir, plan)
    asked: list[tuple[str, ...]] = []

    def host_ssh(*remote: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        asked.append(remote)  # the VM's proxy CLI, over the host's key: played here
        return subprocess.CompletedProcess(remote, 0, "", "")

    monkeypatch.setattr(demo_run, "host_ssh", host_ssh)
    notes: list[str] = []
    assert demo_run.withdraw_api(notes.append) is True
    assert asked == [("/usr/local/bin/secret-proxy", "secrets", "delete", demo.BROKERED_NAME)]
    assert egress.load_plan(host_dir).destinations == ()  # type: ignore[union-attr]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", api.port), timeout=3)
    assert "removed from the egress list" in notes[0]
