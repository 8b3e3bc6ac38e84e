"""A real proxy process (`python -m proxy serve`) whose python-telegram-bot talks to the Bot API emulator
on 127.0.0.1, with its people: approvers, a stranger, another chat. Used by the Telegram tests and the
brokered-call tests that approve in Telegram."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from proxy.client import AgentClient
from proxy.demo import free_port

from .proxy_helpers import ROOT, SECRET_VALUE, Proxy, make_settings, provision, stop_process, wait_until_serving
from .telegram_emulator import BotApiEmulator

TOKEN = "987654321:AAE-tEsT-bOt-ToKeN-never-logged-0123456789"
CHAT = -1001234567890
OTHER_CHAT = -1009876543210
ALICE, BOB = 1001, 1002  # approvers
CAROL = 1003  # an approver only where a test configures her (SECRET_PROXY_TELEGRAM_APPROVERS)
MALLORY = 6666  # in the chat, not an approver

# The proxy's own logging, but at DEBUG: the libraries log URLs (with the token) at DEBUG and INFO.
DEBUG_SERVE = (
    "import logging, sys; logging.basicConfig(level=logging.DEBUG, "
    "format='%(asctime)s %(levelname)s %(name)s: %(message)s'); "
    "from proxy.cli import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass
class Rig:
    """One proxy process, its emulated Telegram, and the people around them."""

    emu: BotApiEmulator
    data: Proxy
    url: str
    process: subprocess.Popen
    log_path: Path
    tokens_to_hide: tuple[str, ...] = field(default=(TOKEN,))
    env: dict[str, str] = field(default_factory=dict)  # the proxy process's, for a restart

    def agent(self, token: str | None = None) -> AgentClient:
        return AgentClient(self.url, token or self.data.token, timeout=30)

    def ask(self, reason: str = "deploy the release", secret: str = "api-key") -> str:
        created = self.agent().ask(secret, reason)
        assert created.status == 201, created.body
        return created.body["id"]

    def message_for(self, request_id: str, timeout: float = 10.0) -> dict:
        return self.emu.wait_for(
            lambda: next((m for m in self.emu.messages(CHAT) if request_id in m["text"]), None),
            timeout,
            f"the bot's message for {request_id}",
        )

    def status(self, request_id: str, wait: float = 0) -> str:
        return self.agent().status(request_id, wait=wait).body["status"]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process, 15)
        self.emu.stop()
        logs = self.logs()
        for token in self.tokens_to_hide:
            assert token not in logs and token.split(":", 1)[1] not in logs, f"the bot token is in {self.log_path}"
        assert SECRET_VALUE not in logs


def start_rig(
    tmp: Path, env: dict[str, str] | None = None, *, proxy_token: str = TOKEN, down: str | None = None
) -> Rig:
    emu = BotApiEmulator(TOKEN)
    emu.add_chat(CHAT, "supergroup", "Approvers")
    emu.add_chat(OTHER_CHAT, "supergroup", "Somewhere else")
    emu.add_user(ALICE, "Alice", "alice_ops")
    emu.add_user(BOB, "Bob", "bob_sec")
    emu.add_user(MALLORY, "Mallory", "mallory")
    emu.add_user(CAROL, "Carol", "carol_ops")
    emu.start("127.0.0.1", 0)
    if down:
        emu.go_down(down)
    data = provision(make_settings(tmp))
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SECRET_PROXY_")}
    base.update(
        {
            "SECRET_PROXY_DATA_DIR": str(data.settings.data_dir),
            "SECRET_PROXY_TELEGRAM_TOKEN": proxy_token,
            "SECRET_PROXY_TELEGRAM_CHAT_ID": str(CHAT),
            "SECRET_PROXY_TELEGRAM_APPROVERS": f"{ALICE},{BOB}",
            "SECRET_PROXY_TELEGRAM_API_URL": emu.url,
            "SECRET_PROXY_TELEGRAM_RETRY_MAX_SECONDS": "0.5",
            # Many requests from one agent in a few seconds, across the tests sharing a proxy.
            "SECRET_PROXY_RATE_BURST": "1000",
            "SECRET_PROXY_MAX_PENDING_PER_AGENT": "1000",
            **(env or {}),
        }
    )
    log_path = tmp / "proxy.log"
    process = _serve(base, port, log_path)
    rig = Rig(emu, data, f"http://127.0.0.1:{port}", process, log_path, (TOKEN, proxy_token), base)
    try:
        wait_until_serving(rig.url, process, rig.logs)
    except RuntimeError:
        if process.poll() is None:
            rig.stop()
        else:
            emu.stop()
        raise
    return rig


def wait_until_polling(rig: Rig) -> None:
    rig.emu.wait_for(lambda: rig.emu.calls("getUpdates"), 15, "the bot to start long polling")


def _serve(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", DEBUG_SERVE, "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )


def restart_proxy(rig: Rig) -> None:
    """Stop the proxy process and start another on the same data directory, port and emulator."""
    stop_process(rig.process, 15)
    port = int(rig.url.rsplit(":", 1)[1])
    rig.process = _serve(rig.env, port, rig.log_path)
    wait_until_serving(rig.url, rig.process, rig.logs)
    calls = len(rig.emu.calls("getUpdates"))
    rig.emu.wait_for(lambda: len(rig.emu.calls("getUpdates")) > calls, 15, "the new proxy to poll")


def answer_to(rig: Rig, query_id: str) -> str:
    """What the approver who tapped was told."""
    return rig.emu.wait_for(lambda: rig.emu.answer_for(query_id), 10, f"the answer to tap {query_id}")["text"]


def message_showing(rig: Rig, message_id: int, text: str) -> dict:
    """The bot's message once it has been edited to show `text`."""
    return rig.emu.wait_for(
        lambda: (m := rig.emu.message(CHAT, message_id)) and text in m["text"] and m,
        10,
        f"the message to show {text!r}",
    )
