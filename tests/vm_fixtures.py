"""The agent's VM for the slow tests, made the way an agent makes it.

An unprivileged `agent` user runs `python -m vm_image build` (once per test
run; vm_image's own cache makes later runs quick) and `python -m vm_image
launch` for each test, on a copy of that image in a fresh state directory.
Nothing here builds or boots anything by other means.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from proxy.demo import free_port  # noqa: F401 (the tests import it from here)
from scripts.demo import run_as_agent
from vm_image import proc
from vm_image.control import read_ready
from vm_image.ssh_command import agent_login_argv

ROOT = Path(__file__).resolve().parent.parent
AGENT_USER = "agent"
# Where the agent works and root can look (not under /tmp/pytest-of-root, which is 0700).
TEST_ROOT = Path("/var/tmp/secret-proxy-vm-tests")
IMAGE_STATE = TEST_ROOT / "agent-image"
AGENT_CACHE = TEST_ROOT / "agent-cache"


@dataclass(frozen=True)
class AgentUser:
    name: str
    uid: int
    gid: int
    home: Path


def ensure_agent_user() -> AgentUser:
    """The `agent` user (created if missing; useradd also gives it the subordinate ids mmdebstrap needs)."""
    try:
        entry = pwd.getpwnam(AGENT_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/bash", AGENT_USER], check=True, capture_output=True
        )
        entry = pwd.getpwnam(AGENT_USER)
    TEST_ROOT.mkdir(mode=0o755, exist_ok=True)
    for path in (IMAGE_STATE, AGENT_CACHE):
        path.mkdir(mode=0o700, exist_ok=True)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return AgentUser(AGENT_USER, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))


def as_agent(argv: list[str], *, timeout: float = 1800, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run a command as the agent, in its home, with a plain environment (the demo's way: one recipe)."""
    return run_as_agent(ensure_agent_user().name, argv, stdin=stdin or "", timeout=timeout)


def vm_image_as_agent(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    result = as_agent([sys.executable, "-m", "vm_image", *args], timeout=timeout)
    sys.stderr.write(result.stderr)
    return result


def agent_image() -> Path:
    """The agent's built image (its state directory); `vm_image build` as the agent, reused when unchanged."""
    ensure_agent_user()
    result = vm_image_as_agent("build", "--state-dir", str(IMAGE_STATE), "--cache-dir", str(AGENT_CACHE))
    if result.returncode != 0:
        raise RuntimeError(f"vm_image build failed as {AGENT_USER}:\n{result.stderr[-3000:]}")
    return IMAGE_STATE


@dataclass
class AgentVM:
    """The agent's VM as `vm_image launch` leaves it: running as the agent, with a ready file."""

    state: Path
    ready: Path
    proxy_port: int
    ssh_port: int
    uid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def ready_data(self) -> dict:
        return read_ready(self.ready)

    def ssh_as_agent(self, *remote: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        """What the agent can do with its setup key (run as the agent user)."""
        argv = agent_login_argv(self.ssh_port, *remote, key=self.state / "image/setup_key")
        return as_agent(argv, stdin=stdin, timeout=120)

    def stop(self) -> None:
        vm_image_as_agent("stop", "--state-dir", str(self.state), "--timeout", "20", timeout=120)

    def discard(self) -> None:
        """Kill the QEMU its pid file names (the agent's, or a rollback's replay of it) and remove its state."""
        try:
            pid = int((self.state / "run/qemu.pid").read_text())
            proc.terminate(pid, proc.start_ticks(pid), grace=5)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.state, ignore_errors=True)


def launch_agent_vm(state: Path | None = None, memory_mb: int = 256) -> AgentVM:
    """A copy of the agent's image in a fresh state directory, started as the agent with `vm_image launch`."""
    user = ensure_agent_user()
    image = agent_image()
    if state is None:
        state = Path(tempfile.mkdtemp(prefix="agent-state-", dir=TEST_ROOT))
        os.chown(state, user.uid, user.gid)
    copied = as_agent(["cp", "-a", "--sparse=always", str(image / "image"), str(state / "image")], timeout=300)
    if copied.returncode != 0:
        raise RuntimeError(f"copying the agent's image failed: {copied.stderr}")
    proxy_port, ssh_port = free_port(), free_port()
    result = vm_image_as_agent(
        "launch",
        "--state-dir",
        str(state),
        "--port",
        str(proxy_port),
        "--ssh-port",
        str(ssh_port),
        "--memory",
        str(memory_mb),
        "--accel",
        "tcg",
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(f"vm_image launch failed as {AGENT_USER}:\n{result.stderr[-3000:]}")
    return AgentVM(state, state / "run/ready", proxy_port, ssh_port, user.uid)


def up_agent_vm_on(base: Path, prefix: str) -> AgentVM:
    """The agent's VM on a cloud image: `vm_image up --base-image` as the agent, in a fresh state directory."""
    user = ensure_agent_user()
    state = Path(tempfile.mkdtemp(prefix=prefix, dir=TEST_ROOT))
    os.chown(state, user.uid, user.gid)
    vm = AgentVM(state, state / "run/ready", free_port(), free_port(), user.uid)
    up = vm_image_as_agent(
        "up",
        "--state-dir",
        str(state),
        "--cache-dir",
        str(AGENT_CACHE),
        "--base-image",
        str(base),
        "--port",
        str(vm.proxy_port),
        "--ssh-port",
        str(vm.ssh_port),
        "--memory",
        "512",
        "--accel",
        "tcg",
        "--timeout",
        "900",
    )
    if up.returncode != 0:
        vm.stop()
        raise RuntimeError(f"vm_image up --base-image failed as {AGENT_USER}:\n{up.stderr[-3000:]}")
    return vm


def stop_both_vms(host_dir: Path, agent_state: Path) -> None:
    """Stop and remove the host's VM in `host_dir` (`takeover remove`: its egress table and the users its
    run created go too, where a stop and `rm -r` would leave the table for the uid) and, if a takeover
    failed early and left it running, the agent's; the demo's record of what it made goes too."""
    from scripts.demo import parse_args, run_record_path

    subprocess.run(
        [sys.executable, "-m", "takeover", "remove", "--stop", "--host-dir", str(host_dir)],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    run_record_path(parse_args(["--host-dir", str(host_dir)])).unlink(missing_ok=True)
    vm_image_as_agent("stop", "--state-dir", str(agent_state), "--timeout", "20", timeout=120)
