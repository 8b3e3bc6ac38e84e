"""The whole story, every role played for real, under TCG (issue 6; docs/threat-model.md).

`scripts/demo.py` (what `make demo` runs) plays the agent user building and
launching its VM, root taking it over, the host storing a secret and handing the
agent a token, the agent asking and waiting, and the agent's retrieval and
lockout checks. The proxy in the VM talks to a Bot API emulator on the host,
through the host's egress proxy (the VM's only way out); here an approver taps Approve after a stranger's tap
is refused. Then the attacks of the threat model that can be played on one
machine are played and fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from scripts import demo
from takeover.host import egress
from vm_image import proc

from . import vm_fixtures
from .telegram_emulator import BotApiEmulator
from .vm_fixtures import AGENT_USER, free_port

pytestmark = [pytest.mark.slow, pytest.mark.root]

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "4242:story-bot-token-that-the-agent-must-never-see"
CHAT, APPROVER, STRANGER = -100777, 4001, 4666


def agent_http(method: str, url: str, token: str = "", body: dict | None = None, times: int = 1) -> list:
    return demo.agent_http(AGENT_USER, method, url, token, body, times)


def test_the_whole_story_with_a_telegram_approver(tmp_path):
    emu = BotApiEmulator(TOKEN)
    emu.add_chat(CHAT, "supergroup", "Approvers")
    emu.add_user(APPROVER, "Ada", "ada")
    emu.add_user(STRANGER, "Mallory", "mallory")
    # Below 1024: the host's egress list takes a host address only where no local user can listen.
    emu.start("127.0.0.1", egress.free_privileged_port("127.0.0.1", range(900, 1000)))
    host_dir = Path("/var/lib") / f"secret-proxy-vm-story-{os.getpid()}"
    port = free_port()
    env = {
        **os.environ,
        "SECRET_PROXY_TELEGRAM_TOKEN": TOKEN,
        "SECRET_PROXY_TELEGRAM_CHAT_ID": str(CHAT),
        "SECRET_PROXY_TELEGRAM_APPROVERS": str(APPROVER),
        # The guest reaches it through the host's egress proxy, which resolves 127.0.0.1 on the host.
        "SECRET_PROXY_TELEGRAM_API_URL": f"http://127.0.0.1:{emu.port}",
    }
    # Its own state directory, ports and host directory: a demo left running by `make demo` is left alone.
    agent_state = vm_fixtures.TEST_ROOT / f"story-state-{os.getpid()}"
    agent = vm_fixtures.ensure_agent_user()
    agent_state.mkdir(mode=0o700, exist_ok=True)
    os.chown(agent_state, agent.uid, agent.gid)
    demo = subprocess.Popen(
        [
            sys.executable,
            "scripts/demo.py",
            "--host-dir",
            str(host_dir),
            "--port",
            str(port),
            "--agent-state",
            str(agent_state),
            "--agent-ssh-port",
            str(free_port()),
            "--host-ssh-port",
            str(free_port()),
            "--qemu-user",
            "spvm-story-qemu",  # the egress rules match QEMU's user: a running `make demo` VM keeps its own
            "--approve-timeout",
            "300",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    taps: dict = {}

    def approver() -> None:
        # The request appears in the chat with two buttons; a stranger taps first, then the approver.
        message = emu.wait_for(
            lambda: next((m for m in emu.messages(CHAT) if m.get("reply_markup")), None),
            timeout=1200,
            what="the request's message in the approvers' chat",
        )
        approve = message["reply_markup"]["inline_keyboard"][0][0]
        taps["message"] = message
        taps["stranger"] = emu.tap(STRANGER, CHAT, message["message_id"], approve["callback_data"])
        emu.wait_for(lambda: emu.answer_for(taps["stranger"]), 60, "the answer to the stranger's tap")
        taps["approver"] = emu.tap(APPROVER, CHAT, message["message_id"], approve["callback_data"])
        # Then the brokered call: a message of its own, showing the call; the approver approves it too.
        call = emu.wait_for(
            lambda: next(
                (m for m in emu.messages(CHAT) if m.get("reply_markup") and m["message_id"] != message["message_id"]),
                None,
            ),
            timeout=600,
            what="the brokered call's message",
        )
        taps["call_message"] = call
        taps["call"] = emu.tap(
            APPROVER, CHAT, call["message_id"], call["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
        )

    tapper = threading.Thread(target=approver, daemon=True)
    tapper.start()
    started = time.monotonic()
    try:
        output, _ = demo.communicate(timeout=1500)
        sys.stderr.write(output)
        print(f"\nthe story took {time.monotonic() - started:.0f} s", file=sys.stderr)
        assert demo.returncode == 0, output[-3000:]

        # The takeover cut over while the agent watched: its proxy was switched, not rebooted (a cold boot
        # alone is 15 to 20 s under TCG, the takeover in order over a minute).
        gap = re.search(r"the agent's proxy went unanswered for ([0-9.]+) s", output)
        assert gap is not None and float(gap.group(1)) < 10.0, gap

        # The approval came from Telegram: a stranger was refused, the approver decided.
        assert "approved by approver" in output  # the agent learns a role, not the approver's id
        assert "not" in emu.answer_for(taps["stranger"])["text"].lower()
        closed = emu.message(CHAT, taps["message"]["message_id"])
        assert not (closed.get("reply_markup") or {}).get("inline_keyboard") and "Approved" in closed["text"]
        assert str(APPROVER) in closed["text"]  # the approvers see who decided
        # The agent got the host's value once; its every other way in was closed (checked by the demo).
        assert "the value the host stored" in output and "again → 410 already_retrieved" in output
        # The brokered call: the approver saw the call; the agent got the API's answer, never the key.
        assert "GET" in taps["call_message"]["text"] and "/v1/whoami" in taps["call_message"]["text"]
        assert "the API saw 1 call, with the right key; the agent never held it" in output
        assert '"user": "demo-agent@example"' in output  # the API's answer reached the agent
        assert "X-Debug-Authorization-Received: [REDACTED]" in output and "broker_only" in output
        for line in ("read the host's disk", "connect to the host's monitor"):
            assert any(line in ln and "PermissionError" in ln for ln in output.splitlines()), line
        assert "SSH with its setup key: " in output and "Permission denied" in output

        # The Telegram token never reached anything the agent can see, nor the host's egress log
        # (the bot's plain-HTTP requests to the emulator carry it in their URLs).
        assert TOKEN not in output
        assert TOKEN.split(":")[1] not in (host_dir / "egress.log").read_text()
        # The brokered call above went through the host's egress proxy, which lists the stand-in API and Telegram.
        assert "$ python -m takeover egress allow http://127.0.0.1:" in output
        token = (agent_state / "demo-agent.token").read_text().strip()
        url = f"http://127.0.0.1:{port}"
        for path in ("/health", "/openapi.json"):
            assert TOKEN.split(":")[1] not in agent_http("GET", url + path)[0][1]

        # Flood: the agent is throttled, health and the approved flow keep answering.
        flood = agent_http("POST", url + "/v1/requests", token, {"secret": "demo-api-key", "reason": "flood"}, 150)
        codes = [c for c, _ in flood]
        assert 429 in codes and set(codes) <= {201, 429}
        assert agent_http("GET", url + "/health")[0][0] == 200

        # Self-approval: the agent cannot reach the proxy's CLI (SSH is the host's) and its token decides nothing.
        pending = json.loads(next(body for c, body in flood if c == 201))["id"]
        for forged in (f"/v1/requests/{pending}/approve", f"/v1/requests/{pending}"):
            assert agent_http("POST", url + forged, token, {"approve": True})[0][0] in (404, 405)
        assert json.loads(agent_http("GET", f"{url}/v1/requests/{pending}", token)[0][1])["status"] == "pending"

        # The VM runs the host's kernel from the host's directory, as an unprivileged user, not the agent.
        pid = int((host_dir / "qemu.pid").read_text())
        info = proc.read_process(pid)
        kernel = info.cmdline[info.cmdline.index("-kernel") + 1]
        assert kernel.startswith(str(host_dir)) and "/home/agent" not in " ".join(info.cmdline)
        assert info.uid not in (0, os.stat("/home/agent").st_uid)
    finally:
        if demo.poll() is None:
            demo.kill()
        vm_fixtures.stop_both_vms(host_dir, agent_state)
        subprocess.run(["rm", "-rf", str(host_dir), str(agent_state)], check=False)
        emu.stop()


def test_the_story_with_the_agent_in_a_machine_of_its_own():
    """`make demo-machine`: the agent's VM nested in its machine, taken over through SSH, served back on the
    bridge; the agent asks with its tool (which reads the address and token the takeover wrote in its machine),
    the operator approves with the CLI, the agent gets the value once; its VM's files in its machine are gone."""
    from scripts.agent_machine import _free_index, remove_agent_machine
    from takeover.host import serve_back
    from takeover.models import Endpoint

    host_dir = Path("/var/lib") / f"secret-proxy-vm-story-machine-{os.getpid()}"
    agent_state = vm_fixtures.TEST_ROOT / f"story-machine-state-{os.getpid()}"
    agent = vm_fixtures.ensure_agent_user()
    agent_state.mkdir(mode=0o700, exist_ok=True)
    os.chown(agent_state, agent.uid, agent.gid)
    index, port = _free_index(), free_port()
    argv = [
        sys.executable,
        "scripts/demo.py",
        "--agent-machine",
        "--agent-machine-index",
        str(index),
        "--host-dir",
        str(host_dir),
        "--port",
        str(port),
        "--agent-state",
        str(agent_state),
        "--host-ssh-port",
        str(free_port()),
        "--qemu-user",
        "spvm-story-qemu",
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        output = done.stdout + done.stderr
        sys.stderr.write(output)
        print(f"\nthe story in a machine took {time.monotonic() - started:.0f} s", file=sys.stderr)
        assert done.returncode == 0, output[-3000:]
        url = f"http://10.213.{index}.1:{port}"
        assert f"/etc/secret-proxy/url says {url}" in output
        assert f"reaching the proxy at {url}" in output
        assert "the value the host stored" in output and "again → 410 already_retrieved" in output
        assert "the API saw 1 call, with the right key; the agent never held it" in output
        for name in ("run/qmp.sock", "run/ready", "image/disk.qcow2", "image/setup_key"):
            assert f"/agent-state/{name}: gone" in output, name
        assert output.count("from its machine: ConnectionRefusedError") == 2
        for line in ("read the host's disk", "connect to the host's monitor"):
            assert any(line in ln and "PermissionError" in ln for ln in output.splitlines()), line
    finally:
        vm_fixtures.stop_both_vms(host_dir, agent_state)
        remove_agent_machine(index)  # its nested VM with it
        serve_back.remove(Endpoint(f"10.213.{index}.1", port))
        shutil.rmtree(demo.machine_dir(index), ignore_errors=True)
        subprocess.run(["rm", "-rf", str(host_dir), str(agent_state)], check=False)
