"""Approval-to-agent latency with 1,000 agents' calls held in `?wait=`, and the server's memory.

One proxy with Telegram pointed at the Bot API emulator (tests/telegram_emulator.py,
in this process). 50 agents ask for 20 requests each and hold all 1,000 in
`GET /v1/requests/ID?wait=60`, one connection each, all opened in one burst, as
agents reconnecting after a restart of the VM would (`--paced`: 4 at a time, each
checked with a status call before the next; see docs/benchmarks.md). Then 30 requests are approved
by taps in the emulator (decided inside the proxy's process) and 30 with the CLI
(`secret-proxy approve`, another process). It prints p50/p99 approval-to-agent
latency, the proxy's RSS, and how many of the 1,000 waits were answered (each
wait must end with an answer: the decision, or `pending` when its 60 s are up).

Two places for the proxy:

- on the host (default): `python -m proxy serve` on 127.0.0.1; the CLI runs here.
- `--through-vm` (root): the path agents really use. The unprivileged `agent`
  user builds and launches the VM (vm_image, TCG), root takes it over with the
  real `python -m takeover run`, whose proxy config points the bot at the
  emulator on the host's loopback (as the guest reaches it). The agents connect to
  the VM's forwarded port; the CLI decisions run in the VM over the host's SSH
  key; RSS is the guest proxy's (/proc/PID/status over SSH). The VM and its files
  are removed at the end. Run it under the slow lock:
  `flock /tmp/spvm-slow.lock .venv/bin/python bench/bench_waiters.py --through-vm`

Latency is from the decision's `decided_at` (taken by the proxy just before its
commit) to the moment the waiting agent has the answer. Through the VM that is the
guest's clock against the host's: the offset is measured over SSH (the probe with
the shortest round trip, before and after the decisions) and its uncertainty is
printed. A tap's latency is also given from the tap on the host's clock alone.

    .venv/bin/python bench/bench_waiters.py [--through-vm [--cpus N]] [--paced] [--agents 50] [--per-agent 20]
        [--decisions 30] [--wait 60]

Through the VM it also prints what bounds the proxy there: the guest's load, the
proxy's CPU time, its open-files limit and the guest kernel's TCP drop and reset
counters. Results and the machine: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.agent.approval import RECONNECT_PAUSE_SECONDS  # noqa: E402
from proxy.config import load_settings  # noqa: E402
from takeover.config import TakeoverConfig  # noqa: E402
from takeover.host import egress  # noqa: E402
from tests.proxy_helpers import start_server  # noqa: E402
from tests.telegram_emulator import BotApiEmulator  # noqa: E402

TOKEN = "123456789:AAbench-token-for-the-emulator-only-000"
CHAT, APPROVER = -1001000000001, 4242

# Run by the proxy's own Python where its data is (argv[1]): here, or in the VM as `proxy`.
MAKE_AGENTS = """
import json, os, sys
from pathlib import Path
from proxy.config import load_settings
from proxy.store import Store, init_data_dir
settings = load_settings(env={}, data_dir=Path(sys.argv[1]))
if not settings.key_path.exists():  # the VM's proxy made its own
    init_data_dir(settings)
with Store(settings) as store:
    store.set_secret("bench-key", b"sk-bench-" + os.urandom(16).hex().encode(), "operator:bench")
    agents = [store.add_agent(f"agent-{n:02d}", ["bench-*"], "operator:bench") for n in range(int(sys.argv[2]))]
print(json.dumps(agents))
"""
DECIDED_AT = """
import json, sqlite3, sys
ids = json.load(sys.stdin)
db = sqlite3.connect(sys.argv[1] + "/proxy.db")
query = f"SELECT id, decided_at FROM requests WHERE id IN ({','.join('?' * len(ids))})"
print(json.dumps(dict(db.execute(query, ids).fetchall())))
"""
MAX_RECONNECTS = 5
CLOCK = "import sys, time\nfor _ in sys.stdin: print(repr(time.time()), flush=True)"


@dataclass
class Proxy:
    """The proxy under test as the benchmark reaches it."""

    where: str
    port: int  # on 127.0.0.1
    tokens: list[str]
    cli: Callable[[str], list[str]]  # argv approving a request
    python: Callable[[str, str], str]  # (code, stdin) -> stdout, run where the proxy's data is
    python_argv: Callable[[str], list[str]]
    rss_mb: Callable[[], float]
    diagnose: Callable[[], str] = lambda: ""
    offsets: list[tuple[float, float]] = field(default_factory=list)  # (its clock - ours, ± bound)

    def measure_clock(self) -> None:
        """Its clock minus ours: the probe with the shortest round trip, bounded by half of it."""
        probe = subprocess.Popen(
            self.python_argv(CLOCK), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert probe.stdin and probe.stdout
        best = (float("inf"), 0.0)
        for _ in range(30):
            sent = time.time()
            probe.stdin.write("\n")
            probe.stdin.flush()
            theirs = float(probe.stdout.readline())
            back = time.time()
            best = min(best, (back - sent, theirs - (sent + back) / 2))
        probe.stdin.close()
        probe.wait(60)
        self.offsets.append((best[1], best[0] / 2))

    @property
    def offset(self) -> float:
        return statistics.mean(o for o, _ in self.offsets)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def http(
    port: int,
    method: str,
    path: str,
    token: str,
    body: dict | None = None,
    conn: Connection | None = None,
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
    if not status_line:
        raise ConnectionError("the server closed the connection")
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    payload = json.loads(await reader.readexactly(length)) if length else {}
    if conn is None:
        writer.close()
    return int(status_line.split()[1]), payload


def rss_of(status_text: str) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", status_text)
    return int(match.group(1)) / 1024 if match else 0.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


@dataclass
class Waits:
    answered: dict[str, float] = field(default_factory=dict)  # decided: when the agent had it
    held: dict[str, float] = field(default_factory=dict)  # when its first ?wait= was sent
    first_answer: dict[str, float] = field(default_factory=dict)  # any answer, decided or pending at timeout
    errors: dict[str, str] = field(default_factory=dict)  # given up on
    lost: dict[str, int] = field(default_factory=dict)  # connections lost, each followed by a reconnect
    lost_asks: int = 0


async def connect(port: int, token: str, rid: str, opening: asyncio.Semaphore | None) -> Connection:
    """A connection to the proxy; with `opening`, known to reach it (a status call answered) before the next opens.

    QEMU's user network listens on a forwarded port with a backlog of 1 (libslirp's tcp_listen),
    which dropped the handshakes of a burst until the takeover widened it (takeover/host/forward_backlog.py);
    `opening` paces the connections as agents arriving over time would.
    """
    if opening is None:
        return await asyncio.open_connection("127.0.0.1", port)
    async with opening:
        conn = await asyncio.open_connection("127.0.0.1", port)
        await http(port, "GET", f"/v1/requests/{rid}", token, conn=conn)
        return conn


async def hold(port: int, token: str, rid: str, wait: int, waits: Waits, opening: asyncio.Semaphore | None) -> None:
    """Hold `rid` in ?wait= until it is decided; reconnect after a lost connection, as the agent's tool does."""
    conn = None
    try:
        while True:
            try:
                conn = conn or await connect(port, token, rid, opening)
                waits.held.setdefault(rid, time.time())
                status, body = await http(port, "GET", f"/v1/requests/{rid}?wait={wait}", token, conn=conn)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                waits.lost[rid] = waits.lost.get(rid, 0) + 1
                if waits.lost[rid] > MAX_RECONNECTS:
                    waits.errors[rid] = repr(exc)
                    return
                if conn:
                    conn[1].close()
                conn = None
                await asyncio.sleep(RECONNECT_PAUSE_SECONDS)
                continue
            if status != 200:
                waits.errors[rid] = f"{status} {body.get('error')}"
                return
            waits.first_answer.setdefault(rid, time.time())
            if body["status"] != "pending":
                waits.answered[rid] = time.time()
                return
    finally:
        if conn:
            conn[1].close()


async def ask(port: int, token: str, n: int, waits: Waits) -> str:
    body = {"secret": "bench-key", "reason": f"bench {n}", "ttl_seconds": 600}
    for _ in range(MAX_RECONNECTS):
        try:
            status, answer = await http(port, "POST", "/v1/requests", token, body)
            break
        except (OSError, asyncio.IncompleteReadError, ValueError):
            waits.lost_asks += 1  # it may have been created: the agents' budget has room for that
            await asyncio.sleep(RECONNECT_PAUSE_SECONDS)
    else:
        raise SystemExit(f"asking failed {MAX_RECONNECTS} times: the connection was lost each time")
    if status != 201:
        raise SystemExit(f"asking failed: {status} {answer}")
    return str(answer["id"])


async def run(opts: argparse.Namespace, proxy: Proxy, emu: BotApiEmulator) -> None:
    waits = Waits()
    ids = [(token, await ask(proxy.port, token, n, waits)) for token in proxy.tokens for n in range(opts.per_agent)]
    held_since = time.time()
    opening = asyncio.Semaphore(4) if opts.paced else None
    waiters = [asyncio.create_task(hold(proxy.port, token, rid, opts.wait, waits, opening)) for token, rid in ids]
    # The bot posts one message per pending request; decide only once they are all shown.
    deadline = time.monotonic() + opts.messages_timeout
    while len(emu.messages(CHAT)) < len(ids):
        if time.monotonic() > deadline:
            raise SystemExit(f"the bot posted only {len(emu.messages(CHAT))} of {len(ids)} messages")
        await asyncio.sleep(0.2)
    messages_after = time.time() - held_since
    await asyncio.sleep(3)  # every call is now held in ?wait=
    held_rss = await asyncio.to_thread(proxy.rss_mb)
    if waits.errors:
        raise SystemExit(f"{len(waits.errors)} waits failed early, e.g. {next(iter(waits.errors.values()))}")
    by_text = {m["text"].rsplit("Request: ", 1)[-1].strip(): m["message_id"] for m in emu.messages(CHAT)}
    await asyncio.to_thread(proxy.measure_clock)

    step = max(1, len(ids) // (2 * opts.decisions))
    chosen = [rid for _, rid in ids[::step]][: 2 * opts.decisions]
    telegram, cli = chosen[: opts.decisions], chosen[opts.decisions :]
    tapped: dict[str, float] = {}
    for rid in telegram:
        tapped[rid] = time.time()
        emu.tap(APPROVER, CHAT, by_text[rid], f"a:{rid}")
        await asyncio.sleep(0.1)
    cli_exit: dict[str, float] = {}
    for rid in cli:
        done = await asyncio.create_subprocess_exec(
            *proxy.cli(rid), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, err = await done.communicate()
        cli_exit[rid] = time.time()
        if done.returncode != 0:
            raise SystemExit(f"the CLI failed: {err.decode()}")
    deadline = time.monotonic() + 60
    while not all(rid in waits.answered for rid in chosen) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    after_rss = await asyncio.to_thread(proxy.rss_mb)
    await asyncio.to_thread(proxy.measure_clock)
    # Every wait must end with an answer: let each one's first `?wait=` run out (plus slack) before counting.
    deadline = time.monotonic() + max(0.0, max(waits.held.values(), default=held_since) + opts.wait + 15 - time.time())
    while len(waits.first_answer) + len(waits.errors) < len(ids) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    first_answers = dict(waits.first_answer)
    errors = dict(waits.errors)
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)

    decided = json.loads(proxy.python(DECIDED_AT, json.dumps(chosen)))
    print(f"\n{proxy.where}")
    print(
        f"{len(ids)} calls held in ?wait={opts.wait} ({len(proxy.tokens)} agents x {opts.per_agent}); the bot had "
        f"posted all {len(ids)} messages {messages_after:.1f} s after the waits began"
    )
    if waits.held:
        how = "each connection checked before the next (4 at a time)" if opts.paced else "in one burst"
        print(
            f"connections opened {how}: every wait held {max(waits.held.values()) - held_since:.1f} s after the first"
        )
    print(f"proxy RSS {held_rss:.0f} MB held, {after_rss:.0f} MB after the decisions")
    late = sum(1 for rid, t in first_answers.items() if t - waits.held[rid] > opts.wait + 15)
    print(
        f"waits answered (decided, or pending when their {opts.wait} s ran out): {len(first_answers)} of {len(ids)}"
        f" ({late} later than {opts.wait + 15} s), failed: {len(errors)}"
        + (f", e.g. {next(iter(errors.values()))}" if errors else "")
    )
    if waits.lost or waits.lost_asks:
        print(
            f"connections lost (each followed by a reconnect): {sum(waits.lost.values())} waits of "
            f"{len(waits.lost)} requests; {waits.lost_asks} asks"
        )
    if diagnosis := proxy.diagnose():
        print(diagnosis.rstrip())
    missing = [rid for rid in chosen if rid not in waits.answered]
    if missing:
        print(f"NOT ANSWERED within 60 s of the last decision: {len(missing)} of {len(chosen)}")
    if proxy.offsets:
        shown = ", ".join(f"{o * 1000:+.1f} ± {b * 1000:.1f} ms" for o, b in proxy.offsets)
        print(f"its clock minus ours (before, after the decisions): {shown}")
    offset = proxy.offset

    def line(name: str, ms: list[float]) -> None:
        if not ms:
            print(f"{name:34s}: n=0")
            return
        print(
            f"{name:34s}: n={len(ms)}  p50 {statistics.median(ms):7.1f} ms  p99 {percentile(ms, 99):7.1f} ms"
            f"  max {max(ms):7.1f} ms"
        )

    line(
        "Telegram tap, decided -> agent",
        [(waits.answered[r] - decided[r] + offset) * 1000 for r in telegram if r in waits.answered],
    )
    line(
        "Telegram tap, tap -> agent", [(waits.answered[r] - tapped[r]) * 1000 for r in telegram if r in waits.answered]
    )
    line(
        "CLI, decided -> agent", [(waits.answered[r] - decided[r] + offset) * 1000 for r in cli if r in waits.answered]
    )
    # The decision is durable only after its commit's fsync, which a busy disk can stretch; the CLI
    # exits after that commit, so an agent answered before the CLI exited was not kept waiting by us.
    before_exit = sum(1 for r in cli if r in waits.answered and waits.answered[r] <= cli_exit[r])
    print(f"CLI decisions whose agent had the answer before the CLI process exited: {before_exit} of {len(cli)}")


def settings_toml(emulator_url: str, per_agent: int) -> str:
    """The proxy's config.toml: Telegram at the emulator, each agent allowed its `per_agent` pending requests."""
    return (
        f'telegram_token = "{TOKEN}"\ntelegram_chat_id = {CHAT}\ntelegram_approvers = [{APPROVER}]\n'
        f'telegram_api_url = "{emulator_url}"\nrate_burst = {per_agent + MAX_RECONNECTS}\n'
        f"max_pending_per_agent = {per_agent + MAX_RECONNECTS}\n"
    )


@contextmanager
def on_the_host(opts: argparse.Namespace, emu: BotApiEmulator) -> Iterator[Proxy]:
    with tempfile.TemporaryDirectory(prefix="spx-bench-waiters-") as tmp:
        data_dir = Path(tmp) / "data"

        def python_argv(code: str, *args: str) -> list[str]:
            return [sys.executable, "-c", code, str(data_dir), *args]

        def python(code: str, stdin: str = "", *args: str) -> str:
            return subprocess.run(
                python_argv(code, *args), input=stdin, capture_output=True, text=True, check=True, cwd=ROOT
            ).stdout

        tokens = json.loads(python(MAKE_AGENTS, "", str(opts.agents)))
        (data_dir / "config.toml").write_text(settings_toml(emu.url, opts.per_agent))
        server = start_server(load_settings(env={}, data_dir=data_dir), quiet=True)
        try:
            yield Proxy(
                "on the host: python -m proxy serve on 127.0.0.1; the CLI in another process here",
                server.port,
                tokens,
                cli=lambda rid: [sys.executable, "-m", "proxy", "--data-dir", str(data_dir), "approve", rid],
                python=python,
                python_argv=python_argv,
                rss_mb=lambda: rss_of(Path(f"/proc/{server.process.pid}/status").read_text()),
            )
        finally:
            server.stop()


@contextmanager
def through_the_vm(opts: argparse.Namespace, emu: BotApiEmulator) -> Iterator[Proxy]:
    from bench.through_vm import GUEST_PYTHON, guest_url, taken_over_vm
    from vm_image.guest_files import DATA_DIR

    url = guest_url(emu.port)
    with taken_over_vm(
        settings_toml(url, opts.per_agent), allow_telegram_api_url=url, memory_mb=opts.memory, cpus=opts.cpus
    ) as vm:
        tokens = json.loads(vm.python(MAKE_AGENTS, str(opts.agents)))
        rss = "grep VmRSS /proc/$(systemctl show --property MainPID --value secret-proxy.service)/status"
        yield Proxy(
            f"through the taken-over VM's forwarded port (TCG, {opts.memory} MB, {opts.cpus} vCPU); "
            "the CLI in the VM over SSH",
            vm.proxy_port,
            tokens,
            cli=lambda rid: vm.argv("/usr/local/bin/secret-proxy", "approve", rid),
            python=lambda code, stdin="": vm.python(code, stdin=stdin),
            python_argv=lambda code: vm.argv(*GUEST_PYTHON, "-c", code, DATA_DIR),
            rss_mb=lambda: rss_of(vm.run("sh", "-c", rss)),
            diagnose=lambda: vm.run("sh", "-c", GUEST_DIAGNOSIS),
        )


# What bounds the proxy in the VM: its CPU, its open-files limit, dropped or reset TCP connections.
GUEST_DIAGNOSIS = r"""
pid=$(systemctl show --property MainPID --value secret-proxy.service)
echo "guest load: $(cat /proc/loadavg); proxy CPU: $(awk '{print ($14 + $15) / 100}' /proc/$pid/stat) s;" \
  "restarts: $(systemctl show --property NRestarts --value secret-proxy.service)"
grep 'open files' /proc/$pid/limits
count() {  # FILE TABLE NAME...: the named counters of one table of /proc/net/{netstat,snmp}
  awk -v t="$2:" -v want=" $* " '$1 == t {if (!h) {split($0, n); h=1} else for (i=2; i<=NF; i++)
    if (index(want, " " n[i] " ")) printf "%s=%s ", n[i], $i}' "$1"
}
count /proc/net/netstat TcpExt ListenOverflows ListenDrops TCPAbortOnData TCPAbortOnClose TCPBacklogDrop
count /proc/net/snmp Tcp ActiveOpens PassiveOpens AttemptFails EstabResets OutRsts
echo
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--through-vm", action="store_true", help="the proxy in a taken-over VM (root, TCG)")
    # The VM's size: the takeover's own defaults unless told otherwise.
    parser.add_argument("--memory", type=int, default=TakeoverConfig.memory_mb, help="the VM's MB (--through-vm)")
    parser.add_argument("--cpus", type=int, default=TakeoverConfig.cpus, help="the VM's vCPUs (--through-vm)")
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--per-agent", type=int, default=20)
    parser.add_argument("--decisions", type=int, default=30, help="approvals through each channel")
    parser.add_argument("--wait", type=int, default=60, help="each call's ?wait= in seconds")
    parser.add_argument(
        "--paced",
        action="store_true",
        help="open the connections 4 at a time, each checked before the next (default: in one burst)",
    )
    parser.add_argument("--messages-timeout", type=float, default=600, help="for the bot to post every request")
    opts = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one connection per waiter

    emu = BotApiEmulator(TOKEN)
    emu.add_chat(CHAT, "supergroup", "Approvers")
    emu.add_user(APPROVER, "Approver", "approver")
    # Below 1024 (the VM reaches it through the host's egress list, which takes no higher host port).
    emu.start("127.0.0.1", egress.free_privileged_port("127.0.0.1", range(900, 1000)) if opts.through_vm else 0)
    try:
        with (through_the_vm if opts.through_vm else on_the_host)(opts, emu) as proxy:
            asyncio.run(run(opts, proxy, emu))
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
