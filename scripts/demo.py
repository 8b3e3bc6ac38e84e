#!/usr/bin/env python3
"""`make demo`: the whole story on this machine, playing the agent, the host and the approver.

1. agent (an unprivileged `agent` user): build the image and start the VM (`vm_image up`)
2. host (root): take the VM over (`takeover run`), store a demo secret and make the agent a token
3. agent: ask for the secret with a reason and wait (`secret-proxy-agent get`)
4. approver: approve, in Telegram when SECRET_PROXY_TELEGRAM_* are set, else with the CLI over SSH
5. agent: gets the value once; a second retrieval fails
6. agent: uses a broker-only key in one API call the proxy makes (`secret-proxy-agent call`), after
   an approval: it gets the API's answer, never the key
7. agent: the disk, the monitor and SSH all fail

`--clean` stops and removes everything the demo made (the VMs, their files, the users).

"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.agent_machine import AgentMachineRig, remove_agent_machine, start_agent_machine  # noqa: E402
from scripts.agent_watch import start_agent_watch  # noqa: E402
from takeover.agent.nested_vm import AGENT_TOKEN_FILE as MACHINE_TOKEN_FILE  # noqa: E402
from takeover.agent.nested_vm import AGENT_URL_FILE as MACHINE_URL_FILE  # noqa: E402
from takeover.host import serve_back  # noqa: E402
from takeover.host.egress import free_privileged_port  # noqa: E402
from takeover.host.ssh import SSHTarget  # noqa: E402
from takeover.models import Endpoint  # noqa: E402
from vm_image.layout import default_state_dir  # noqa: E402
from vm_image.progress import Steps  # noqa: E402
from vm_image.ssh_command import agent_login_argv  # noqa: E402

PYTHON = str(ROOT / ".venv/bin/python")
SECRET_NAME = "demo-api-key"
BROKERED_NAME = "demo-api-token"  # broker-only: the agent may use it in calls, never hold it
AGENT_TOOL = str(ROOT / "proxy/agent")  # the agent's command, run by Debian's python3 with nothing installed
AGENT_NAME = "demo-agent"
DEMO_MACHINE = 10  # the demo's agent machine: spvm-am10 on spvm-br10, 10.213.10.0/24 (the tests use 20 and up)
# How this machine reaches PyPI and Debian (proxy, CA bundle, index) is the machine's, not root's: the agent gets it.
NETWORK_ENV = {
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
}

# What the agent runs: Debian's python3 in isolated mode, so nothing of the host's is on its path.
# argv: METHOD URL TOKEN [TIMES]; body on stdin; prints [[status, body text], ...].
AGENT_HTTP = r"""
import json, sys, urllib.request, urllib.error
method, url, token = sys.argv[1:4]
times = int(sys.argv[4]) if len(sys.argv) > 4 else 1
body = sys.stdin.read().encode() or None
replies = []
for _ in range(times):
    req = urllib.request.Request(url, method=method, data=body,
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=90) as r:
            replies.append([r.status, r.read().decode()])
    except urllib.error.HTTPError as e:
        replies.append([e.code, e.read().decode()])
print(json.dumps(replies))
"""


def agent_env(user: str) -> dict[str, str]:
    """A plain environment for the agent user: nothing of root's but how the machine reaches the network."""
    env = {"HOME": pwd.getpwnam(user).pw_dir, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "USER": user}
    env.update({k: v for k, v in os.environ.items() if k in NETWORK_ENV or k.startswith(("UV_", "PIP_INDEX"))})
    return env


def run_as_agent(
    user: str,
    argv: list[str],
    *,
    stdin: str = "",
    capture: bool = True,
    timeout: float = 1800,
    where: list[str] | tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`argv` as the agent user with a plain environment; `where` enters the agent's machine first (nsenter)."""
    env = agent_env(user)
    return subprocess.run(
        [*where, "runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv],
        input=stdin,
        capture_output=capture,
        text=True,
        timeout=timeout,
        cwd=env["HOME"],
    )


def agent_http(
    user: str,
    method: str,
    url: str,
    token: str = "",
    body: dict | None = None,
    times: int = 1,
    where: list[str] | tuple[str, ...] = (),
) -> list[tuple[int, str]]:
    """`times` HTTP calls made by the agent user (in its machine, with `where`), each reply as (status, body text)."""
    result = run_as_agent(
        user,
        ["/usr/bin/python3", "-I", "-c", AGENT_HTTP, method, url, token, str(times)],
        stdin=json.dumps(body) if body else "",
        timeout=300,
        where=where,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the agent's HTTP call failed: {result.stderr.strip()}")
    return [(status, text) for status, text in json.loads(result.stdout)]


AGENT_TRY = {
    "read the host's disk": "open(sys.argv[1], 'rb').read(1)",
    "connect to the host's monitor": "import socket; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent-user", default="agent")
    p.add_argument(
        "--agent-state",
        type=Path,
        default=None,
        help="the agent's vm_image state directory (default: its own default); the token goes there too",
    )
    p.add_argument("--host-dir", type=Path, default=Path("/var/lib/secret-proxy-vm"))
    p.add_argument("--port", type=int, default=3737, help="the proxy's port on 127.0.0.1")
    p.add_argument("--agent-ssh-port", type=int, default=2222)
    p.add_argument("--host-ssh-port", type=int, default=2223)
    p.add_argument(
        "--qemu-user",
        default="secret-proxy-vm",
        help="the host VM's QEMU user (its egress rules match it: one per running host VM)",
    )
    p.add_argument("--approve-timeout", type=float, default=600, help="seconds to wait for a Telegram approval")
    p.add_argument(
        "--agent-machine",
        action="store_true",
        help="the agent works in a machine of its own (namespaces and sshd on a bridge, scripts/agent_machine.py): "
        "its VM is nested there, and the host takes it over through SSH and serves it back on the bridge",
    )
    p.add_argument(
        "--agent-machine-index",
        type=int,
        default=DEMO_MACHINE,
        help=f"N of the agent's machine: spvm-amN on the bridge spvm-brN, 10.213.N.0/24 (default {DEMO_MACHINE})",
    )
    p.add_argument("--clean", action="store_true", help="stop and remove everything the demo made")
    return p.parse_args(argv)


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.steps = Steps(total=9, stream=sys.stdout, label="demo ")
        self.user = args.agent_user
        self.host_dir: Path = args.host_dir
        self.url = f"http://127.0.0.1:{args.port}"
        self.rig: AgentMachineRig | None = None
        self.where: list[str] = []  # the prefix that runs a command in the agent's machine (none: on this host)

    # -- the roles ---------------------------------------------------------------------------
    def as_agent(
        self, argv: list[str], stdin: str = "", capture: bool = True, timeout: float = 1800
    ) -> subprocess.CompletedProcess:
        return run_as_agent(self.user, argv, stdin=stdin, capture=capture, timeout=timeout, where=self.where)

    def agent_http(self, method: str, path: str, token: str, body: dict | None = None) -> dict:
        try:
            status, text = agent_http(self.user, method, self.url + path, token, body, where=self.where)[0]
        except RuntimeError as exc:
            raise SystemExit(f"demo: {exc}") from None
        return {"status": status, "body": json.loads(text or "{}")}

    def host_ssh(self, *remote: str, stdin: str = "") -> subprocess.CompletedProcess:
        """The host's login to its VM, as the takeover's own checks make it (takeover.host.ssh.SSHTarget)."""
        target = SSHTarget(
            Endpoint("127.0.0.1", self.args.host_ssh_port), self.host_dir / "host_key", self.host_dir / "known_hosts"
        )
        # ssh hands the remote shell one string: quote each word so spaces and braces arrive as given.
        return subprocess.run(target.argv(shlex.join(remote)), input=stdin, capture_output=True, text=True, timeout=120)

    @property
    def agent_state(self) -> Path:
        return self.args.agent_state or default_state_dir({"HOME": pwd.getpwnam(self.user).pw_dir})

    @property
    def agent_token_file(self) -> Path:
        """Where the agent finds its token: its home, or beside its state when the demo was given one."""
        home = self.args.agent_state or Path(pwd.getpwnam(self.user).pw_dir)
        return home / f"{AGENT_NAME}.token"

    @property
    def host_token_file(self) -> Path:
        """Where the takeover writes the token of the agent it makes (root's, in the host's directory)."""
        return self.host_dir / f"agent-{AGENT_NAME}.token"

    # -- the story ---------------------------------------------------------------------------
    def run(self) -> None:
        started = time.monotonic()
        if self.args.agent_machine:
            self.start_in_machine()
        else:
            with self.steps.step(f"agent ({self.user}): build the image and start the VM — python -m vm_image up"):
                self.ensure_agent_user()
                self.vm_image("up", self.agent_state, capture=False)
        with self.steps.step("host (root): take the VM over — python -m takeover run") as note:
            token_file = self.host_token_file
            argv = self.takeover_argv()
            telegram = self.telegram_config()
            if telegram:
                argv += ["--proxy-config", str(telegram)]
                if os.environ.get("SECRET_PROXY_TELEGRAM_API_URL"):
                    # The operator chose this Bot API (the story test's emulator): say so to the takeover,
                    # which refuses any URL but Telegram's own without it.
                    argv += ["--allow-telegram-api-url", os.environ["SECRET_PROXY_TELEGRAM_API_URL"]]
                note("Telegram settings from SECRET_PROXY_TELEGRAM_* go into the VM (0600, owner proxy)")
            # The agent's view of it: /health polled every 50 ms throughout. Not for an agent machine: its
            # proxy comes back at another address (served back on the machine's bridge).
            watch = None if self.rig else start_agent_watch(self.user, agent_env(self.user), self.url)
            try:
                taken = subprocess.run(argv, cwd=ROOT).returncode
            finally:
                seen = watch.stop() if watch else None
            if taken != 0:
                raise SystemExit(
                    "demo: the takeover failed (its error is above); `python -m takeover rollback` "
                    "brings the agent's VM back"
                )
            if seen is not None:
                note(
                    f"the agent's proxy went unanswered for {seen['longest_gap_s']:.2f} s at the longest "
                    f"({seen['polls']} polls of /health by the agent, every {seen['interval_s'] * 1000:.0f} ms: "
                    "scripts/health_watch.py)"
                )
        with self.steps.step(f"host: store the secret {SECRET_NAME!r} through the host's SSH key") as note:
            value = "sk-demo-" + secrets.token_urlsafe(24)
            self.api_token = "sk-api-" + secrets.token_urlsafe(24)
            self.stored_hash = hashlib.sha256(value.encode()).hexdigest()
            stored = self.host_ssh("/usr/local/bin/secret-proxy", "secrets", "set", SECRET_NAME, stdin=value)
            if stored.returncode != 0:
                raise SystemExit(f"demo: storing the secret failed: {stored.stderr.strip()}")
            note(
                f"$ ssh -i {self.host_dir}/host_key -p {self.args.host_ssh_port} proxy@127.0.0.1 "
                f"secret-proxy secrets set {SECRET_NAME} < value   (sha256 {self.stored_hash[:12]}…)"
            )
            self.api = StandInApi(self.api_token)
            allow = [PYTHON, "-m", "takeover", "egress", "allow", "--host-dir", str(self.host_dir), self.api.url]
            allowed = subprocess.run(allow, cwd=ROOT, capture_output=True, text=True)
            if allowed.returncode != 0:
                raise SystemExit(f"demo: `python {' '.join(allow[1:])}` failed: {allowed.stderr.strip()[-600:]}")
            note(f"$ python -m takeover egress allow {self.api.url}   (the VM may reach it; nothing else but Telegram)")
            stored = self.host_ssh(
                "/usr/local/bin/secret-proxy",
                "secrets",
                "set",
                BROKERED_NAME,
                "--allow-private",
                f"{self.api.url}/v1/",
                "--inject",
                "Authorization: Bearer {value}",
                "--broker-only",
                stdin=self.api_token,
            )
            if stored.returncode != 0:
                raise SystemExit(f"demo: storing the broker-only secret failed: {stored.stderr.strip()}")
            note(
                f"$ … secret-proxy secrets set {BROKERED_NAME} --allow-private {self.api.url}/v1/ "
                "--inject 'Authorization: Bearer {value}' --broker-only < key"
            )
            note(
                f"(a stand-in API on this machine at {self.api.url}, reached from the guest through the host's "
                "egress proxy: no outside network here)"
            )
            if self.rig is None:
                self.hand_token_to_agent(token_file)
                note(f"the agent's token is in {self.agent_token_file} (0600, {self.user})")
            else:
                self.token = token_file.read_text().strip()
                said = self.rig.inside(["cat", MACHINE_URL_FILE]).stdout.decode().strip()
                note(f"the takeover told the agent's machine: {MACHINE_URL_FILE} says {said}; its token is in")
                note(f"{MACHINE_TOKEN_FILE} (0600, {self.user}): the agent's tools read both there")
            token = self.token
        with self.steps.step("agent: ask for the secret, with a reason, and wait — secret-proxy-agent get") as note:
            if self.rig is None:
                note(f"$ SECRET_PROXY_URL={self.url} SECRET_PROXY_TOKEN_FILE={self.agent_token_file} \\")
            else:
                note(f"(in its machine {self.rig.address}, reaching the proxy at {self.url})")
            note(f"  python3 -I {AGENT_TOOL} get {SECRET_NAME} --reason 'demo: call the API once'")
            asking = self.agent_tool("get", SECRET_NAME, "--reason", "demo: call the API once")
            request_id = self.request_id_from(asking, note)
        with self.steps.step("approver: approve") as note:
            self.approve(request_id, note, bool(telegram))
        with self.steps.step("agent: receives the value, once") as note:
            value, errors = asking.communicate(timeout=self.args.approve_timeout + 120)
            for line in errors.splitlines():
                note(line)
            if asking.returncode != 0:
                raise SystemExit(f"demo: secret-proxy-agent get exited {asking.returncode}")
            value_hash = hashlib.sha256(value.encode()).hexdigest()
            match = "the value the host stored" if value_hash == self.stored_hash else "A DIFFERENT VALUE"
            note(f"stdout: {len(value)} characters, {match} (value not shown)")
            again = self.agent_http("GET", f"/v1/requests/{request_id}/secret", token)
            note(f"GET …/{request_id}/secret again → {again['status']} {again['body'].get('error')}")
            if again["status"] != 410:
                raise SystemExit("demo: a second retrieval was not refused")
        with self.steps.step(
            f"agent: use {BROKERED_NAME!r} in one API call, never holding it — secret-proxy-agent call"
        ) as note:
            try:
                self.brokered_call(note, bool(telegram))
            finally:
                withdrawn = self.withdraw_api(note)
            if not withdrawn:
                raise SystemExit("demo: withdrawing the stand-in API failed (see above)")
        with self.steps.step("agent: every other way in is closed") as note:
            self.check_agent_is_locked_out(note)
        with self.steps.step("where everything is") as note:
            note(f"proxy for the agent: {self.url}  (token in {self.agent_token_file})")
            note(f"the host's VM: {self.host_dir} (disk, monitor, keys, report.json)")
            note(
                f"operate it: ssh -i {self.host_dir}/host_key -o UserKnownHostsFile={self.host_dir}/known_hosts "
                f"-p {self.args.host_ssh_port} proxy@127.0.0.1 secret-proxy --help"
            )
            note(f"stop it: {PYTHON} -m takeover stop --host-dir {self.host_dir}")
            note("remove everything the demo made: make clean")
        print(
            f"\ndemo complete in {time.monotonic() - started:.0f} s; step times: "
            + ", ".join(f"{s:.0f} s" for s in self.steps.seconds.values())
        )

    def takeover_argv(self) -> list[str]:
        """`python -m takeover run` as the demo runs it, Telegram aside (bench/bench_takeover.py runs it too)."""
        return [
            PYTHON,
            "-m",
            "takeover",
            "run",
            *self.where_the_vm_is(),
            "--host-dir",
            str(self.host_dir),
            "--ssh-listen",
            f"127.0.0.1:{self.args.host_ssh_port}",
            "--agent-name",
            AGENT_NAME,
            "--agent-secrets",
            "demo-*",
            "--token-file",
            str(self.host_token_file),
            "--qemu-user",
            self.args.qemu_user,
        ]

    def vm_image(self, command: str, state: Path | str, *more: str, capture: bool = True) -> None:
        """`python -m vm_image COMMAND` as the agent (in its machine when there is one), or the demo stops."""
        argv = [PYTHON, "-m", "vm_image", command, "--state-dir", str(state)]
        if command in ("up", "launch"):
            argv += ["--port", str(self.args.port), "--ssh-port", str(self.args.agent_ssh_port)]
        done = self.as_agent(["env", "-C", str(ROOT), *argv, *more], capture=capture)
        if done.returncode != 0:
            raise SystemExit(f"demo: vm_image {command} failed: {(done.stderr or '(its error is above)')[-2000:]}")

    def start_in_machine(self) -> None:
        """The agent's machine, and its VM nested there (built here: the machine has no way to Debian's mirror)."""
        with self.steps.step(f"agent ({self.user}): in a machine of its own, build the image and start the VM") as note:
            self.ensure_agent_user()
            index = self.args.agent_machine_index
            if run_record(self.args).get("agent_machine") == index:
                remove_agent_machine(index)  # this demo's own, left by its last run
            elif Path(f"/run/netns/spvm-am{index}").exists():
                raise SystemExit(
                    f"demo: agent machine {index} exists and this demo did not make it (another run's?); "
                    "pass another --agent-machine-index, or remove it with its owner's clean"
                )
            record_made(self.args, agent_machine=index)  # before it exists: a half-made one is ours to remove
            self.rig = start_agent_machine(index, machine_dir(index))
            self.where = self.rig.enter
            self.url = f"http://{self.rig.host_address}:{self.args.port}"
            note(
                f"the agent's machine: {self.rig.address} on the bridge {self.rig.bridge} (this host: "
                f"{self.rig.host_address}); root gets in over SSH with a dedicated key, its host key pinned"
            )
            where, self.where = self.where, []
            note(
                f"$ python -m vm_image build --state-dir {self.agent_state}   (as {self.user}, on this host's network)"
            )
            self.vm_image("build", self.agent_state, capture=False)
            self.where = where
            state = self.machine_state
            made = self.rig.inside(["install", "-d", "-o", self.user, "-m", "0700", state])
            copied = self.as_agent(["cp", "-a", "--sparse=always", str(self.agent_state / "image"), f"{state}/image"])
            if made.returncode != 0 or copied.returncode != 0:
                raise SystemExit(f"demo: carrying the image into the agent's machine failed: {copied.stderr}")
            note(f"$ python -m vm_image launch --state-dir {state} --port {self.args.port}   (in its machine)")
            self.vm_image("launch", state, "--accel", "tcg", capture=False)

    @property
    def machine_state(self) -> str:
        assert self.rig is not None
        return f"{self.rig.private}/agent-state"

    def where_the_vm_is(self) -> list[str]:
        """`takeover run`'s options naming the agent's VM: its ready file here, or in its machine over SSH."""
        if self.rig is None:
            return ["--ready-file", str(self.agent_state / "run/ready")]
        return [
            "--agent-machine",
            f"root@{self.rig.address}",
            "--agent-machine-key",
            str(self.rig.work / "root_key"),
            "--agent-machine-known-hosts",
            str(self.rig.work / "known_hosts"),
            "--ready-file",
            f"{self.machine_state}/run/ready",
            "--serve-on",
            f"{self.rig.host_address}:{self.args.port}",
        ]

    def ensure_agent_user(self) -> None:
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", self.user], check=True)
            record_made(self.args, agent_user=self.user)  # `--clean` removes it; never a user it found

    def telegram_config(self) -> Path | None:
        if not os.environ.get("SECRET_PROXY_TELEGRAM_TOKEN"):
            return None
        lines = [
            f"telegram_token = {json.dumps(os.environ['SECRET_PROXY_TELEGRAM_TOKEN'])}",
            f"telegram_chat_id = {int(os.environ.get('SECRET_PROXY_TELEGRAM_CHAT_ID', '0'))}",
            "telegram_approvers = ["
            + ", ".join(
                str(int(x)) for x in os.environ.get("SECRET_PROXY_TELEGRAM_APPROVERS", "").split(",") if x.strip()
            )
            + "]",
        ]
        if os.environ.get("SECRET_PROXY_TELEGRAM_API_URL"):
            lines.append(f"telegram_api_url = {json.dumps(os.environ['SECRET_PROXY_TELEGRAM_API_URL'])}")
        path = telegram_config_path(self.args)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # holds the bot token: 0600 from the start
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def hand_token_to_agent(self, token_file: Path) -> str:
        token = token_file.read_text().strip()
        entry = pwd.getpwnam(self.user)
        dest = self.agent_token_file
        dest.unlink(missing_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchown(fd, entry.pw_uid, entry.pw_gid)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        self.token = token
        return token

    def approve(self, request_id: str, note, telegram: bool) -> None:
        if telegram:
            note("the request is in your Telegram chat: tap Approve (the agent's command waits for it)")
            return
        command = ["/usr/local/bin/secret-proxy", "approve", request_id]
        note("no Telegram configured: the CLI approval channel, over the host's SSH key:")
        note(
            f"$ ssh -i {self.host_dir}/host_key -p {self.args.host_ssh_port} proxy@127.0.0.1 "
            f"secret-proxy approve {request_id}"
        )
        done = self.host_ssh(*command)
        if done.returncode != 0:
            raise SystemExit(f"demo: approving failed: {done.stderr.strip()}")

    # -- the agent's command -----------------------------------------------------------------
    def agent_tool(self, *args: str) -> subprocess.Popen:
        """`secret-proxy-agent ARGS` as the agent: Debian's python3, nothing installed, only its token file."""
        env = agent_env(self.user)
        if self.rig is None:  # in its machine, the tools read what the takeover wrote in /etc/secret-proxy
            env.update({"SECRET_PROXY_URL": self.url, "SECRET_PROXY_TOKEN_FILE": str(self.agent_token_file)})
        return subprocess.Popen(
            [
                *self.where,
                "runuser",
                "-u",
                self.user,
                "--",
                "env",
                "-i",
                *(f"{k}={v}" for k, v in env.items()),
                "/usr/bin/python3",
                "-I",
                AGENT_TOOL,
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=env["HOME"],
        )

    def request_id_from(self, tool: subprocess.Popen, note) -> str:
        """The request id the agent's command prints on stderr when it has asked."""
        assert tool.stderr is not None
        line = tool.stderr.readline()
        note(line.rstrip())
        match = re.search(r"request (req_[A-Za-z0-9_-]+)", line)
        if not match:
            rest = tool.communicate(timeout=60)[1]
            raise SystemExit(f"demo: the agent's command did not ask (exit {tool.returncode}): {line}{rest}")
        return match.group(1)

    def brokered_call(self, note, telegram: bool) -> None:
        url = f"{self.api.url}/v1/whoami"
        note(f"$ python3 -I {AGENT_TOOL} call {BROKERED_NAME} --reason 'demo: who am I at the API' -X GET {url}")
        calling = self.agent_tool("call", BROKERED_NAME, "--reason", "demo: who am I at the API", "-X", "GET", url)
        request_id = self.request_id_from(calling, note)
        self.approve(request_id, note, telegram)
        body, errors = calling.communicate(timeout=self.args.approve_timeout + 120)
        for line in errors.splitlines():
            note(line)
        if calling.returncode != 0:
            raise SystemExit(f"demo: secret-proxy-agent call exited {calling.returncode}")
        note(f"stdout (the API's answer, as the agent got it): {body.strip()}")
        if self.api_token in body or self.api_token in errors:
            raise SystemExit("demo: the broker-only key reached the agent")
        if not self.api.calls or not self.api.calls[-1]["authorized"]:
            raise SystemExit("demo: the API did not receive the key")
        note(f"the API saw {len(self.api.calls)} call, with the right key; the agent never held it")
        tried = self.agent_http(
            "POST", "/v1/requests", self.token, {"secret": BROKERED_NAME, "reason": "demo: may I just have it?"}
        )
        note(f"asking to retrieve {BROKERED_NAME} instead → {tried['status']} {tried['body'].get('error')}")
        if tried["status"] < 400:
            raise SystemExit("demo: a broker-only secret could be asked for retrieval")

    def withdraw_api(self, note) -> bool:
        """The stand-in API ends with the demo: its secret and its egress listing go first, so nothing
        stays listed or brokered that nothing serves (the VM keeps running after the demo)."""
        api = getattr(self, "api", None)
        if api is None:
            return True
        deleted = self.host_ssh("/usr/local/bin/secret-proxy", "secrets", "delete", BROKERED_NAME)
        removed = subprocess.run(
            [PYTHON, "-m", "takeover", "egress", "remove", "--host-dir", str(self.host_dir), api.url],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        api.stop()
        self.api = None
        note(
            f"the stand-in API stops with the demo: {BROKERED_NAME} "
            f"{'deleted' if deleted.returncode == 0 else 'NOT deleted: ' + deleted.stderr.strip()[-200:]}, "
            f"{api.url} {'removed from' if removed.returncode == 0 else 'NOT removed from'} the egress list"
        )
        if removed.returncode != 0:
            note(f"`takeover egress remove {api.url}` failed: {removed.stderr.strip()[-600:]}")
        return deleted.returncode == 0 and removed.returncode == 0

    def check_agent_is_locked_out(self, note) -> None:
        for what, code in AGENT_TRY.items():
            target = self.host_dir / ("disk.qcow2" if "disk" in what else "qmp.sock")
            tried = self.as_agent(["/usr/bin/python3", "-I", "-c", "import sys\n" + code, str(target)])
            last = (tried.stderr.strip().splitlines() or ["succeeded"])[-1]
            note(f"{what} ({target}): {last}")
            if tried.returncode == 0:
                raise SystemExit(f"demo: the agent could {what}")
        if self.rig is not None:
            self.check_machine_is_cleared(note)
            return
        setup_key = self.agent_state / "image/setup_key"
        login = self.as_agent(agent_login_argv(self.args.host_ssh_port, "true", key=setup_key), timeout=60)
        note(f"SSH with its setup key: {(login.stderr.strip().splitlines() or ['logged in'])[-1]}")
        if login.returncode == 0:
            raise SystemExit("demo: the agent's setup key still logs in")
        old = self.agent_state / "run/qmp.sock"
        note(f"its old monitor socket {old}: {'still there' if old.exists() else 'gone'}")

    def check_machine_is_cleared(self, note) -> None:
        """In the agent's machine: its VM's files are gone, and the host's VM's SSH is out of its reach."""
        assert self.rig is not None
        for name in ("run/qmp.sock", "run/ready", "image/disk.qcow2", "image/setup_key"):
            path = f"{self.machine_state}/{name}"
            there = self.rig.inside(["test", "-e", path]).returncode == 0
            note(f"in its machine, {path}: {'STILL THERE' if there else 'gone'}")
            if there:
                raise SystemExit(f"demo: {path} is still in the agent's machine")
        probe = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)"
        for host in (self.rig.host_address, "127.0.0.1"):
            tried = self.as_agent(["/usr/bin/python3", "-I", "-c", probe, host, str(self.args.host_ssh_port)])
            last = (tried.stderr.strip().splitlines() or ["connected"])[-1]
            note(f"the host VM's SSH at {host}:{self.args.host_ssh_port}, from its machine: {last}")
            if tried.returncode == 0:
                raise SystemExit("demo: the agent's machine reaches the host VM's SSH")


class StandInApi:
    """An HTTP API on the host's loopback that wants `Bearer KEY` and says whether it got it.

    Its body says who the key belongs to; a debug header echoes the Authorization header it received,
    as a leaky API would, so the demo shows the proxy removed the key from the answer before the agent
    saw it. (An answer whose body held the key would be withheld whole: docs/brokered-calls.md.)
    """

    def __init__(self, key: str) -> None:
        self.calls: list[dict[str, object]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                authorized = secrets.compare_digest(self.headers.get("Authorization", ""), f"Bearer {key}")
                api.calls.append({"path": self.path, "authorized": authorized})
                body = json.dumps({"user": "demo-agent@example" if authorized else None}).encode()
                self.send_response(200 if authorized else 401)
                self.send_header("X-Debug-Authorization-Received", self.headers.get("Authorization", ""))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass  # it would print the key's header

        # Below 1024: the host lists a loopback destination only where no local user can listen, or an
        # agent could bind the port once this API is gone and receive the key in the next approved call.
        self.server = ThreadingHTTPServer(("127.0.0.1", free_privileged_port("127.0.0.1", range(900, 1000))), Handler)
        self.port = self.server.server_address[1]
        # The host's loopback: the guest reaches it through the host's egress proxy, which resolves it there.
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def telegram_config_path(args: argparse.Namespace) -> Path:
    """Root's own file with the bot token, one per host directory so a test's demo leaves a running demo's alone."""
    return Path("/root") / f".{args.host_dir.name}-demo-telegram.toml"


def agent_state_dir(user: str) -> Path | None:
    """Where `vm_image` keeps the agent's image and running VM (its default state directory)."""
    try:
        return default_state_dir({"HOME": pwd.getpwnam(user).pw_dir})
    except KeyError:
        return None


def machine_dir(index: int) -> Path:
    """The agent machine's keys and sshd config: root's."""
    return Path("/root") / f".secret-proxy-vm-demo-machine-{index}"


def run_record_path(args: argparse.Namespace) -> Path:
    """Root's record of what this demo's runs made (the agent user, the agent machine), one per host directory."""
    digest = hashlib.sha256(str(args.host_dir.absolute()).encode()).hexdigest()[:12]
    return Path("/root") / f".secret-proxy-vm-demo-{digest}.json"


def run_record(args: argparse.Namespace) -> dict:
    try:
        return json.loads(run_record_path(args).read_text())
    except FileNotFoundError:
        return {}


def record_made(args: argparse.Namespace, **made: object) -> None:
    """Add to the record (root's, 0600, replaced whole); `None` forgets an entry."""
    data = {k: v for k, v in {**run_record(args), **made}.items() if v is not None}
    path = run_record_path(args)
    part = path.with_name(path.name + ".part")
    part.unlink(missing_ok=True)
    with os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(data, f)
    os.replace(part, path)


def reset(args: argparse.Namespace) -> None:
    """Stop both VMs and remove the host's VM (`takeover remove`) and the agent machine this demo made;
    keep the agent's build cache (a second run starts here). A failed removal stops the reset: the
    host's VM may still run."""
    if any((args.host_dir / name).exists() for name in ("journal.json", "egress.json")):
        # Its egress table, forward proxy and the users its run created go with it (docs/operations.md).
        argv = [PYTHON, "-m", "takeover", "remove", "--stop", "--host-dir", str(args.host_dir)]
        removed = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if removed.returncode != 0:
            raise SystemExit(
                f"demo: `python -m takeover remove --stop --host-dir {args.host_dir}` failed (its error is above): "
                "the host's VM may still run, so the demo removes nothing else; fix the cause and run "
                "`make clean` again"
            )
        shown = json.loads(removed.stdout)
        users = ", ".join(shown["users_removed"]) or "none"
        print(f"demo: removed the host's VM in {args.host_dir}; the users its run created: {users}")
        for user, why in shown["users_kept"].items():
            print(f"demo: kept the user {user}: {why}")
    index = run_record(args).get("agent_machine")
    if index is not None:
        # The agent's machine goes with its nested VM, and so does the filter of what was served to it.
        remove_agent_machine(index)
        shutil.rmtree(machine_dir(index), ignore_errors=True)
        serve_back.remove(Endpoint(f"10.213.{index}.1", args.port))
        record_made(args, agent_machine=None)
    elif args.agent_machine and Path(f"/run/netns/spvm-am{args.agent_machine_index}").exists():
        print(f"demo: agent machine {args.agent_machine_index} is not this demo's (no record of it): left alone")
    state = args.agent_state or agent_state_dir(args.agent_user)
    if state is not None and state.exists():
        subprocess.run(
            [
                "runuser",
                "-u",
                args.agent_user,
                "--",
                PYTHON,
                "-m",
                "vm_image",
                "stop",
                "--state-dir",
                str(state),
                "--timeout",
                "20",
            ],
            cwd="/",
            capture_output=True,
        )


def clean(args: argparse.Namespace) -> None:
    """Stop and remove what the demo made (its records say what): the host's VM, directory and users,
    the agent's VM, machine and user."""
    reset(args)
    # QEMU's and the forward proxy's users went with the host's VM (`takeover remove`: those its run created).
    agent_exists = agent_state_dir(args.agent_user) is not None
    if agent_exists and run_record(args).get("agent_user") == args.agent_user:
        subprocess.run(["pkill", "-u", args.agent_user], check=False)
        subprocess.run(["userdel", "--remove", args.agent_user], check=False, capture_output=True)
        print(f"removed the user {args.agent_user} and its home")
    elif agent_exists:
        print(f"kept the user {args.agent_user}: this demo did not create it")
    telegram_config_path(args).unlink(missing_ok=True)
    run_record_path(args).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (it creates an agent user and takes over a VM as the host)", file=sys.stderr)
        return 1
    if args.clean:
        clean(args)
        return 0
    if (args.host_dir / "journal.json").exists():
        print(f"demo: a previous demo's VM is in {args.host_dir}; stopping and removing it first")
        reset(args)
    demo = Demo(args)
    try:
        demo.run()
    finally:  # a demo that stopped half-way leaves its stand-in API neither listed nor brokered either
        demo.withdraw_api(lambda line: print(f"demo: {line}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
