"""One takeover under a watching agent: how long it takes, and how long the agent's proxy does not answer.

    flock /var/tmp/spvm-slow.lock .venv/bin/python bench/bench_takeover.py [--json]
    .venv/bin/python bench/bench_takeover.py --clean

As root. The roles are the demo's (scripts/demo.py, whose helpers this reuses): the unprivileged
`agent` user brings its VM up with `vm_image up`, then root runs `python -m takeover run` with the
demo's options. Everything is the bench's own (host directory, agent state directory, ports, QEMU
user), so a demo left running is left alone. While the takeover runs, the agent polls its proxy's
/health every 50 ms (scripts/health_watch.py, Debian's python3, nothing installed) until a few
seconds after the takeover ends.

Printed: the takeover's wall clock; its preparation (the steps before "checkpoint", from
report.json); its cut-over (from the start of "checkpoint" to the end of "verify", from
journal.json); and the proxy's downtime, the longest gap between two answers the agent got, with
whether it fell inside the cut-over. Nothing else about the step list is assumed.

The bench ends with the agent's VM taken over; a second run stops and removes that first, as the
demo does. `--clean` removes the host's VM and directory with `python -m takeover remove` (its egress
table and the users its run created: the bench's QEMU user and its forward proxy's) and the agent's
bench state directory (the `agent` user stays: the demo and the tests share it).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import demo  # noqa: E402
from scripts.agent_watch import AgentWatch, WatchError, start_agent_watch  # noqa: E402
from vm_image.layout import default_state_dir  # noqa: E402

BENCH_NAME = "secret-proxy-vm-bench"
# The bench makes no agent machine (demo.reset removes only one its run recorded); the demo's is 10
# and the tests' 20 and up, so the bench names one nobody makes.
AGENT_MACHINE_INDEX = 19


class BenchError(Exception):
    """The bench cannot go on; the message says why and what to do."""


# -- the numbers, from the takeover's own records ----------------------------------------------------


@dataclass(frozen=True)
class StepTime:
    step: str
    status: str
    duration_s: float | None


@dataclass(frozen=True)
class TakeoverTimes:
    total_s: float  # wall clock of the `takeover run` process
    preparation_s: float  # the report's durations of the steps before "checkpoint"
    preparation_steps: list[str]
    cutover_s: float  # journal: "checkpoint" started to "verify" finished
    cutover_started_at: float  # wall clock
    cutover_ended_at: float
    steps: list[StepTime]


@dataclass(frozen=True)
class Downtime:
    seconds: float  # the watcher's longest gap between answers
    started_at: float  # wall clock: the last answer before it
    ended_at: float  # wall clock: the first answer after it
    inside_cutover: bool
    answered_before: bool
    answered_after: bool
    polls: int
    ok: int
    failed: int
    other_gaps: list[dict[str, float]]  # the watcher's other gaps over its listing threshold


@dataclass(frozen=True)
class BenchResult:
    takeover: TakeoverTimes
    downtime: Downtime


def takeover_times(report: dict[str, Any], journal: dict[str, Any], total_s: float) -> TakeoverTimes:
    """The takeover's times from report.json's step list and journal.json's step entries, whatever the steps."""
    steps = [StepTime(s["step"], s["status"], s.get("duration_s")) for s in report["steps"]]
    names = [s.step for s in steps]
    for needed in ("checkpoint", "verify"):
        if needed not in names:
            raise BenchError(f"the takeover's report has no step {needed!r} (its steps: {', '.join(names)})")
    before = steps[: names.index("checkpoint")]
    entries = journal["steps"]
    try:
        started = float(entries["checkpoint"]["started"])
        ended = float(entries["verify"]["finished"])
    except (KeyError, TypeError, ValueError):
        raise BenchError("the journal lacks the start of 'checkpoint' or the end of 'verify'") from None
    return TakeoverTimes(
        total_s=round(total_s, 3),
        preparation_s=round(sum(s.duration_s or 0.0 for s in before), 3),
        preparation_steps=[s.step for s in before],
        cutover_s=round(ended - started, 3),
        cutover_started_at=started,
        cutover_ended_at=ended,
        steps=steps,
    )


def downtime(watch: dict[str, Any], times: TakeoverTimes) -> Downtime:
    """The watcher's longest gap, and whether it lies within the cut-over, give or take one poll: the
    answers that bound the gap are up to an interval and a timeout from the moments the journal notes."""
    slack = float(watch["interval_s"]) + float(watch["timeout_s"])
    started, ended = float(watch["gap_started_at"]), float(watch["gap_ended_at"])
    inside = times.cutover_started_at - slack <= started and ended <= times.cutover_ended_at + slack
    longest = (watch["gap_started_at"], watch["gap_ended_at"])
    return Downtime(
        seconds=float(watch["longest_gap_s"]),
        started_at=started,
        ended_at=ended,
        inside_cutover=inside,
        answered_before=bool(watch["answered_before"]),
        answered_after=bool(watch["answered_after"]),
        polls=int(watch["polls"]),
        ok=int(watch["ok"]),
        failed=int(watch["failed"]),
        other_gaps=[g for g in watch.get("gaps", []) if (g["started_at"], g["ended_at"]) != longest],
    )


# -- the run ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent-user", default="agent")
    p.add_argument(
        "--agent-state",
        type=Path,
        help=f"the agent's vm_image state directory (default ~AGENT/.local/state/{BENCH_NAME})",
    )
    p.add_argument(
        "--agent-cache",
        type=Path,
        help="a vm_image build cache of the agent's to reuse (default: the state directory's own)",
    )
    p.add_argument("--host-dir", type=Path, default=Path("/var/lib") / BENCH_NAME)
    p.add_argument("--port", type=int, default=3747, help="the proxy's port on 127.0.0.1 (the demo's is 3737)")
    p.add_argument("--agent-ssh-port", type=int, default=2242)
    p.add_argument("--host-ssh-port", type=int, default=2243)
    p.add_argument(
        "--qemu-user",
        default="spvm-tbench-qemu",
        help="the host VM's QEMU user (its own: the egress rules match it, one per running host VM)",
    )
    p.add_argument("--interval", type=float, default=0.05, help="seconds between the agent's polls")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds before a poll counts as unanswered")
    p.add_argument("--after", type=float, default=3.0, help="seconds the agent keeps watching after the takeover")
    p.add_argument("--takeover-timeout", type=float, default=1800, help="bound on `takeover run` (seconds)")
    p.add_argument(
        "--in-order",
        action="store_true",
        help="run the takeover with --in-order (the baseline: the agent's VM stopped first) instead of the cut-over",
    )
    p.add_argument("--json", action="store_true", help="also print the numbers as one JSON object (the last line)")
    p.add_argument("--clean", action="store_true", help="stop and remove what the bench made")
    args = p.parse_args(argv)
    if args.agent_state is None:
        try:
            home = pwd.getpwnam(args.agent_user).pw_dir
        except KeyError:
            home = f"/home/{args.agent_user}"  # made by the run (demo's ensure_agent_user), as useradd would
        args.agent_state = default_state_dir({"HOME": home}).with_name(BENCH_NAME)
    return args


def demo_args(opts: argparse.Namespace) -> argparse.Namespace:
    """The demo's options for the bench's own directories, ports and QEMU user."""
    return demo.parse_args(
        [
            "--agent-user",
            opts.agent_user,
            "--agent-state",
            str(opts.agent_state),
            "--host-dir",
            str(opts.host_dir),
            "--port",
            str(opts.port),
            "--agent-ssh-port",
            str(opts.agent_ssh_port),
            "--host-ssh-port",
            str(opts.host_ssh_port),
            "--qemu-user",
            opts.qemu_user,
            "--agent-machine-index",
            str(AGENT_MACHINE_INDEX),
        ]
    )


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def start_watcher(opts: argparse.Namespace, url: str) -> AgentWatch:
    """health_watch.py as the agent, with the demo's plain agent environment; it outlives the takeover's
    bound, and ends even if the bench does not stop it."""
    env = demo.agent_env(opts.agent_user)
    max_seconds = opts.takeover_timeout + 600
    return start_agent_watch(
        opts.agent_user, env, url, interval=opts.interval, timeout=opts.timeout, max_seconds=max_seconds
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc}") from None
    return data


def run(opts: argparse.Namespace) -> BenchResult:
    args = demo_args(opts)
    if (args.host_dir / "journal.json").exists():
        say(f"a previous run's VM is in {args.host_dir}: stopping and removing it first (demo.reset)")
        demo.reset(args)
    agent = demo.Demo(args)
    say(f"agent ({opts.agent_user}): python -m vm_image up --state-dir {agent.agent_state} --port {opts.port}")
    agent.ensure_agent_user()
    cache = ["--cache-dir", str(opts.agent_cache)] if opts.agent_cache else []
    agent.vm_image("up", agent.agent_state, *cache, capture=False)
    say(f"agent: watching {agent.url}/health every {opts.interval} s (scripts/health_watch.py)")
    watcher = start_watcher(opts, agent.url)
    try:
        argv = agent.takeover_argv() + (["--in-order"] if opts.in_order else [])
        say("host (root): " + " ".join(argv[1:]) + "   (its output on stderr)")
        started = time.monotonic()
        # Its progress goes to stderr: stdout stays the bench's.
        done = subprocess.run(argv, cwd=ROOT, stdout=sys.stderr, timeout=opts.takeover_timeout)
        total = time.monotonic() - started
        say(f"the takeover exited {done.returncode} after {total:.1f} s; the agent watches {opts.after:.0f} s more")
        time.sleep(opts.after)
    finally:
        watch = watcher.stop()
    if done.returncode != 0:
        raise BenchError(
            f"the takeover failed (its error is above; the agent saw a gap of {watch['longest_gap_s']} s); "
            f"`python -m takeover rollback --host-dir {args.host_dir}` brings the agent's VM back, "
            "`bench/bench_takeover.py --clean` removes it all"
        )
    times = takeover_times(read_json(args.host_dir / "report.json"), read_json(args.host_dir / "journal.json"), total)
    return BenchResult(times, downtime(watch, times))


def clock(at: float) -> str:
    seconds, ms = divmod(round(at * 1000), 1000)
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}"


def show(result: BenchResult) -> None:
    t, d = result.takeover, result.downtime
    rows = [
        ("takeover, wall clock of `python -m takeover run`", f"{t.total_s:8.1f} s"),
        (
            f"  preparation: steps before checkpoint ({', '.join(t.preparation_steps) or 'none'})",
            f"{t.preparation_s:8.1f} s",
        ),
        ("  cut-over: checkpoint started to verify finished", f"{t.cutover_s:8.1f} s"),
        ("proxy downtime: the agent's longest gap between answers", f"{d.seconds:8.1f} s"),
        (
            f"  from {clock(d.started_at)} to {clock(d.ended_at)} UTC; inside the cut-over",
            "yes" if d.inside_cutover else "NO",
        ),
        (
            f"  agent's polls: {d.polls}, {d.ok} answered, {d.failed} not; answered before / after",
            f"{'yes' if d.answered_before else 'NO'} / {'yes' if d.answered_after else 'NO'}",
        ),
    ]
    rows += [
        (f"  another gap: {clock(g['started_at'])} to {clock(g['ended_at'])} UTC", f"{g['seconds']:8.1f} s")
        for g in d.other_gaps
    ]
    print()
    for what, value in rows:
        print(f"{what:<78} {value}")
    print("steps (report.json): " + ", ".join(f"{s.step} {s.duration_s or 0:.1f} s" for s in t.steps))


# -- cleaning up -----------------------------------------------------------------------------------


def clean(opts: argparse.Namespace) -> None:
    """The demo's reset: the host's VM removed with `takeover remove` (its egress table, forward proxy,
    the users its run created and the host directory; a failure stops here), the agent's VM stopped;
    then the bench's agent state."""
    demo.reset(demo_args(opts))
    print(f"stopped the bench's VMs; removed {opts.host_dir}, its egress table and the users its run created")
    if opts.agent_state.exists():
        # As the agent: the path is in its home, where a symlink of its own must not steer root's deletion.
        removed = demo.run_as_agent(opts.agent_user, ["rm", "-rf", "--", str(opts.agent_state)], timeout=300)
        print(f"removed {opts.agent_state}" if removed.returncode == 0 else removed.stderr.strip())
    demo.run_record_path(demo_args(opts)).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_takeover: run as root (it takes over a VM as the host)", file=sys.stderr)
        return 1
    try:
        if opts.clean:
            clean(opts)
            return 0
        result = run(opts)
    except (BenchError, WatchError) as exc:
        print(f"bench_takeover: {exc}", file=sys.stderr)
        return 1
    show(result)
    if opts.json:
        print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
