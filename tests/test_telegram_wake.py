"""SIGUSR1 (`secret-proxy telegram retry-now`) makes the bot retry Telegram now, not after its backoff.

The cut-over resumes a VM saved where Telegram was out of reach; the bot in it had backed off, and
would sit out the rest of that wait on the real network. Here Telegram is the Bot API emulator on
127.0.0.1, taken away (connections refused) and brought back; the bot is the real
python-telegram-bot, in this process (driven by a real signal to ourselves) and in a real
`python -m proxy serve` signalled by the CLI. The assertions compare with generous margins:
reconnected within a few seconds, where the backoff still had many to run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import telegram_bot, wake
from proxy.cli import EXIT_NO_SERVER, EXIT_NOT_OURS
from proxy.demo import free_port
from proxy.state import ProxyState
from proxy.store import Store
from takeover.host.ssh import SSHTarget
from takeover.host.vm_checks import CLI
from takeover.models import Endpoint
from takeover.steps.verify import retry_telegram_now

from .proxy_helpers import ROOT, cli, make_settings, provision, stop_process, wait_until_serving
from .telegram_emulator import BotApiEmulator
from .telegram_helpers import ALICE, CHAT, TOKEN

WOKEN = re.compile(r"asked to retry now \(SIGUSR1\); retrying instead of in ([0-9.]+) s")
LONG_BACKOFF = 30.0  # the in-process bot's first wait: what a VM resumed after the cut-over may have left


@pytest.fixture
def emu() -> Iterator[BotApiEmulator]:
    e = BotApiEmulator(TOKEN)
    e.add_chat(CHAT, "supergroup", "Approvers")
    e.add_user(ALICE, "Alice", "alice_ops")
    e.start("127.0.0.1", 0)
    yield e
    e.stop()


@pytest.fixture
def sigusr1_restored() -> Iterator[None]:
    before = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, before)


def polling(emu: BotApiEmulator) -> bool:
    return bool(emu.calls("getUpdates"))


def test_a_signal_ends_the_bots_backoff_and_it_reconnects_at_once(tmp_path, emu, monkeypatch, sigusr1_restored):
    monkeypatch.setattr(telegram_bot, "FIRST_RETRY_SECONDS", LONG_BACKOFF)
    settings = make_settings(
        tmp_path,
        telegram_token=TOKEN,
        telegram_chat_id=CHAT,
        telegram_approvers=(ALICE,),
        telegram_api_url=emu.url,
        telegram_retry_max_seconds=60.0,
    )
    provision(settings)
    emu.go_down("unreachable")

    async def scenario() -> tuple[float, float]:
        state = ProxyState.create(settings, Store(settings))
        bot = telegram_bot.TelegramChannel(state)
        await bot.start()
        undo = wake.handle_retry(asyncio.get_running_loop(), bot.retry_now)
        try:
            deadline = time.monotonic() + 10
            while (left := bot.backoff_left()) is None:  # the first attempt failed; the bot sleeps out its backoff
                assert time.monotonic() < deadline, "the bot never backed off"
                await asyncio.sleep(0.05)
            emu.come_back()
            await asyncio.sleep(0.5)
            assert not polling(emu)  # back, but the bot still waits
            woken = time.monotonic()
            os.kill(os.getpid(), signal.SIGUSR1)  # the real signal, through the loop's handler
            while not polling(emu):
                assert time.monotonic() - woken < 10, "the bot did not reconnect after the signal"
                await asyncio.sleep(0.05)
            return left, time.monotonic() - woken
        finally:
            undo()
            await bot.stop()
            state.close()

    left, took = asyncio.run(scenario())
    assert left > LONG_BACKOFF - 5
    assert took < 5, f"reconnected {took:.1f} s after the signal"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # once the bot is gone, the signal stays harmless


def test_a_wake_starts_the_backoff_again_from_its_first_delay(tmp_path, emu, monkeypatch, caplog):
    """Still unreachable after the wake: the next wait is the first delay again, not the cap."""
    monkeypatch.setattr(telegram_bot, "FIRST_RETRY_SECONDS", 0.2)
    caplog.set_level(logging.DEBUG, logger="proxy.telegram")
    settings = make_settings(
        tmp_path, telegram_token=TOKEN, telegram_chat_id=CHAT, telegram_api_url=emu.url, telegram_retry_max_seconds=60.0
    )
    provision(settings)
    emu.go_down("unreachable")

    def delays() -> list[float]:
        return [float(d) for d in re.findall(r"cannot start the bot: .*?; retrying in ([0-9.]+) s", caplog.text)]

    async def scenario() -> tuple[list[float], list[float]]:
        state = ProxyState.create(settings, Store(settings))
        bot = telegram_bot.TelegramChannel(state)
        await bot.start()
        try:
            while len(delays()) < 4:  # 0.2, 0.4, 0.8, 1.6: waiting out the fourth
                await asyncio.sleep(0.02)
            before = delays()
            bot.retry_now()
            while len(delays()) <= len(before):
                await asyncio.sleep(0.02)
            return before, delays()[len(before) :]
        finally:
            await bot.stop()
            state.close()

    before, after = asyncio.run(scenario())
    assert before == [0.2, 0.4, 0.8, 1.6]
    assert after[0] == 0.2


# -- `proxy serve` and the CLI -------------------------------------------------------------------


def serve(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`python -m proxy serve`, as the unit runs it (the CLI signals nothing else)."""
    port = free_port()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, lambda: log_path.read_text(errors="replace"))
    except RuntimeError:
        stop_process(process, 5)
        raise
    return process, url


def proxy_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECRET_PROXY_")}
    env.update(SECRET_PROXY_DATA_DIR=str(data_dir), **extra)
    return env


def test_retry_now_wakes_a_real_proxy_serve_that_backed_off(tmp_path, emu):
    data = provision(make_settings(tmp_path))
    emu.go_down("unreachable")
    log_path = tmp_path / "proxy.log"
    env = proxy_env(
        data.settings.data_dir,
        SECRET_PROXY_TELEGRAM_TOKEN=TOKEN,
        SECRET_PROXY_TELEGRAM_CHAT_ID=str(CHAT),
        SECRET_PROXY_TELEGRAM_APPROVERS=str(ALICE),
        SECRET_PROXY_TELEGRAM_API_URL=emu.url,
        SECRET_PROXY_TELEGRAM_RETRY_MAX_SECONDS="60",
    )
    process, _ = serve(env, log_path)
    try:
        emu.wait_for(lambda: "cannot start the bot" in log_path.read_text(), 15, "the first failed attempt")
        # Attempts 0.5, 1, 2 and 4 s apart: after 8 s the bot is sleeping out 8 s more (until about 15.5 s).
        time.sleep(8)
        emu.come_back()
        woken = time.monotonic()
        asked = cli(data.settings.data_dir, "telegram", "retry-now", "--pid", str(process.pid), env=env)
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.decode().strip() == (
            f"asked proxy serve (pid {process.pid}, from --pid) to retry Telegram now"
        )
        emu.wait_for(lambda: polling(emu), 10, "the bot to poll after the signal")
        took = time.monotonic() - woken
        line = emu.wait_for(
            lambda: re.search(
                r"asked to retry now \(SIGUSR1\); retrying instead of in ([0-9.]+) s", log_path.read_text()
            ),
            5,
            "the wake in the log",
        )
        left = float(line.group(1))
        assert left > 3, f"the signal came when only {left} s of backoff were left: nothing shown"
        assert took < min(5.0, left), f"reconnected {took:.1f} s after the signal; the backoff had {left:.1f} s left"
        assert process.poll() is None
    finally:
        stop_process(process, 15)
    assert TOKEN.split(":", 1)[1] not in log_path.read_text()


def test_sigusr1_does_not_kill_proxy_serve_without_telegram(tmp_path):
    data = provision(make_settings(tmp_path))
    env = proxy_env(data.settings.data_dir)
    process, url = serve(env, tmp_path / "proxy.log")
    try:
        for _ in range(3):
            os.kill(process.pid, signal.SIGUSR1)
        asked = cli(data.settings.data_dir, "telegram", "retry-now", "--pid", str(process.pid), env=env)
        assert asked.returncode == 0, asked.stderr
        assert b"Telegram is not configured" in asked.stdout and b"no bot to wake" in asked.stdout
        time.sleep(0.5)
        assert process.poll() is None
        wait_until_serving(url, process, lambda: (tmp_path / "proxy.log").read_text(), timeout=5)
    finally:
        stop_process(process, 15)


def test_retry_now_refuses_a_process_that_is_not_proxy_serve(tmp_path):
    data = provision(make_settings(tmp_path))
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        refused = cli(data.settings.data_dir, "telegram", "retry-now", "--pid", str(sleeper.pid))
        assert refused.returncode == EXIT_NOT_OURS
        assert f"process {sleeper.pid} is not `proxy serve` (sleep 60); not signalled" in refused.stderr.decode()
        time.sleep(0.2)
        assert sleeper.poll() is None  # SIGUSR1 would have ended it
    finally:
        sleeper.kill()
        sleeper.wait()


def test_retry_now_refuses_another_users_proxy_serve(tmp_path, agent_user):
    """A `proxy serve` command line is not enough: the process must run as the caller's uid."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a process as another user")
    data = provision(make_settings(tmp_path))
    theirs = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={agent_user.pw_uid}",
            f"--regid={agent_user.pw_gid}",
            "--clear-groups",
            "--",
            "/usr/bin/python3",  # the system's, which any user may run
            "-c",
            "import time; time.sleep(60)",
            "-m",
            "proxy",
            "serve",
        ]
    )
    try:
        deadline = time.monotonic() + 5
        # Until setpriv has exec'd python (mid-exec, the command line reads empty).
        while not wake.is_proxy_serve(Path(f"/proc/{theirs.pid}/cmdline").read_bytes().decode().split("\0")):
            assert time.monotonic() < deadline and theirs.poll() is None, "the other user's python did not start"
            time.sleep(0.02)
        refused = cli(data.settings.data_dir, "telegram", "retry-now", "--pid", str(theirs.pid))
        assert refused.returncode == EXIT_NOT_OURS
        assert f"runs as uid {agent_user.pw_uid}/" in refused.stderr.decode()
        assert theirs.poll() is None
    finally:
        theirs.kill()
        theirs.wait()


def test_retry_now_without_a_server_says_so(tmp_path):
    data = provision(make_settings(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    missing = cli(data.settings.data_dir, "telegram", "retry-now", "--pid", str(gone.pid))
    assert missing.returncode == EXIT_NO_SERVER
    assert b"error: no server to signal: no process" in missing.stderr


@pytest.mark.parametrize(
    ("argv", "serving"),
    [
        (["/opt/secret-proxy/venv/bin/python", "-I", "-m", "proxy", "serve", "--host", "0.0.0.0"], True),
        (["python", "-m", "proxy", "--data-dir", "/var/lib/secret-proxy", "serve"], True),
        (["python", "-m", "proxy", "--data-dir=/d", "serve", "--port", "1"], True),
        (["python", "-m", "proxy", "telegram", "retry-now"], False),
        (["python", "-m", "proxy", "--data-dir", "serve"], False),
        (["python", "-c", "...", "serve"], False),
        (["python", "-m", "proxy.agent", "serve"], False),
        ([], False),
    ],
)
def test_which_command_lines_are_proxy_serve(argv, serving):
    assert wake.is_proxy_serve(argv) is serving


# -- the takeover's verify, after the cut-over's resume ---------------------------------------------


class LocalLogin(SSHTarget):
    """The host's SSH login with the guest played by this machine: the guest's wrapper (`secret-proxy`) is
    `python -m proxy` on the test's data directory, and its systemd's MainPID is `--pid` (no systemd here)."""

    data_dir: Path = Path("/nonexistent")
    server_pid: int | None = None

    def run(self, *remote: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        assert remote[0] == CLI
        pid = ["--pid", str(self.server_pid)] if self.server_pid is not None else []
        argv = [sys.executable, "-m", "proxy", "--data-dir", str(self.data_dir), *remote[1:], *pid]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def local_login(data_dir: Path, server_pid: int | None) -> LocalLogin:
    login = LocalLogin(Endpoint("127.0.0.1", 9), Path("/nonexistent"), Path("/nonexistent"))
    object.__setattr__(login, "data_dir", data_dir)
    object.__setattr__(login, "server_pid", server_pid)
    return login


def test_verify_asks_the_resumed_proxy_to_retry_telegram_and_records_what_it_said(tmp_path):
    data = provision(make_settings(tmp_path))
    env = proxy_env(data.settings.data_dir)
    process, _ = serve(env, tmp_path / "proxy.log")
    try:
        said = retry_telegram_now(local_login(data.settings.data_dir, process.pid))
        assert said.startswith(f"signalled proxy serve (pid {process.pid}, from --pid)")
        assert process.poll() is None
    finally:
        stop_process(process, 15)


def test_verify_notes_a_failed_retry_instead_of_failing(tmp_path):
    data = provision(make_settings(tmp_path))
    said = retry_telegram_now(local_login(data.settings.data_dir, None))  # no systemd, no server here
    assert said.startswith("not asked to retry now (exit 3): error: no server to signal: ")
    assert "\n" not in said
