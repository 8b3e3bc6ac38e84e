"""Run a program on the agent's files as the agent's own user, in a sandbox, never as root.

A qcow2 image is a little program for its reader: its header names backing files
and data files by any path, and qemu-img's parsers are large C code. Root reading
an agent's image would let a hostile header make root read `/etc/shadow` into the
"disk", or aim a parser bug at root. So `qemu-img` runs on the agent's disk as the
agent: its uid, its gid and its groups, no new privileges and no capabilities
(setpriv), in a new network namespace with nothing in it (unshare), in a new
session with stdin from /dev/null, a clean environment, cwd /, only the
descriptors named here, and hard resource limits (prlimit: no file may be
written, bounded memory, CPU time and descriptors). What it reaches is what the
agent could reach by running it itself. Its output (stdout, stderr, and whatever
it sends over a passed socket) is the agent's and is read as such: bounded,
parsed in Python, never trusted.
"""

from __future__ import annotations

import os
import pwd
import selectors
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from vm_image.shutdown import kill_group

from ..errors import TakeoverError

SAFE_PATH = "/usr/bin:/bin"
MAX_OUTPUT = 1 << 20  # bytes of stdout plus stderr; `qemu-img info` prints a few KiB
ADDRESS_SPACE = 4 << 30  # qemu-img maps thread stacks and its coroutine pool; 4 GiB is plenty
OPEN_FILES = 256


class SandboxError(TakeoverError):
    hint = (
        "the agent's disk is read only as the agent's own user; look at the agent's disk and its backing "
        "files (as the agent) and rerun `python -m takeover run`, or `python -m takeover rollback`"
    )


@dataclass(frozen=True)
class AgentUser:
    """The credentials the sandbox runs with: the agent's uid, primary gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def owner_of(cls, st: os.stat_result, what: str) -> AgentUser:
        """The owner of a file the agent made (its disk): that account's gid and groups, as at login.

        Refuses root: a root-owned file is not an agent's, and the sandbox never runs as root.
        """
        if st.st_uid == 0:
            raise SandboxError(
                f"{what} is owned by root; the takeover reads an agent's disk only as that "
                f"(unprivileged) agent, never as root",
                hint="run the agent's VM as the agent's own user, with a disk that user owns",
            )
        try:
            entry = pwd.getpwuid(st.st_uid)
        except KeyError:  # a uid without an account: only the file's group, no supplementary groups
            return cls(st.st_uid, st.st_gid)
        groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
        return cls(entry.pw_uid, entry.pw_gid, groups)


@dataclass(frozen=True)
class SandboxResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    def error_text(self, limit: int = 400) -> str:
        return self.stderr.decode("utf-8", "replace").strip()[-limit:] or f"exit status {self.returncode}"


def sandbox_argv(argv: list[str], agent: AgentUser, *, cpu_seconds: int) -> list[str]:
    """The command line that runs `argv` as `agent` in the sandbox (pure: tested without running it)."""
    if agent.uid == 0 or agent.gid == 0 or 0 in agent.groups:
        raise SandboxError("the sandbox never runs with root's uid, gid or group")
    groups = [f"--groups={','.join(str(g) for g in agent.groups)}"] if agent.groups else ["--clear-groups"]
    return [
        # A new network namespace: only a loopback that is down. The agent's image can name
        # nbd://, http:// or ssh:// "backing files"; none of them can connect anywhere.
        "unshare",
        "--net",
        "--",
        # Hard limits (soft = hard): the sandbox writes no file at all, and cannot grow without bound.
        "prlimit",
        "--fsize=0:0",
        "--core=0:0",
        f"--as={ADDRESS_SPACE}:{ADDRESS_SPACE}",
        f"--nofile={OPEN_FILES}:{OPEN_FILES}",
        f"--cpu={cpu_seconds}:{cpu_seconds}",
        "--",
        "setpriv",
        f"--reuid={agent.uid}",
        f"--regid={agent.gid}",
        *groups,
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        *argv,
    ]


def run_as_agent(
    argv: list[str],
    agent: AgentUser,
    *,
    timeout: float,
    pass_fds: tuple[int, ...] = (),
    while_running: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> SandboxResult:
    """Run `argv` in the sandbox as `agent`; returns its exit status and (bounded) output.

    `while_running`, if given, is called once the process has started (e.g. to serve a socket
    passed in `pass_fds`); the output is read after it returns. Raises SandboxError when the
    process outlives `timeout` or prints more than MAX_OUTPUT bytes; it is killed then.
    """
    name = os.path.basename(argv[0])
    full = sandbox_argv(argv, agent, cpu_seconds=max(1, int(timeout)))
    deadline = time.monotonic() + timeout
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": "/nonexistent"}
    child = subprocess.Popen(
        full,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env=env,
        close_fds=True,
        pass_fds=pass_fds,
        start_new_session=True,
    )
    try:
        if while_running is not None:
            while_running(child)
        stdout, stderr = _read_bounded(child, deadline, name)
        returncode = child.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise SandboxError(f"{name} run as the agent did not finish within {timeout:.0f} s and was killed") from None
    finally:
        # The sandbox is its own session: anything it started goes with it, even after the first process ended.
        kill_group(child)
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()
    return SandboxResult(returncode, stdout, stderr)


def _read_bounded(child: subprocess.Popen[bytes], deadline: float, name: str) -> tuple[bytes, bytes]:
    assert child.stdout is not None and child.stderr is not None  # started with both piped
    out: dict[int, bytearray] = {child.stdout.fileno(): bytearray(), child.stderr.fileno(): bytearray()}
    total = 0
    with selectors.DefaultSelector() as sel:
        for fd in out:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(child.args, 0)
            for key, _ in sel.select(timeout=left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                total += len(chunk)
                if total > MAX_OUTPUT:
                    raise SandboxError(f"{name} run as the agent printed more than {MAX_OUTPUT} bytes; killed")
                out[key.fd] += chunk
    return bytes(out[child.stdout.fileno()]), bytes(out[child.stderr.fileno()])
