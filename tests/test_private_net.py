"""The cut-over's first boot listens in a network namespace of root's own (takeover/host/private_net.py).

Played with a real unprivileged user (the agent): it can neither connect to a port listening in
the namespace, nor enter the namespace, and taking the same port on the host's loopback changes
nothing for whoever connects from inside. No VM: a plain listener stands for the first boot's QEMU.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from takeover.host.private_net import PrivateNet

from .vm_fixtures import as_agent, ensure_agent_user

pytestmark = pytest.mark.root

CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""
SQUAT = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
time.sleep(30)
"""


def listen_inside(net: PrivateNet) -> socket.socket:
    def make() -> socket.socket:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        return server

    return net.run(make)


def answer_inside(net: PrivateNet, port: int) -> None:
    net.run(lambda: socket.create_connection(("127.0.0.1", port), timeout=3).close())


def test_the_agent_cannot_reach_take_or_enter_the_first_boots_network():
    ensure_agent_user()
    with PrivateNet(("127.0.0.1",)) as net:
        server = listen_inside(net)
        port = server.getsockname()[1]
        holder = net.run(lambda: subprocess.Popen(["sleep", "60"]))  # a process in the namespace, like QEMU
        try:
            answer_inside(net, port)  # root, inside: it is there
            # The agent, on the host: nothing listens at that address and port.
            assert as_agent(["/usr/bin/python3", "-I", "-c", CONNECT, str(port)]).stdout.strip() == (
                "ConnectionRefusedError"
            )
            # The agent takes the same port on the host's loopback: a different socket altogether;
            # whoever connects inside still reaches the first boot, never the squatter.
            squatter = subprocess.Popen(
                ["runuser", "-u", "agent", "--", "/usr/bin/python3", "-I", "-c", SQUAT, str(port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert squatter.stdout is not None and squatter.stdout.readline().strip() == "listening"
                answer_inside(net, port)
                accepted, _ = server.accept()
                accepted.close()
            finally:
                squatter.kill()
                squatter.wait()
            # Entering the namespace: the agent cannot even open it (and setns would need CAP_SYS_ADMIN).
            entered = as_agent(["nsenter", f"--net=/proc/{holder.pid}/ns/net", "true"])
            assert entered.returncode != 0
            assert "Permission denied" in entered.stderr or "Operation not permitted" in entered.stderr
            # And the namespace routes nowhere: only its own loopback exists.
            links = net.run(lambda: subprocess.run(["ip", "-o", "link"], capture_output=True, text=True)).stdout
            assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        finally:
            holder.kill()
            holder.wait()
            server.close()
