"""Support for the egress tests (no tests here): Python run as another real user, a CONNECT through the
forward proxy as that user, and a listener on a port below 1024 (the only kind of loopback destination
the host may list: no local user can listen there)."""

from __future__ import annotations

import pwd
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from takeover.host import egress
from tests.takeover_helpers import Listener


def as_user(user: str, script: str, *args: str) -> subprocess.Popen[str]:
    """Python run by `user` (no groups of root's), started in the background; read its lines as it prints."""
    entry = pwd.getpwnam(user)
    return subprocess.Popen(
        [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            "/usr/bin/python3",
            "-I",
            "-c",
            script,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 30) -> list[str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return out.split()


def through_proxy(user: str, proxy_port: int, target: str) -> str:
    script = (
        "import socket, sys\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n"
        "s.sendall(f'CONNECT {sys.argv[2]} HTTP/1.1\\r\\nHost: {sys.argv[2]}\\r\\n\\r\\n'.encode())\n"
        "print(s.recv(200).split(b'\\r\\n')[0].decode().replace(' ', '_'))\n"
    )
    return finish(as_user(user, script, str(proxy_port), target))[0].replace("_", " ")


class PrivilegedListener(Listener):
    """A Listener on a free port below 1024: only root can listen there, so it stays root's."""

    def __init__(self) -> None:
        for port in range(999, 900, -1):
            try:
                self.sock = socket.create_server(("127.0.0.1", port))
                break
            except OSError:
                continue
        self.port = port
        self.seen = 0
        threading.Thread(target=self._serve, daemon=True).start()


@contextmanager
def privileged_listener() -> Iterator[PrivilegedListener]:
    listener = PrivilegedListener()
    try:
        yield listener
    finally:
        listener.close()


def exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def forget_user(name: str) -> None:
    """The user, its egress table and its forward proxy's user gone, as before any run."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    egress.run_nft(["delete", "table", "inet", egress.table_name(uid)])
    subprocess.run(["userdel", egress.egress_user(uid)], capture_output=True)
    subprocess.run(["userdel", name], capture_output=True)
