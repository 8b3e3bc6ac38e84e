#!/usr/bin/python3 -I
"""The agent's view of a takeover: poll the proxy's /health and say how long it went unanswered.

    python3 -I scripts/health_watch.py http://127.0.0.1:3737 [--interval 0.05] [--timeout 1.0]
                                       [--out FILE] [--max-seconds 1800]

It runs as the unprivileged agent, with Debian's python3 and nothing installed, so it uses the
standard library only. It polls URL/health every `--interval` seconds, one request at a time, each
given up after `--timeout` (a hung request counts as unanswered), until SIGTERM, SIGINT or
`--max-seconds`. Then it writes one JSON object (to FILE, else stdout) and a one-line summary on stderr.

`longest_gap_s` is the longest time between two consecutive answers, measured on the monotonic clock;
the start and the stop of the watch count as bounds, so a proxy that never came back still shows
its whole outage. `gap_started_at` and `gap_ended_at` are wall-clock times (time.time()), to be set
beside the takeover journal's step times. An answer is HTTP 200 with the JSON {"status": "ok"}.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

# Gaps longer than this are all listed, not only the longest: a second outage (a first boot of the
# host's VM, say) shows up beside the cut-over's. Far above a healthy gap of one interval.
LISTED_GAP_S = 0.5
MAX_LISTED_GAPS = 100
MAX_BODY = 4096  # /health answers a few bytes; never read more than this


class Stopped(Exception):
    """Raised by the signal handler so that a poll in flight (up to --timeout) does not delay the stop."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Poll:
    mono: float  # time.monotonic() when the poll ended (answered or given up)
    wall: float  # time.time() at the same moment
    ok: bool


@dataclass(frozen=True)
class Gap:
    seconds: float
    started_at: float  # wall clock: the answer before the gap (or the watch's start)
    ended_at: float  # wall clock: the answer after it (or the watch's stop)


@dataclass(frozen=True)
class Moment:
    mono: float
    wall: float

    @classmethod
    def now(cls) -> Moment:
        return cls(time.monotonic(), time.time())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the proxy's base URL, e.g. http://127.0.0.1:3737 (polled at URL/health)")
    p.add_argument("--interval", type=positive, default=0.05, help="seconds between polls (default 0.05)")
    p.add_argument("--timeout", type=positive, default=1.0, help="seconds before a poll is given up (default 1.0)")
    p.add_argument("--out", type=Path, help="write the JSON here when stopped (default: stdout)")
    p.add_argument("--max-seconds", type=positive, default=1800, help="stop after this long (default 1800)")
    args = p.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        p.error(f"URL must start with http:// or https://, not {args.url!r}")
    return args


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def health_url(base: str) -> str:
    return base.rstrip("/") + "/health"


def make_opener() -> urllib.request.OpenerDirector:
    # No proxies: the agent's environment may name an HTTP proxy, and the watch is of this address itself.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def poll_once(opener: urllib.request.OpenerDirector, url: str, timeout: float) -> bool:
    """True when the proxy answered healthy. urllib's timeout bounds each socket wait, which for a
    few bytes on loopback bounds the request."""
    try:
        with opener.open(url, timeout=timeout) as reply:
            if reply.status != 200:
                return False
            body = json.loads(reply.read(MAX_BODY))
    except (OSError, http.client.HTTPException, ValueError):  # refused, reset, timed out, not JSON
        return False
    return isinstance(body, dict) and body.get("status") == "ok"


def watch(url: str, interval: float, timeout: float, max_seconds: float, polls: list[Poll]) -> str:
    """Poll until stopped, appending to `polls`; returns why it stopped."""
    opener = make_opener()
    start = time.monotonic()
    try:
        stop_on_signals()
        while True:
            began = time.monotonic()
            if began - start >= max_seconds:
                ignore_signals()  # from here on the JSON is being written
                return "max-seconds"
            ok = poll_once(opener, url, timeout)
            polls.append(Poll(time.monotonic(), time.time(), ok))
            # Polls start every interval; one that took longer is followed at once, never two at a time.
            time.sleep(max(0.0, began + interval - time.monotonic()))
    except Stopped as stop:
        return stop.reason


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals() -> None:
    def handler(signum: int, _frame: object) -> None:
        ignore_signals()  # the first signal stops the watch; later ones must not stop the JSON's writing
        raise Stopped(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def ignore_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def gaps_between_answers(polls: list[Poll], started: Moment, stopped: Moment) -> list[Gap]:
    """The times between consecutive answers, the watch's start and stop counting as answers."""
    marks = [started, *(Moment(p.mono, p.wall) for p in polls if p.ok), stopped]
    return [
        Gap(round(after.mono - before.mono, 3), round(before.wall, 3), round(after.wall, 3))
        for before, after in itertools.pairwise(marks)
    ]


@dataclass(frozen=True)
class Summary:
    """What the watch saw; written as JSON, field for field."""

    url: str
    interval_s: float
    timeout_s: float
    started_at: float
    stopped_at: float
    stopped_by: str  # SIGTERM, SIGINT or max-seconds
    polls: int
    ok: int
    failed: int
    first_at: float | None  # wall clock of the first and the last poll
    last_at: float | None
    answered_before: bool  # the first poll was answered
    answered_after: bool  # the last poll was answered
    longest_gap_s: float
    gap_started_at: float
    gap_ended_at: float
    gaps: list[Gap]  # every gap over LISTED_GAP_S, in time order

    def one_line(self) -> str:
        return (
            f"health_watch: {self.polls} polls, {self.ok} ok, {self.failed} failed; "
            f"longest gap {self.longest_gap_s:.3f} s ({clock(self.gap_started_at)} to "
            f"{clock(self.gap_ended_at)} UTC); answered before: {yes_no(self.answered_before)}, "
            f"after: {yes_no(self.answered_after)}; stopped by {self.stopped_by}"
        )


def summarise(
    polls: list[Poll], started: Moment, stopped: Moment, stopped_by: str, url: str, interval: float, timeout: float
) -> Summary:
    gaps = gaps_between_answers(polls, started, stopped)
    longest = max(gaps, key=lambda g: g.seconds)
    ok = sum(p.ok for p in polls)
    listed = sorted((g for g in gaps if g.seconds > LISTED_GAP_S), key=lambda g: g.seconds, reverse=True)
    return Summary(
        url=url,
        interval_s=interval,
        timeout_s=timeout,
        started_at=round(started.wall, 3),
        stopped_at=round(stopped.wall, 3),
        stopped_by=stopped_by,
        polls=len(polls),
        ok=ok,
        failed=len(polls) - ok,
        first_at=round(polls[0].wall, 3) if polls else None,
        last_at=round(polls[-1].wall, 3) if polls else None,
        answered_before=bool(polls) and polls[0].ok,
        answered_after=bool(polls) and polls[-1].ok,
        longest_gap_s=longest.seconds,
        gap_started_at=longest.started_at,
        gap_ended_at=longest.ended_at,
        gaps=sorted(listed[:MAX_LISTED_GAPS], key=lambda g: g.started_at),
    )


def clock(at: float) -> str:
    """HH:MM:SS.mmm UTC, rounded as the JSON's times are."""
    seconds, ms = divmod(round(at * 1000), 1000)
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}"


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def write_out(summary: Summary, out: Path | None) -> None:
    text = json.dumps(asdict(summary), indent=1) + "\n"
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    # Whole or not at all: whoever reads it after the stop never sees half a file.
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is not None and not os.access(args.out.parent, os.W_OK):
        # Say so now, not after half an hour of watching.
        print(f"health_watch: cannot write in {args.out.parent}; what to do: pick another --out", file=sys.stderr)
        return 2
    url = health_url(args.url)
    polls: list[Poll] = []
    started = Moment.now()
    stopped_by = watch(url, args.interval, args.timeout, args.max_seconds, polls)
    stopped = Moment.now()
    summary = summarise(polls, started, stopped, stopped_by, url, args.interval, args.timeout)
    write_out(summary, args.out)
    print(summary.one_line(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
