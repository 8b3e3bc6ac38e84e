"""The proxy in a taken-over VM, for a benchmark: built and launched by the agent, taken over by root.

The roles are the slow tests' (tests/vm_fixtures.py): the unprivileged `agent`
user runs `vm_image build` (cached) and `vm_image launch` under TCG; root runs the
real `python -m takeover run` with the benchmark's proxy settings; the host then
operates the proxy over the SSH key the takeover made. On leaving, the host's VM
is stopped, the agent's VM too if the takeover never took it, and every file is
removed, whatever happened.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from proxy.demo import free_port
from takeover.config import TakeoverConfig
from takeover.host.ssh import SSHTarget
from takeover.models import Endpoint
from tests import vm_fixtures
from vm_image.guest_files import DATA_DIR, VENV

ROOT = Path(__file__).resolve().parent.parent
GUEST_PYTHON = (f"{VENV}/bin/python", "-I")  # the proxy's venv; -I: nothing of the caller's on sys.path


QEMU_USER = "spvm-bench-qemu"  # its own: the egress rules match QEMU's user, a running demo keeps its own


def guest_url(host_port: int) -> str:
    """A port on the host's loopback as the guest's proxy reaches it: through the host's egress proxy,
    which resolves 127.0.0.1 on the host (the only place this benchmark names it)."""
    return f"http://127.0.0.1:{host_port}"


@dataclass(frozen=True)
class TakenOverVM:
    host_dir: Path
    proxy_port: int  # the forwarded port on 127.0.0.1, the agents' way in
    ssh: SSHTarget  # the host's login as `proxy`

    def argv(self, *remote: str) -> list[str]:
        # ssh hands the remote shell one string: quote each word so it arrives as given.
        return self.ssh.argv(shlex.join(remote))

    def run(self, *remote: str, stdin: str = "", timeout: float = 300) -> str:
        done = subprocess.run(self.argv(*remote), input=stdin, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"in the VM, {remote[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done.stdout

    def python(self, code: str, *args: str, stdin: str = "") -> str:
        """Python in the VM, as the proxy user, with the proxy's venv; its data directory is argv[1]."""
        return self.run(*GUEST_PYTHON, "-c", code, DATA_DIR, *args, stdin=stdin)


@contextmanager
def taken_over_vm(
    proxy_settings: str,
    *,
    allow_telegram_api_url: str,
    memory_mb: int = TakeoverConfig.memory_mb,
    cpus: int = TakeoverConfig.cpus,
) -> Iterator[TakenOverVM]:
    """A VM taken over with `proxy_settings` (TOML) as its proxy's config.toml, of `memory_mb` and `cpus`
    (the takeover's --memory and --cpus; the agent's VM has vm_image's defaults); removed on exit."""
    work = Path(tempfile.mkdtemp(prefix="spx-bench-vm-", dir="/var/tmp"))  # root's, 0700: the takeover trusts it
    host_dir = work / "host"
    agent_state = Path(tempfile.mkdtemp(prefix="bench-state-", dir=vm_fixtures.TEST_ROOT))
    agent = vm_fixtures.ensure_agent_user()
    os.chown(agent_state, agent.uid, agent.gid)
    try:
        vm = vm_fixtures.launch_agent_vm(agent_state)
        config = work / "proxy.toml"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the bot token
        with os.fdopen(fd, "w") as f:
            f.write(proxy_settings)
        ssh_port = free_port()
        options = {
            "--ready-file": vm.ready,
            "--host-dir": host_dir,
            "--ssh-listen": f"127.0.0.1:{ssh_port}",
            "--proxy-config": config,
            "--allow-telegram-api-url": allow_telegram_api_url,
            "--accel": "tcg",
            "--qemu-user": QEMU_USER,
            "--memory": memory_mb,
            "--cpus": cpus,
        }
        argv = [sys.executable, "-m", "takeover", "run", *(str(x) for pair in options.items() for x in pair)]
        # Its progress goes to our stderr; its summary to stderr too, so stdout stays the benchmark's.
        if subprocess.run(argv, cwd=ROOT, stdout=sys.stderr, timeout=1800).returncode != 0:
            raise SystemExit("the takeover failed (its error is above)")
        endpoint = Endpoint("127.0.0.1", ssh_port)
        yield TakenOverVM(host_dir, vm.proxy_port, SSHTarget(endpoint, host_dir / "host_key", host_dir / "known_hosts"))
    finally:
        vm_fixtures.stop_both_vms(host_dir, agent_state)
        shutil.rmtree(agent_state, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
