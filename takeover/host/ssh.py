"""The host's own SSH login to its VM: the host key pinned, strict checking, every command bounded in time.

Used by step 6 (verify), by `takeover egress sync` (the VM's policies), by `takeover backup` and
`restore` (binary, bounded: `exchange`) and by the demo and the bench; the command line itself is
vm_image's (`ssh_argv`).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from vm_image.ssh_command import ssh_argv

from ..errors import VerifyError
from ..models import Endpoint


@dataclass(frozen=True)
class SSHTarget:
    endpoint: Endpoint
    key: Path
    known_hosts: Path
    user: str = "proxy"

    def argv(self, *remote: str, key: Path | None = None, options: tuple[str, ...] = ()) -> list[str]:
        pinned = (
            "BatchMode=yes",
            "StrictHostKeyChecking=yes",
            f"UserKnownHostsFile={self.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "HostKeyAlgorithms=ssh-ed25519",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "ConnectTimeout=10",
            "LogLevel=ERROR",
        )
        host, port = self.endpoint.host, self.endpoint.port
        return ssh_argv(host, port, self.user, remote, options=(*pinned, *options), key=key or self.key)

    def run(self, *remote: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_bounded(self.argv(*remote), timeout)

    def exchange(self, *remote: str, stdin: bytes = b"", limit: int, timeout: float = 600) -> Exchanged:
        """Run `remote` with `stdin` and take its binary stdout, at most `limit` bytes (more: OutputTooLarge)."""
        return exchange_bounded(self.argv(*remote), stdin, limit, timeout)


@dataclass(frozen=True)
class Exchanged:
    returncode: int
    stdout: bytes
    stderr: str  # the last STDERR_KEPT bytes, decoded with replacement: the guest's text, for a message


STDERR_KEPT = 64 * 1024


class OutputTooLarge(VerifyError):
    """The VM answered with more than the host takes: it is not read further, and the ssh is killed."""

    hint = "the VM's answer was larger than any the proxy gives; look at the VM (a hostile or broken guest)"


def exchange_bounded(argv: list[str], stdin: bytes, limit: int, timeout: float) -> Exchanged:
    """`argv` fed `stdin`, its stdout bounded by `limit` and the whole by `timeout`, without deadlock:
    the input and the error output each have a thread, the output is read here."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    errors = bytearray()

    def feed() -> None:
        try:
            proc.stdin.write(stdin)  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass  # the remote stopped reading (it refused the input); its exit status says why

    def drain() -> None:
        for chunk in iter(lambda: proc.stderr.read(65536), b""):  # type: ignore[union-attr]
            errors.extend(chunk)
            del errors[:-STDERR_KEPT]

    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        proc.kill()

    helpers = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
    for thread in helpers:
        thread.start()
    timer = threading.Timer(timeout, expire)
    timer.start()
    out = bytearray()
    try:
        for chunk in iter(lambda: proc.stdout.read(1024 * 1024), b""):  # type: ignore[union-attr]
            out.extend(chunk)
            if len(out) > limit:
                raise OutputTooLarge(f"`{' '.join(argv[-3:])}` in the VM printed more than {limit} bytes; not read")
        returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for thread in helpers:
            thread.join(5)
        proc.stdout.close()
        proc.stderr.close()
    if timed_out.is_set():
        raise SSHTimeout(f"`{argv[0]}` to the VM did not finish within {timeout:.0f} s")
    return Exchanged(returncode, bytes(out), errors.decode(errors="replace"))


class SSHTimeout(VerifyError):
    """An ssh or ssh-keyscan that did not finish in time (the guest accepted but never answered)."""


def run_bounded(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SSHTimeout(f"`{argv[0]}` to the VM did not finish within {timeout:.0f} s") from None


def which_ssh() -> None:
    for tool in ("ssh", "ssh-keyscan"):
        if shutil.which(tool) is None:
            raise VerifyError(f"{tool} is not installed on the host", hint="apt-get install openssh-client")
