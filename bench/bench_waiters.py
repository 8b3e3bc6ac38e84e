"""Approval-to-agent latency with 1,000 agents' calls held in `?wait=`, and the server's memory.

One `python -m proxy serve` on 127.0.0.1 with Telegram pointed at the Bot API
emulator (tests/telegram_emulator.py, in this process). 50 agents ask for 20
requests each and hold all 1,000 in `GET /v1/requests/ID?wait=60`, one
connection each. Then 30 requests are approved by taps in the emulator (decided
inside the proxy's process) and 30 with the CLI (another process, as over SSH).
Latency is from the decision's `decided_at` (taken just before its commit) to the
moment the waiting agent has the answer; both clocks are this machine's.

    .venv/bin/python bench/bench_waiters.py [--agents 50] [--per-agent 20] [--decisions 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.config import load_settings  # noqa: E402
from proxy.store import Store, init_data_dir  # noqa: E402
from tests.proxy_helpers import start_server  # noqa: E402
from tests.telegram_emulator import BotApiEmulator  # noqa: E402

TOKEN = "123456789:AAbench-token-for-the-emulator-only-000"
CHAT, APPROVER = -1001000000001, 4242


async def http(
    port: int,
    method: str,
    path: str,
    token: str,
    body: dict | None = None,
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
) -> tuple[int, dict]:
    """One HTTP/1.1 call on its own connection (or `conn`): enough client for this benchmark."""
    reader, writer = conn or await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {len(data)}\r\nContent-Type: application/json\r\n\r\n"
    )
    writer.write(head.encode() + data)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    payload = json.loads(await reader.readexactly(length)) if length else {}
    if conn is None:
        writer.close()
    return int(status_line.split()[1]), payload


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


async def hold(port: int, token: str, rid: str, answered: dict[str, float]) -> None:
    conn = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            status, body = await http(port, "GET", f"/v1/requests/{rid}?wait=60", token, conn=conn)
            if status != 200:
                raise SystemExit(f"waiter for {rid} got {status} {body}")
            if body["status"] != "pending":
                answered[rid] = time.time()
                return
    finally:
        conn[1].close()


async def run(
    opts: argparse.Namespace,
    data_dir: Path,
    port: int,
    server: subprocess.Popen,
    emu: BotApiEmulator,
    tokens: list[str],
) -> None:
    ids: list[tuple[str, str]] = []
    for token in tokens:
        for n in range(opts.per_agent):
            status, body = await http(
                port, "POST", "/v1/requests", token, {"secret": "bench-key", "reason": f"bench {n}", "ttl_seconds": 600}
            )
            if status != 201:
                raise SystemExit(f"asking failed: {status} {body}")
            ids.append((token, body["id"]))
    answered: dict[str, float] = {}
    waiters = [asyncio.create_task(hold(port, token, rid, answered)) for token, rid in ids]
    await asyncio.sleep(3)  # every call is now held in ?wait=
    held_rss = rss_mb(server.pid)
    failed = [t for t in waiters if t.done()]
    if failed:
        raise SystemExit(f"{len(failed)} waiters ended early: {failed[0].exception()!r}")
    # The bot posts one message per pending request; decide only once they are all shown.
    deadline = time.monotonic() + 120
    while len(emu.messages(CHAT)) < len(ids):
        if time.monotonic() > deadline:
            raise SystemExit(f"the bot posted only {len(emu.messages(CHAT))} of {len(ids)} messages")
        await asyncio.sleep(0.2)
    by_text = {m["text"].rsplit("Request: ", 1)[-1].strip(): m["message_id"] for m in emu.messages(CHAT)}

    step = max(1, len(ids) // (2 * opts.decisions))
    chosen = [rid for _, rid in ids[::step]][: 2 * opts.decisions]
    telegram, cli = chosen[: opts.decisions], chosen[opts.decisions :]
    for rid in telegram:
        emu.tap(APPROVER, CHAT, by_text[rid], f"a:{rid}")
        await asyncio.sleep(0.1)
    cli_exit: dict[str, float] = {}
    for rid in cli:
        done = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "--data-dir",
            str(data_dir),
            "approve",
            rid,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await done.communicate()
        cli_exit[rid] = time.time()
        if done.returncode != 0:
            raise SystemExit(f"the CLI failed: {err.decode()}")
    deadline = time.monotonic() + 30
    while not all(rid in answered for rid in chosen) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    after_rss = rss_mb(server.pid)
    missing = [rid for rid in chosen if rid not in answered]
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)

    db = sqlite3.connect(data_dir / "proxy.db")
    decided = dict(
        db.execute(
            f"SELECT id, decided_at FROM requests WHERE id IN ({','.join('?' * len(chosen))})", chosen
        ).fetchall()
    )
    db.close()
    print(
        f"{len(ids)} calls held in ?wait=60 ({len(tokens)} agents x {opts.per_agent}); "
        f"server RSS {held_rss:.0f} MB held, {after_rss:.0f} MB after the decisions"
    )
    if missing:
        print(f"NOT ANSWERED within 30 s: {len(missing)} of {len(chosen)}")
    for name, group in (("Telegram tap (in process)", telegram), ("CLI (another process)", cli)):
        ms = [(answered[r] - decided[r]) * 1000 for r in group if r in answered]
        print(
            f"{name:28s}: n={len(ms)}  p50 {statistics.median(ms):6.1f} ms  p99 {percentile(ms, 99):6.1f} ms"
            f"  max {max(ms):6.1f} ms"
        )
    # The decision is durable only after its commit's fsync, which a busy disk can stretch; the CLI
    # exits after that commit, so an agent answered before the CLI exited was not kept waiting by us.
    before_exit = sum(1 for r in cli if r in answered and answered[r] <= cli_exit[r])
    print(f"CLI decisions whose agent had the answer before the CLI process exited: {before_exit} of {len(cli)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--per-agent", type=int, default=20)
    parser.add_argument("--decisions", type=int, default=30, help="approvals through each channel")
    opts = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one connection per waiter

    emu = BotApiEmulator(TOKEN)
    emu.add_chat(CHAT, "supergroup", "Approvers")
    emu.add_user(APPROVER, "Approver", "approver")
    emu.start("127.0.0.1", 0)
    with tempfile.TemporaryDirectory(prefix="spx-bench-waiters-") as tmp:
        settings = load_settings(env={}, data_dir=Path(tmp) / "data")
        init_data_dir(settings)
        with Store(settings) as store:
            store.set_secret("bench-key", b"sk-bench-" + os.urandom(16).hex().encode(), "operator:bench")
            tokens = [store.add_agent(f"agent-{n:02d}", ["bench-*"], "operator:bench") for n in range(opts.agents)]
        env = {
            "SECRET_PROXY_TELEGRAM_TOKEN": TOKEN,
            "SECRET_PROXY_TELEGRAM_CHAT_ID": str(CHAT),
            "SECRET_PROXY_TELEGRAM_APPROVERS": str(APPROVER),
            "SECRET_PROXY_TELEGRAM_API_URL": emu.url,
            "SECRET_PROXY_RATE_BURST": str(opts.per_agent),
            "SECRET_PROXY_MAX_PENDING_PER_AGENT": str(opts.per_agent),
        }
        server = start_server(settings, env, quiet=True)
        try:
            asyncio.run(run(opts, settings.data_dir, server.port, server.process, emu, tokens))
        finally:
            server.stop()
            emu.stop()


if __name__ == "__main__":
    main()
