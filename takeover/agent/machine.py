"""The connection to an agent machine: the VM (or container) the agent runs in, reached by the host as root.

Where the agent works in a machine of its own (Multipass, a libvirt domain, a cloud VM, a container
with sshd), the proxy VM it built is nested inside that machine, and the host reaches in over SSH.
Root in that machine is the agent, so everything that comes back is hostile: its host key is pinned
before the first byte (`known_hosts`, given by the operator, never learnt on first use), and every
exchange has a deadline and a bound on what it may send back, so a machine that stalls or floods
costs the host a timeout, never a hang or its memory.

One multiplexed connection (OpenSSH's ControlMaster, its socket in a root-only directory) carries
every command, file read and forwarded unix socket (the nested QEMU's QMP monitor); no ssh_config,
agent, X11 or local command can add anything (`-F /dev/null` and the options below).
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vm_image.shutdown import kill_group

from ..config import TakeoverConfig
from ..errors import InvalidInput, TakeoverError
from ..host.files import read_root_only_file

USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
REMOTE_PATH_RE = re.compile(r"/[A-Za-z0-9._+@%=:,/ -]{0,4095}")
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
MAX_OUTPUT = 1 << 20  # what one command may print before it is cut off


class AgentMachineError(TakeoverError):
    hint = (
        "check that the agent machine is up and reachable over SSH as root with the key given, and that its "
        "host key is the one pinned (--agent-machine-known-hosts)"
    )


class AgentMachineTimeout(AgentMachineError):
    hint = "the agent machine stopped answering; check it is up, then rerun (the journal resumes where it stopped)"


class AgentMachineFlood(AgentMachineError):
    hint = "the agent machine sent more than the host reads for this step; it may be hostile: look at it first"


@dataclass(frozen=True)
class MachineAddress:
    """`root@10.0.3.5` or `root@agent-vm:2222`: who the host logs in as, where."""

    user: str
    host: str
    port: int = 22

    @classmethod
    def parse(cls, text: str) -> MachineAddress:
        user, at, rest = text.partition("@")
        if not at:
            user, rest = "root", text
        host, port = rest, 22
        if rest.startswith("["):
            host, closed, tail = rest.partition("]")
            if not closed:
                raise InvalidInput(f"agent machine {text!r}: write [IPv6]:PORT")
            host += "]"
            if tail:
                if not tail.startswith(":") or not tail[1:].isdigit():
                    raise InvalidInput(f"agent machine {text!r}: write [IPv6]:PORT")
                port = int(tail[1:])
        elif rest.count(":") == 1:
            host, _, raw = rest.partition(":")
            if not raw.isdigit():
                raise InvalidInput(f"agent machine {text!r}: the port must be a number")
            port = int(raw)
        if not USER_RE.fullmatch(user) or not HOST_RE.fullmatch(host) or host.startswith("-"):
            raise InvalidInput(f"agent machine {text!r} is not USER@HOST[:PORT]")
        if not 0 < port < 65536:
            raise InvalidInput(f"agent machine {text!r}: the port must be from 1 to 65535")
        return cls(user, host, port)

    @property
    def ssh_host(self) -> str:
        return self.host[1:-1] if self.host.startswith("[") else self.host

    def __str__(self) -> str:
        return f"{self.user}@{self.host}" + ("" if self.port == 22 else f":{self.port}")


@dataclass(frozen=True)
class AgentMachine:
    address: MachineAddress
    key: Path  # root's private key for the agent machine (the operator's, root-only)
    known_hosts: Path  # the agent machine's host key, pinned: a known_hosts line the operator vouches for


@dataclass(frozen=True)
class Output:
    returncode: int
    stdout: bytes
    stderr: bytes


def check_remote_path(path: str) -> str:
    """A path on the agent machine that goes on a remote command line: absolute, plain characters, no `..`."""
    if not REMOTE_PATH_RE.fullmatch(path) or "/../" in f"{path}/" or "//" in path:
        raise InvalidInput(f"the agent machine's path {path!r} is not a plain absolute path")
    return path


class Connection:
    """One ControlMaster connection to `machine`; `close()` (or the context's end) ends it and its forwards."""

    def __init__(self, machine: AgentMachine, control_dir: Path) -> None:
        self.machine = machine
        self.control = control_dir / "agent-machine.ctl"
        self._master: subprocess.Popen[bytes] | None = None
        self._forwards: dict[str, str] = {}  # local socket -> the -L spec it was forwarded with

    def __enter__(self) -> Connection:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _options(self) -> list[str]:
        options = (
            "BatchMode=yes",
            "StrictHostKeyChecking=yes",
            f"UserKnownHostsFile={self.machine.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "CheckHostIP=no",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "ForwardAgent=no",
            "ForwardX11=no",
            "PermitLocalCommand=no",
            "RequestTTY=no",
            "UpdateHostKeys=no",
            f"ConnectTimeout={CONNECT_TIMEOUT:.0f}",
            "ServerAliveInterval=5",
            "ServerAliveCountMax=3",
            "ExitOnForwardFailure=yes",
            "StreamLocalBindUnlink=yes",
            f"ControlPath={self.control}",
            "LogLevel=ERROR",
        )
        argv = ["ssh", "-F", "/dev/null"]
        for option in options:
            argv += ["-o", option]
        address = self.machine.address
        return [*argv, "-i", str(self.machine.key), "-p", str(address.port), "-l", address.user]

    def open(self, timeout: float = CONNECT_TIMEOUT + 5) -> None:
        """Log in once; every later command rides on this connection. Refused unless the host key is the pinned one."""
        self.control.unlink(missing_ok=True)
        argv = [*self._options(), "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-N"]
        self._master = subprocess.Popen(
            [*argv, self.machine.address.ssh_host],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.control.exists():
            if self._master.poll() is not None:
                said = self._master.stderr.read(4096).decode(errors="replace").strip() if self._master.stderr else ""
                self._master = None
                raise AgentMachineError(f"cannot log in to the agent machine {self.machine.address}: {said[-300:]}")
            if time.monotonic() > deadline:
                self.close()
                raise AgentMachineTimeout(
                    f"the agent machine {self.machine.address} did not answer within {timeout:g} s"
                )
            time.sleep(0.05)

    def close(self) -> None:
        master, self._master = self._master, None
        if master is not None and master.poll() is None:
            # SIGTERM first: the master tells the machine's sshd it is going, and its forwards close cleanly.
            os.killpg(master.pid, signal.SIGTERM)
            try:
                master.wait(5)
            except subprocess.TimeoutExpired:
                kill_group(master)
        self.control.unlink(missing_ok=True)
        for local in self._forwards:  # the master's listeners end with it; their socket files stay behind
            Path(local).unlink(missing_ok=True)
        self._forwards.clear()

    def _argv(self, remote: Sequence[str]) -> list[str]:
        if self._master is None:
            raise AgentMachineError("the connection to the agent machine is not open")
        # One argument, quoted here: the remote shell splits it back into exactly `remote`.
        return [*self._options(), self.machine.address.ssh_host, "--", shlex.join(remote)]

    def run(
        self,
        remote: Sequence[str],
        *,
        timeout: float = COMMAND_TIMEOUT,
        max_output: int = MAX_OUTPUT,
        sink: Callable[[bytes], None] | None = None,
        input: bytes | None = None,
    ) -> Output:
        """Run `remote` (an argv) on the agent machine; its stdout goes to `sink` if given, else is returned.

        `input` (a few KiB at most: it is written before anything is read) becomes its stdin.
        """
        child = subprocess.Popen(
            self._argv(remote),
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        out: list[bytes] = []
        err: list[bytes] = []
        sizes = [0, 0]
        assert child.stdout is not None and child.stderr is not None
        if input is not None:
            assert child.stdin is not None and len(input) <= 16384  # within a pipe's buffer: no deadlock
            try:
                child.stdin.write(input)
            except BrokenPipeError:
                pass  # it exited without reading: its status says why
            child.stdin.close()
        streams = {child.stdout.fileno(): 0, child.stderr.fileno(): 1}
        deadline = time.monotonic() + timeout
        try:
            while streams:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentMachineTimeout(
                        f"`{shlex.join(remote)[:120]}` on the agent machine did not finish within {timeout:g} s"
                    )
                ready, _, _ = select.select(list(streams), [], [], remaining)
                for fd in ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        del streams[fd]
                        continue
                    which = streams[fd]
                    sizes[which] += len(chunk)
                    if sizes[which] > (max_output if which == 0 else MAX_OUTPUT):
                        raise AgentMachineFlood(
                            f"`{shlex.join(remote)[:120]}` on the agent machine printed over {max_output} bytes"
                        )
                    if which == 0 and sink is not None:
                        sink(chunk)
                    else:
                        (out if which == 0 else err).append(chunk)
            returncode = child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AgentMachineTimeout(
                f"`{shlex.join(remote)[:120]}` on the agent machine did not end within {timeout:g} s"
            ) from None
        finally:
            if child.poll() is None:
                kill_group(child)
            child.stdout.close()
            child.stderr.close()
        return Output(returncode, b"".join(out), b"".join(err))

    def read_file(self, path: str, max_bytes: int, *, timeout: float = COMMAND_TIMEOUT) -> bytes:
        """A small file of the agent machine (a ready file): at most `max_bytes`, or refused, never read whole."""
        chunks: list[bytes] = []
        self.copy_file(path, chunks.append, max_bytes, timeout=timeout)
        return b"".join(chunks)

    def copy_file(self, path: str, sink: Callable[[bytes], None], max_bytes: int, *, timeout: float) -> int:
        """Stream a file of the agent machine into `sink`, at most `max_bytes` or refused; returns how many came."""
        check_remote_path(path)
        # head stops at max+1 bytes: a file of gigabytes costs the machine one short read, and us nothing.
        size = [0]

        def counted(chunk: bytes) -> None:
            size[0] += len(chunk)
            sink(chunk)

        got = self.run(
            ["head", "-c", str(max_bytes + 1), "--", path], timeout=timeout, max_output=max_bytes, sink=counted
        )
        if got.returncode != 0:
            said = got.stderr.decode(errors="replace").strip()[-200:]
            raise AgentMachineError(f"cannot copy {path} from the agent machine: {said or f'exit {got.returncode}'}")
        return size[0]

    def forward_unix(self, remote: str, local: Path, *, timeout: float = COMMAND_TIMEOUT) -> None:
        """Make the agent machine's unix socket `remote` reachable as `local` (root's, in root's directory)."""
        check_remote_path(remote)
        self._forward(f"{local}:{remote}", remote, timeout)

    def forward_tcp(self, host: str, port: int, local: Path, *, timeout: float = COMMAND_TIMEOUT) -> None:
        """`host:port` as the agent machine reaches it (the nested proxy), as the unix socket `local` here."""
        if not HOST_RE.fullmatch(host) or not 0 < port < 65536:
            raise InvalidInput(f"{host}:{port} is not an address to forward from the agent machine")
        self._forward(f"{local}:{host}:{port}", f"{host}:{port}", timeout)

    def _forward(self, spec: str, what: str, timeout: float) -> None:
        if self._master is None:
            raise AgentMachineError("the connection to the agent machine is not open")
        local = spec.split(":", 1)[0]
        if self._forwards.get(local) == spec and os.path.exists(local):
            return  # already forwarded on this connection: each connect opens a new channel to `what`
        if local in self._forwards:
            self._ssh_control("cancel", self._forwards.pop(local), what, timeout)
        Path(local).unlink(missing_ok=True)
        self._ssh_control("forward", spec, what, timeout)
        self._forwards[local] = spec

    def _ssh_control(self, command: str, spec: str, what: str, timeout: float) -> None:
        argv = [*self._options(), "-O", command, "-L", spec, self.machine.address.ssh_host]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise AgentMachineTimeout(f"`{command}` of {what} from the agent machine took over {timeout:g} s") from None
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()[-200:]
            raise AgentMachineError(f"cannot {command} {what} from the agent machine: {said}")


def machine_of(cfg: TakeoverConfig) -> AgentMachine:
    """The agent machine the options name, with root's key and the pinned host key (both required)."""
    if cfg.agent_machine is None:
        raise InvalidInput("no --agent-machine given")
    if cfg.agent_machine_key is None or cfg.agent_machine_known_hosts is None:
        raise InvalidInput(
            "--agent-machine needs --agent-machine-key (root's key for it) and --agent-machine-known-hosts "
            "(its host key, pinned: the takeover never learns a host key on first use)"
        )
    # Whoever could change either file would be the agent machine as far as root knows.
    read_root_only_file(cfg.agent_machine_key, "--agent-machine-key", 64 * 1024)
    pinned = read_root_only_file(cfg.agent_machine_known_hosts, "--agent-machine-known-hosts", 64 * 1024, secret=False)
    if not pinned.strip():
        raise InvalidInput(f"--agent-machine-known-hosts {cfg.agent_machine_known_hosts} is empty")
    return AgentMachine(MachineAddress.parse(cfg.agent_machine), cfg.agent_machine_key, cfg.agent_machine_known_hosts)


def connect(cfg: TakeoverConfig, control_dir: Path) -> Connection:
    """An open connection to the agent machine of `cfg`, its control socket in `control_dir` (root's)."""
    conn = Connection(machine_of(cfg), control_dir)
    conn.open()
    return conn
