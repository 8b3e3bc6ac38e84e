"""An agent machine made on this machine, for tests: what Multipass or libvirt give an agent elsewhere.

A network namespace with its own address on a bridge the test creates (the host keeps the bridge's
address, as Multipass's `mpqemubr0` does), a mount namespace of its own in which `/srv/spvm-am-N` is
a tmpfs the host cannot see, and its own sshd in both, which lets the host in as root with a key and
shows a host key the host pins. Addresses are 10.213.N.0/24, inside namespaces the test made; nothing
leaves this machine.
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

    def inside(self, argv: list[str], *, timeout: float = 60, user: str | None = None) -> subprocess.CompletedProcess:
        """Run `argv` in the machine (its network and mount namespaces), as root or as `user`."""
        as_user = ["runuser", "-u", user, "--"] if user else []
        enter = ["nsenter", f"--target={self.sshd.pid}", "--mount", "--net", "--"]
        return subprocess.run([*enter, *as_user, *argv], capture_output=True, timeout=timeout)

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


def start_agent_machine() -> AgentMachineRig:
    """A running agent machine; `stop()` removes every trace of it."""
    index = _free_index()
    work = Path(tempfile.mkdtemp(prefix=f"spvm-am{index}-"))
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
    shutil.copy(work / "root_key.pub", work / "authorized_keys")
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
    script = f"mount -t tmpfs -o mode=0755 spvm-am {private} && exec {SSHD} -D -e -f {work / 'sshd_config'}"
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
