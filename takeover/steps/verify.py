"""Step 6: prove the host's VM is the one answering, and that only the host can log in.

* /health answers through the forwarded proxy port, and the socket listening
  there belongs to the host's QEMU (an agent could otherwise squat the port
  with a fake proxy while QEMU was down);
* SSH with the host's key succeeds with strict host key checking against the
  pinned known_hosts, and the key the VM shows is the one the host made;
* the agent's setup key is refused, and the server offers no password login.

After the cut-over's resume it also tells the proxy to retry Telegram now (`secret-proxy telegram
retry-now`): the bot backed off in the first boot's network, which has no way out. That is a note in
the result, never a failed step.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vm_image import health, proc

from ..agent.machine import check_remote_path
from ..errors import InvalidInput, TakeoverError, VerifyError, from_vm_image
from ..host.files import check_trusted_parent, create_private, create_private_under_trusted_dirs, write_all
from ..host.keys import load_host_keys
from ..host.monitor import Monitor, Peer
from ..host.ports import listener_pids
from ..host.qmp_jobs import delete_snapshot
from ..host.regular_file import read_regular
from ..host.runners import DISK_NODE
from ..host.ssh import SSHTarget, SSHTimeout, run_bounded
from ..host.vm_checks import CLI, check_host_login
from ..models import Endpoint
from .context import Context
from .restart import RestartResult

AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SECRET_PATTERNS = re.compile(r"^[A-Za-z0-9_.*?-]+(,[A-Za-z0-9_.*?-]+)*$")
RETRY_NOW_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class AgentToken:
    """The agent the run created in the fresh proxy, and the file its token is in (never the token)."""

    agent: str
    secrets: str
    token_file: str


@dataclass(frozen=True)
class VerifyResult:
    """Step 6's result: what was proven about the host's VM, and how long it took."""

    health_seconds: float
    ssh_seconds: float
    listener_pids: list[int]
    host_key: str
    auth_methods: list[str]
    agent_key: str  # "refused", or why the agent's setup key was not tried
    seconds: float
    agent_token: AgentToken | None = None
    # The cut-over's snapshot of the first boot, deleted once the VM is verified: loading it again
    # would roll the disk back to an empty proxy and lose every secret stored since.
    prepared_snapshot: str | None = None
    # After that resume, `secret-proxy telegram retry-now`: its line, or why it did not work. The bot backed
    # off in the first boot's network, which has no way out; a bot not woken retries within its backoff cap.
    telegram_retry: str | None = None


def verify_host_vm(
    proxy: Endpoint,
    ssh: SSHTarget,
    qemu_pid: int,
    *,
    setup_key_pub: str | None,
    agent_uid: int | None,
    timeout: float,
    progress: Callable[[str], None] = lambda _: None,
    agent_private: bytes | None = None,
) -> VerifyResult:
    started = time.monotonic()
    alive = _pid_alive(qemu_pid)
    progress(f"waiting for {proxy.url}/health (the guest is booting)")
    with from_vm_image(VerifyError, "the host's VM: "):
        health_s = health.wait_for_health(proxy.url, timeout, alive)
    owners = listener_pids(proxy)
    if qemu_pid not in owners:
        raise VerifyError(
            f"{proxy} is answered by pid(s) {sorted(owners) or 'unknown'}, not by the host's QEMU "
            f"(pid {qemu_pid}); another process holds the proxy's port"
        )
    progress("checking SSH with the host's key and the pinned host key")
    login = check_host_login(ssh, timeout - (time.monotonic() - started), alive)
    agent_key = check_agent_key_refused(ssh, setup_key_pub, agent_uid, agent_private)
    return VerifyResult(
        health_seconds=round(health_s, 3),
        ssh_seconds=login.seconds,
        listener_pids=sorted(owners),
        host_key=login.host_key,
        auth_methods=login.auth_methods,
        agent_key=agent_key,
        seconds=round(time.monotonic() - started, 3),
    )


def _pid_alive(pid: int) -> Callable[[], bool]:
    try:
        ticks = proc.start_ticks(pid)
    except OSError:
        return lambda: False
    return lambda: proc.alive(pid, ticks)


def check_agent_key_refused(
    ssh: SSHTarget, setup_key_pub: str | None, agent_uid: int | None, private: bytes | None = None
) -> str:
    """Log in with the agent's own setup key; it must be refused.

    `private` is the key when it was fetched elsewhere (from an agent machine); `agent_uid` is then
    the unprivileged user whose ssh parses it.
    """
    if not setup_key_pub:
        return "no setup key named in the ready file; not tried"
    if private is None:
        private = read_agent_private_key(Path(setup_key_pub).with_suffix(""), agent_uid)
    if private is None:
        return f"no readable private key next to {setup_key_pub}; not tried"
    if agent_uid is None:
        return "the agent's uid is unknown; not tried"
    # The key is the agent's text: the ssh that parses it runs as the agent, never as root.
    with tempfile.TemporaryDirectory(prefix="takeover-agentkey-") as tmp:
        gid = _primary_gid(agent_uid)
        os.chown(tmp, agent_uid, gid)
        key, known_hosts = Path(tmp) / "setup_key", Path(tmp) / "known_hosts"
        # Not files.write_atomic: new files in a directory made for this one login and deleted after it
        # (nothing to replace, no crash to outlast), and given to the agent's uid, which write_atomic never does.
        for path, data in ((key, private), (known_hosts, ssh.known_hosts.read_bytes())):
            fd = create_private(path)
            try:
                write_all(fd, data)
                os.fchown(fd, agent_uid, gid)
            finally:
                os.close(fd)
        as_agent = [
            "setpriv",
            f"--reuid={agent_uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--",
            "env",
            "-i",
            f"HOME={tmp}",
            "PATH=/usr/bin:/bin",
        ]
        result = run_bounded([*as_agent, *dataclasses.replace(ssh, known_hosts=known_hosts).argv("true", key=key)])
    if result.returncode == 0:
        raise VerifyError("the agent's setup key still logs in to the VM")
    if "Permission denied" not in result.stderr:
        raise VerifyError(f"the agent's setup key failed for an unexpected reason: {result.stderr.strip()!r}")
    return "refused"


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


def read_agent_private_key(path: Path, agent_uid: int | None) -> bytes | None:
    """The agent's setup key, read without following links and only if the agent owns it."""
    try:
        return read_regular(path, 16384, owner=agent_uid)[0]
    except OSError:  # missing, a link, not a regular file, not the agent's, or too large: not tried
        return None


def create_agent_token(ssh: SSHTarget, name: str, patterns: str, token_file: Path) -> AgentToken:
    """`secret-proxy agents add NAME --secrets PATTERNS` over the host's SSH; token to a new 0600 file.

    The file is created 0600 with O_EXCL and O_NOFOLLOW in a directory reached from / without
    following any link, every directory root's: a symlinked directory the agent planted on the
    path would otherwise carry the token to a place it can read.
    """
    if not AGENT_NAME.match(name):
        raise InvalidInput(f"agent name {name!r} must match {AGENT_NAME.pattern}")
    if not SECRET_PATTERNS.match(patterns):
        raise InvalidInput(f"secret patterns {patterns!r} must be comma-separated globs of [A-Za-z0-9_.*?-]")
    # ssh joins the remote words into one shell line; both values are checked above, and the
    # patterns are quoted so the remote shell does not expand their globs.
    check_trusted_parent(token_file, "--token-file")  # before the agent exists in the VM
    result = ssh.run(CLI, "agents", "add", name, "--secrets", f"'{patterns}'")
    token = result.stdout.strip()
    if result.returncode != 0 or not token or len(token.split()) != 1:
        raise VerifyError(f"`secret-proxy agents add {name}` failed in the VM: {result.stderr.strip()[-300:]}")
    # Not files.write_atomic, which replaces: the token file is created and never replaced (one already there
    # is refused), in the directory the walk from / reached without following a link.
    fd = create_private_under_trusted_dirs(token_file, "--token-file")
    try:
        write_all(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return AgentToken(name, patterns, str(token_file))


def step_verify(ctx: Context) -> VerifyResult:
    cfg = ctx.cfg
    source = ctx.source
    restart = ctx.journal.read("restart", RestartResult)
    key, known_hosts = load_host_keys(ctx.host_dir)
    ssh = SSHTarget(cfg.ssh_listen, key, known_hosts)
    agent_uid, agent_private = source.uid, None
    if source.machine is not None and source.setup_key_pub:
        # The key is in the agent machine: fetched (bounded), and tried as the copy user, never as root.
        agent_uid, agent_private = pwd.getpwnam(cfg.copy_user).pw_uid, _machine_setup_key(ctx, source.setup_key_pub)
    result = verify_host_vm(
        source.proxy,
        ssh,
        restart.pid,
        setup_key_pub=source.setup_key_pub,
        agent_uid=agent_uid,
        timeout=cfg.boot_timeout,
        progress=ctx.note,
        agent_private=agent_private,
    )
    ctx.note(f"/health after {result.health_seconds:.0f} s; SSH as the host works; the agent's key: {result.agent_key}")
    if restart.spec.loadvm:
        delete_prepared(restart)
        ctx.note(f"deleted {restart.spec.loadvm} from the disk: a later start boots cold, never back to it")
        result = dataclasses.replace(result, prepared_snapshot="deleted", telegram_retry=retry_telegram_now(ssh))
        ctx.note(f"Telegram: {result.telegram_retry}")
    if cfg.agent_name:
        token_file = cfg.token_file or ctx.host_dir / f"agent-{cfg.agent_name}.token"
        if token_file.exists():
            ctx.note(f"{token_file} exists from an earlier attempt; not creating the agent again")
            token = AgentToken(cfg.agent_name, cfg.agent_secrets, str(token_file))
        else:
            token = create_agent_token(ssh, cfg.agent_name, cfg.agent_secrets, token_file)
            ctx.note(f"agent {cfg.agent_name!r} created; token in {token_file} (0600)")
        return dataclasses.replace(result, agent_token=token)
    return result


def retry_telegram_now(ssh: SSHTarget) -> str:
    """Tell the resumed proxy to retry Telegram now (SIGUSR1, by the CLI as the proxy's user), not after the
    rest of the backoff it began where Telegram was out of reach. Never fails the step: says what happened."""
    try:
        result = ssh.run(CLI, "telegram", "retry-now", timeout=RETRY_NOW_TIMEOUT_SECONDS)
    except SSHTimeout as exc:
        return f"not asked to retry now: {exc}"
    if result.returncode == 0:
        return result.stdout.strip()[-300:]
    return f"not asked to retry now (exit {result.returncode}): {result.stderr.strip()[-300:]}"


def delete_prepared(restart: RestartResult) -> None:
    """Delete the snapshot the running VM was resumed from, through its own monitor (the disk is in use)."""
    spec = restart.spec

    def check_peer(peer: Peer) -> None:
        if peer.pid != restart.pid:
            raise VerifyError(
                f"the monitor {spec.monitor} belongs to pid {peer.pid}, not the host's QEMU {restart.pid}"
            )

    tag = spec.loadvm or ""
    with Monitor(spec.monitor, check_peer=check_peer) as mon:
        delete_snapshot(mon, tag, [DISK_NODE], VerifyError, "takeover-prepared-delete")


def _machine_setup_key(ctx: Context, setup_key_pub: str) -> bytes | None:
    private = str(Path(setup_key_pub).with_suffix(""))
    try:
        return ctx.machine().read_file(check_remote_path(private), 16384)
    except TakeoverError:
        return None  # gone or unreadable: reported as not tried
