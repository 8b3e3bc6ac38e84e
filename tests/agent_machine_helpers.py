"""Support for the agent-machine tests: the machine itself is scripts/agent_machine.py's (the demo makes one
too); here, a QEMU with a monitor and a qcow2 but no guest started inside it as the agent."""

from __future__ import annotations

import json
from dataclasses import dataclass

from scripts.agent_machine import AgentMachineRig, start_agent_machine

__all__ = ["AgentMachineRig", "QemuInMachine", "start_agent_machine", "start_qemu_in_machine", "write_in_machine"]


@dataclass
class QemuInMachine:
    """A QEMU with `-machine none` started in the agent machine as `user`: a real monitor and open qcow2, no guest."""

    rig: AgentMachineRig
    dir: str  # in the machine's private directory: the host cannot see it
    pid: int
    proxy_port: int
    user: str

    @property
    def monitor(self) -> str:
        return f"{self.dir}/qmp.sock"

    @property
    def disk(self) -> str:
        return f"{self.dir}/disk.qcow2"

    @property
    def pidfile(self) -> str:
        return f"{self.dir}/qemu.pid"

    @property
    def ready(self) -> str:
        return f"{self.dir}/ready"

    def write_ready(self, **fields: object) -> str:
        """The ready file vm_image writes, with `fields` changed (the agent's to write as it likes)."""
        data = {
            "version": 1,
            "monitor": self.monitor,
            "disk": self.disk,
            "pid": self.pid,
            "pidfile": self.pidfile,
            "proxy": {"host": "127.0.0.1", "port": self.proxy_port},
            **fields,
        }
        write_in_machine(self.rig, self.ready, "READY_FOR_TAKEOVER\n" + json.dumps(data) + "\n", self.user)
        return self.ready

    def alive(self) -> bool:
        return self.rig.inside(["kill", "-0", str(self.pid)]).returncode == 0

    def kill(self) -> None:
        """This QEMU, and the one its pidfile names now (a rollback's replay), both gone."""
        pids = {str(self.pid), self.rig.inside(["cat", self.pidfile]).stdout.decode().strip()}
        self.rig.inside(["kill", "-9", *sorted(p for p in pids if p.isdigit())])


def write_in_machine(rig: AgentMachineRig, path: str, text: str, user: str | None = None) -> None:
    got = rig.inside(["sh", "-c", 'cat > "$0"', path], user=user, input=text.encode())
    assert got.returncode == 0, got.stderr


def start_qemu_in_machine(
    rig: AgentMachineRig, user: str, name: str = "vm", *, disk_size: str = "64M"
) -> QemuInMachine:
    """A directory of `user`'s in the machine's private tmpfs with a qcow2, and a QEMU on it as `user`."""
    directory = f"{rig.private}/{name}"
    assert rig.inside(["install", "-d", "-o", user, "-m", "0755", directory]).returncode == 0
    disk = f"{directory}/disk.qcow2"
    made = rig.inside(["qemu-img", "create", "-q", "-f", "qcow2", disk, disk_size], user=user)
    assert made.returncode == 0, made.stderr
    port = 20000 + rig.index * 10 + len(name) % 10  # inside the machine's own network namespace: nothing else there
    argv = [
        "qemu-system-x86_64",
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-drive",
        f"file={disk},if=none,id=d0,format=qcow2",
        "-netdev",
        f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:3737",
        "-qmp",
        f"unix:{directory}/qmp.sock,server=on,wait=off",
        "-daemonize",
        "-pidfile",
        f"{directory}/qemu.pid",
    ]
    started = rig.inside(argv, user=user)
    assert started.returncode == 0, started.stderr
    pid = int(rig.inside(["cat", f"{directory}/qemu.pid"]).stdout)
    vm = QemuInMachine(rig, directory, pid, port, user=user)
    vm.write_ready()
    return vm
