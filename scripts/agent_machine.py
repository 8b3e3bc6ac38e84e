"""An agent machine made on this machine: what Multipass or libvirt give an agent elsewhere.

A network namespace with its own address on a bridge made for it (this host keeps the bridge's
address, as Multipass's `mpqemubr0` does), a mount namespace of its own in which `/srv/spvm-am-N`
and `/etc/secret-proxy` are tmpfs this host cannot see, and its own sshd in both, which lets root in
with a dedicated key installed `restrict,port-forwarding` and shows a host key root pins. Addresses
are 10.213.N.0/24, inside namespaces made here; nothing leaves this machine.

`make demo-machine` plays the story with the agent in one (scripts/demo.py --agent-machine), and the
tests make one per module (tests/agent_machine_helpers.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from takeover.agent.machine import AgentMachine, MachineAddress

SSHD = "/usr/sbin/sshd"
AUTHORIZED_OPTIONS = "restrict,port-forwarding"
MACHINE_ETC = "/etc/secret-proxy"  # private to each machine (the agent's tools read their address there)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


@dataclass
class AgentMachineRig:
    index: int
    work: Path  # the host's view: keys, the sshd's config and log
    sshd: subprocess.Popen[bytes]

    @property
    def netns(self) -> str:
        return f"spvm-am{self.index}"

    @property
    def bridge(self) -> str:
        return f"spvm-br{self.index}"

    @property
    def address(self) -> str:
        return f"10.213.{self.index}.2"

    @property
    def host_address(self) -> str:
        return f"10.213.{self.index}.1"

    @property
    def private(self) -> str:
        """The machine's own directory: a tmpfs in its mount namespace, empty from the host's side."""
        return f"/srv/spvm-am-{self.index}"

    def machine(self, known_hosts: Path | None = None) -> AgentMachine:
        return AgentMachine(
            MachineAddress("root", self.address), self.work / "root_key", known_hosts or self.work / "known_hosts"
        )

    def inside(
        self, argv: list[str], *, timeout: float = 60, user: str | None = None, input: bytes | None = None
    ) -> subprocess.CompletedProcess:
        """Run `argv` in the machine (its network and mount namespaces), as root or as `user`."""
        as_user = ["runuser", "-u", user, "--"] if user else []
        return subprocess.run([*self.enter, *as_user, *argv], capture_output=True, timeout=timeout, input=input)

    @property
    def enter(self) -> list[str]:
        """The command prefix that runs a command in the machine's namespaces."""
        return ["nsenter", f"--target={self.machine_pid}", "--mount", "--net", "--"]

    @property
    def machine_pid(self) -> int:
        # `ip netns exec ... unshare ... sh -c 'mount ...; exec sshd'`: the sshd is the process in the
        # machine's mount namespace; the Popen is `ip`, which exec'd into it, so its pid is the sshd's.
        return self.sshd.pid

    def stop(self) -> None:
        if self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(5)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10)
        # The namespace goes when its last user does; its veth's peer on the host may outlive the call.
        subprocess.run(["ip", "link", "del", f"spvm-h{self.index}"], capture_output=True, timeout=10)
        shutil.rmtree(self.work, ignore_errors=True)
        try:
            os.rmdir(self.private)
        except OSError:
            pass


def _free_index() -> int:
    taken = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    for index in range(20, 250):
        names = (f"spvm-br{index}:", f"spvm-h{index}@", f"spvm-h{index}:")
        if not any(n in taken for n in names) and not Path(f"/run/netns/spvm-am{index}").exists():
            return index
    raise RuntimeError("no free agent-machine index: remove leftover spvm-br*/spvm-am* links and namespaces")


def start_agent_machine(index: int | None = None, work: Path | None = None) -> AgentMachineRig:
    """A running agent machine (number `index`, or the first free one); `stop()` removes every trace of it.

    Its keys, sshd config and log go to `work` (a new temporary directory by default; root's, 0700).
    """
    index = _free_index() if index is None else index
    work = work or Path(tempfile.mkdtemp(prefix=f"spvm-am{index}-"))
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    netns, bridge = f"spvm-am{index}", f"spvm-br{index}"
    host_end, machine_end = f"spvm-h{index}", f"spvm-a{index}"
    _ip("netns", "add", netns)
    _ip("link", "add", bridge, "type", "bridge")
    _ip("link", "add", host_end, "type", "veth", "peer", "name", machine_end)
    _ip("link", "set", host_end, "master", bridge)
    _ip("link", "set", machine_end, "netns", netns)
    _ip("addr", "add", f"10.213.{index}.1/24", "dev", bridge)
    for link in (bridge, host_end):
        _ip("link", "set", link, "up")
    for args in (
        ("addr", "add", f"10.213.{index}.2/24", "dev", machine_end),
        ("link", "set", machine_end, "up"),
        ("link", "set", "lo", "up"),
    ):
        _ip("-n", netns, *args)
    for key in ("host_key", "root_key"):
        _keygen(work / key)
    # As docs/takeover.md tells an operator to install root's dedicated key: no pty, no agent or X11
    # forwarding, no ~/.ssh/rc; only commands and the forwards the takeover makes.
    (work / "authorized_keys").write_text(f"{AUTHORIZED_OPTIONS} {(work / 'root_key.pub').read_text()}")
    (work / "known_hosts").write_text(f"10.213.{index}.2 {' '.join((work / 'host_key.pub').read_text().split()[:2])}\n")
    (work / "sshd_config").write_text(
        "\n".join(
            [
                "Port 22",
                f"ListenAddress 10.213.{index}.2",
                f"HostKey {work / 'host_key'}",
                f"AuthorizedKeysFile {work / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "AllowStreamLocalForwarding yes",
                "PidFile none",
                "LogLevel VERBOSE",
            ]
        )
        + "\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    private = f"/srv/spvm-am-{index}"
    os.makedirs(private, exist_ok=True)
    # /etc/secret-proxy too: the takeover writes the agent's address there, in the machine, not on this host.
    os.makedirs(MACHINE_ETC, exist_ok=True)
    script = (
        f"mount -t tmpfs -o mode=0755 spvm-am {private} && mount -t tmpfs -o mode=0755 spvm-etc {MACHINE_ETC} "
        f"&& exec {SSHD} -D -e -f {work / 'sshd_config'}"
    )
    log = open(work / "sshd.log", "wb")
    sshd = subprocess.Popen(
        ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
        stdout=log,
        stderr=log,
    )
    rig = AgentMachineRig(index, work, sshd)
    deadline = time.monotonic() + 15
    while b"Server listening" not in (work / "sshd.log").read_bytes():
        if sshd.poll() is not None or time.monotonic() > deadline:
            said = (work / "sshd.log").read_text(errors="replace")
            rig.stop()
            raise RuntimeError(f"the agent machine's sshd did not start: {said[-500:]}")
        time.sleep(0.05)
    return rig


def remove_agent_machine(index: int) -> None:
    """Remove machine `index` without its handle (the demo's, after the demo ended): its sshd, links and namespace."""
    pids = subprocess.run(["ip", "netns", "pids", f"spvm-am{index}"], capture_output=True, text=True, timeout=10)
    for pid in pids.stdout.split():
        subprocess.run(["kill", "-9", pid], check=False, capture_output=True)
    for argv in (["ip", "netns", "del", f"spvm-am{index}"], ["ip", "link", "del", f"spvm-br{index}"]):
        subprocess.run(argv, capture_output=True, timeout=10)
    subprocess.run(["ip", "link", "del", f"spvm-h{index}"], capture_output=True, timeout=10)
    try:
        os.rmdir(f"/srv/spvm-am-{index}")
    except OSError:
        pass
