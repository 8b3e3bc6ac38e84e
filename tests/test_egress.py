"""The host's VM reaches only the listed destinations: nftables per QEMU uid and tinyproxy, for real.

A real unprivileged user stands in for the host VM's QEMU (the filter matches sockets by
their owner, so what this user can reach is what the guest can reach through slirp); the
VM itself is played in tests/test_takeover_e2e.py. Every destination is a listener on this
machine; a block is proven by the listener seeing no connection.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeover.errors import InvalidInput, RestartError
from takeover.host import egress
from takeover.host.egress import Destination, EgressPlan
from takeover.host.files import ensure_host_dir
from tests.egress_helpers import privileged_listener
from tests.takeover_helpers import ensure_user, listeners

pytestmark = pytest.mark.root

QEMU_STANDIN = "spvm-egress-qemu"
QEMU_STANDIN_2 = "spvm-egress-qemu2"


def as_qemu(script: str, user: str = QEMU_STANDIN) -> str:
    """Run Python as a stand-in QEMU user and return what it printed."""
    entry = pwd.getpwnam(user)
    out = subprocess.run(
        [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


CONNECT_SCRIPT = """
import socket, sys
def connect(host, port):
    try:
        s = socket.create_connection((host, port), timeout=5)
    except OSError as exc:
        return type(exc).__name__
    s.close()
    return "connected"
def through_proxy(proxy_port, target):
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=5)
    s.sendall(f"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n".encode())
    return s.recv(200).split(b"\\r\\n")[0].decode()
"""


@pytest.fixture
def egress_host_dir(tmp_path: Path) -> Iterator[Path]:
    ensure_user(QEMU_STANDIN)
    host_dir = ensure_host_dir(tmp_path / "host")
    yield host_dir
    egress.release(host_dir, drop_rules=True)


def test_qemus_user_reaches_the_forward_proxy_and_only_the_listed_destinations_through_it(egress_host_dir):
    with listeners(2) as (unlisted, by_name), privileged_listener() as listed:
        # The host's loopback may be listed on a port below 1024 only: no local user can listen there.
        plan = egress.new_plan([f"http://127.0.0.1:{listed.port}/", f"https://localhost:{by_name.port}"], QEMU_STANDIN)
        result = egress.enforce(plan, egress_host_dir)
        assert result["forward_proxy_pid"] == egress.running_pid(egress_host_dir)
        proxy_port = plan.listen.port
        got = as_qemu(
            CONNECT_SCRIPT
            + f"""
print(connect("127.0.0.1", {unlisted.port}))          # the host's other loopback services
print(connect("127.0.0.1", {listed.port}))            # even a listed one, directly
print(through_proxy({proxy_port}, "127.0.0.1:{listed.port}"))
print(through_proxy({proxy_port}, "127.0.0.1:{unlisted.port}"))
print(through_proxy({proxy_port}, "localhost:{by_name.port}"))  # listed by a name that resolves to loopback
"""
        ).splitlines()
        assert got[0] == "ConnectionRefusedError"
        assert got[1] == "ConnectionRefusedError"
        assert got[2].endswith("200 Connection established")
        assert got[3].startswith("HTTP/1.1 403")
        assert got[4].startswith("HTTP/1.1 5")  # tinyproxy's own connect is rejected by the rules
        assert (listed.seen, unlisted.seen, by_name.seen) == (1, 0, 0)
        # root and every other user are untouched by the table
        socket.create_connection(("127.0.0.1", unlisted.port), timeout=5).close()


def test_a_udp_datagram_from_qemus_user_never_arrives(egress_host_dir):
    """slirp forwards the guest's DNS and other UDP as QEMU's user: a local UDP listener sees nothing."""
    plan = egress.new_plan([], QEMU_STANDIN)
    egress.enforce(plan, egress_host_dir)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(1.5)
    port = receiver.getsockname()[1]
    as_qemu(
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"try:\n    s.sendto(b'exfiltrate', ('127.0.0.1', {port}))\nexcept OSError:\n    pass\n"
    )
    with pytest.raises(TimeoutError):
        receiver.recvfrom(100)
    receiver.close()


def test_changing_the_list_reloads_the_forward_proxy_which_keeps_its_port(egress_host_dir):
    """A reload, not a restart: while the port was free an agent could listen there and pose as the proxy."""
    with privileged_listener() as later:
        plan = egress.new_plan([], QEMU_STANDIN)
        pid = egress.enforce(plan, egress_host_dir)["forward_proxy_pid"]
        refused = as_qemu(CONNECT_SCRIPT + f"print(through_proxy({plan.listen.port}, '127.0.0.1:{later.port}'))")
        assert refused.startswith("HTTP/1.1 403")
        wider = plan.with_destinations({Destination.parse(f"https://127.0.0.1:{later.port}")})
        assert egress.enforce(wider, egress_host_dir)["forward_proxy_pid"] == pid
        allowed = as_qemu(CONNECT_SCRIPT + f"print(through_proxy({plan.listen.port}, '127.0.0.1:{later.port}'))")
        assert allowed.endswith("200 Connection established")
        assert later.seen == 1


def test_two_host_vms_cannot_share_qemus_user(egress_host_dir, tmp_path):
    egress.enforce(egress.new_plan([], QEMU_STANDIN), egress_host_dir)
    other = ensure_host_dir(tmp_path / "other-host")
    with pytest.raises(RestartError, match="already runs the host VM of"):
        egress.enforce(egress.new_plan([], QEMU_STANDIN), other)


def test_the_forward_proxys_port_taken_by_another_process_is_named_and_refused(egress_host_dir):
    squatter = socket.create_server(("127.0.0.1", 0))
    try:
        plan = EgressPlan(egress.Endpoint("127.0.0.1", squatter.getsockname()[1]), (), QEMU_STANDIN)
        with pytest.raises(RestartError, match=f"held by pid {os.getpid()}"):
            egress.enforce(plan, egress_host_dir)
    finally:
        squatter.close()


def test_a_forward_proxy_config_directory_prepared_by_someone_else_is_refused_and_left_alone():
    user = "spvm-egress-prep"  # its own user: its config directory is no other test's
    ensure_user(user)
    directory = egress.config_dir(user)
    directory.parent.mkdir(mode=0o755, exist_ok=True)
    directory.mkdir(mode=0o777, exist_ok=True)
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(directory, nobody, -1)
    try:
        plan = EgressPlan(egress.Endpoint("127.0.0.1", 3128), (), QEMU_STANDIN)
        with pytest.raises(RestartError, match=f"{directory} is owned by uid {nobody}, not by us"):
            egress.write_config(plan, user)
        assert os.lstat(directory).st_uid == nobody and not any(directory.iterdir())
    finally:
        directory.rmdir()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.org/",
        "https://user:pw@example.org/",
        "https://example.org/?q=1",
        "https://exa mple.org/",
        "https://example.org\n:443/",
        "http://10.0.2.2:8080/",  # the guest's name for the host: means nothing on the host
        "https://0x7f.1/",
    ],
)
def test_a_destination_that_is_not_a_plain_url_is_refused(url):
    with pytest.raises(InvalidInput):
        Destination.parse(url)


def test_the_filter_matches_the_whole_target_and_nothing_longer():
    import re

    patterns = Destination.parse("http://api.example.com:8080/v1/").filter_patterns()
    assert patterns == [r"^api\.example\.com:8080$", r"^http://api\.example\.com:8080/"]
    for text, allowed in [
        ("api.example.com:8080", True),
        ("api.example.com:80800", False),
        ("apixexample.com:8080", False),
        ("api.example.com.evil.org:8080", False),
        ("http://api.example.com:8080/x", True),
        ("http://api.example.com:8080@evil.org/", False),
    ]:
        assert any(re.search(p, text) for p in patterns) is allowed, text


def test_a_brokered_call_goes_through_the_forward_proxy_and_an_unlisted_one_never_connects(tmp_path, egress_host_dir):
    """The proxy in the VM, told `egress_proxy`, tunnels its calls; the host's list decides, TLS stays end to end."""
    import base64

    import httpx

    from proxy.policy import build_policy
    from proxy.store import Store

    from .broker_upstream import Upstream, make_ca
    from .proxy_helpers import SECRET_VALUE, make_settings, provision, start_server

    ca = make_ca(tmp_path / "ca")
    listed, unlisted = Upstream(ca).start(), Upstream(ca).start()
    plan = egress.new_plan([f"https://localhost:{listed.port}"], QEMU_STANDIN)
    egress.save_plan(egress_host_dir, plan)
    egress.start_forward_proxy(plan, egress_host_dir, "nobody")
    config = {"broker_ca_file": str(ca.ca_file), "egress_proxy": f"http://127.0.0.1:{plan.listen.port}"}
    data = provision(make_settings(tmp_path), config)
    with Store(data.settings) as store:
        for name, up in (("api-listed", listed), ("api-unlisted", unlisted)):
            policy = build_policy([f"https://localhost:{up.port}/"], [], "Authorization: Bearer {value}")
            store.set_secret(name, SECRET_VALUE.encode(), "operator:test", policy, broker_only=True)
    server = start_server(data.settings)
    try:
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {data.token}"}, timeout=30)

        def call(secret: str, port: int) -> httpx.Response:
            url = f"https://localhost:{port}/v1/echo"
            created = http.post("/v1/calls", json={"secret": secret, "reason": "r", "method": "GET", "url": url})
            assert created.status_code == 201, created.text
            with Store(data.settings) as store:
                store.decide(created.json()["id"], True, "operator:test")
            return http.post(f"/v1/requests/{created.json()['id']}/call", json={"method": "GET", "url": url})

        made = call("api-listed", listed.port)
        assert made.status_code == 200, made.text
        assert made.json()["status"] == 200
        assert listed.requests[0].headers["Authorization"] == f"Bearer {SECRET_VALUE}"
        assert SECRET_VALUE.encode() not in base64.b64decode(made.json()["body_base64"])
        refused = call("api-unlisted", unlisted.port)
        assert refused.status_code == 403 and refused.json()["error"] == "egress_refused", refused.text
        assert "takeover egress allow" in refused.json()["detail"]
        assert unlisted.connections == 0
    finally:
        server.stop()
        listed.stop()
        unlisted.stop()
    assert SECRET_VALUE not in (egress_host_dir / egress.LOG_NAME).read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--runner", "libvirt"], "libvirt shares between all its domains"),
        (["--qemu-user", "root"], "root's connections cannot be singled out"),
    ],
)
def test_a_takeover_the_filter_cannot_cover_is_refused_before_it_starts(extra, message, tmp_path):
    """Not half-way through: the operator learns at once, and `--no-egress-filter` is a choice they make."""
    from takeover.cli import main

    argv = ["run", "--ready-file", str(tmp_path / "ready"), "--host-dir", str(tmp_path / "host"), *extra]
    with pytest.raises(InvalidInput, match=message):
        from takeover.cli import build_parser, config_from_args

        config_from_args(build_parser().parse_args([*argv, "--accel", "tcg"]))
    assert main([*argv, "--accel", "tcg"]) == 1
    assert not (tmp_path / "host").exists()


def test_two_host_vms_each_reach_their_own_listed_loopback_destination(egress_host_dir, tmp_path):
    """Each VM's forward proxy has a user of its own: one table's rejects never cut another VM's list."""
    ensure_user(QEMU_STANDIN_2)
    other_dir = ensure_host_dir(tmp_path / "other-host")
    try:
        with privileged_listener() as mine, privileged_listener() as theirs:
            plans = [
                (egress.new_plan([f"https://127.0.0.1:{mine.port}"], QEMU_STANDIN), egress_host_dir),
                (egress.new_plan([f"https://127.0.0.1:{theirs.port}"], QEMU_STANDIN_2), other_dir),
            ]
            for plan, host_dir in plans:
                egress.enforce(plan, host_dir)
            for (plan, _), target in zip(plans, (mine, theirs), strict=True):
                script = CONNECT_SCRIPT + f"print(through_proxy({plan.listen.port}, '127.0.0.1:{target.port}'))"
                got = as_qemu(script, plan.qemu_user)
                assert got.endswith("200 Connection established"), got
            assert (mine.seen, theirs.seen) == (1, 1)
    finally:
        egress.release(other_dir, drop_rules=True)


@pytest.mark.parametrize(
    "argv",
    [
        ["egress", "allow", "--host-dir", "/var/lib/x", "https://a.example", "http://127.0.0.1:8080"],
        ["egress", "allow", "https://a.example", "http://127.0.0.1:8080", "--host-dir", "/var/lib/x"],
    ],
)
def test_egress_urls_and_the_host_dir_go_in_either_order(argv):
    from takeover.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.action, args.urls, str(args.host_dir)) == (
        "allow",
        ["https://a.example", "http://127.0.0.1:8080"],
        "/var/lib/x",
    )
