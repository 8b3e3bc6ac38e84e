"""The agent's /health watcher (scripts/health_watch.py) against a real server on 127.0.0.1 that goes away
for a second and comes back on the same port, as the proxy does during a takeover's cut-over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from scripts.health_watch import Moment, Poll, summarise

ROOT = Path(__file__).resolve().parent.parent
WATCHER = ROOT / "scripts/health_watch.py"
# The agent's interpreter: Debian's, isolated, nothing installed; the test's own where there is none.
AGENT_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
OUTAGE_S = 1.0


class Health:
    """/health answering {"status": "ok"} on 127.0.0.1, stoppable and restartable on the same port."""

    def __init__(self) -> None:
        self.answered = 0
        self.port = 0
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                body = json.dumps({"status": "ok"}).encode()
                self.send_response(200 if self.path == "/health" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                health.answered += 1

            def log_message(self, *args: object) -> None:
                pass

        # HTTPServer sets SO_REUSEADDR: the port binds again although the last connections are in TIME_WAIT.
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()  # the port refuses connections from here on
        self.server = None


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout} s")
        time.sleep(0.02)


def test_a_one_second_outage_is_the_longest_gap_and_the_watch_saw_both_sides(tmp_path):
    health = Health()
    health.start()
    out = tmp_path / "watch.json"
    watcher = subprocess.Popen(
        [
            AGENT_PYTHON,
            "-I",
            str(WATCHER),
            f"http://127.0.0.1:{health.port}",
            "--interval",
            "0.05",
            "--timeout",
            "1.0",
            "--out",
            str(out),
            "--max-seconds",
            "60",  # whatever happens to this test, the watcher ends
        ],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: health.answered >= 5, 20, "five answers before the outage")
        health.stop()
        time.sleep(OUTAGE_S)
        health.start()
        before = health.answered
        wait_until(lambda: health.answered >= before + 5, 20, "five answers after the outage")
        watcher.send_signal(signal.SIGTERM)
        stdout, stderr = watcher.communicate(timeout=20)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        if health.server is not None:
            health.stop()
    assert watcher.returncode == 0, stderr
    seen = json.loads(out.read_text())
    assert 0.8 <= seen["longest_gap_s"] <= 3, seen
    assert seen["answered_before"] and seen["answered_after"], seen
    assert seen["stopped_by"] == "SIGTERM"
    # Five answers on each side, less the one in flight at the SIGTERM, which the watcher drops unread.
    assert seen["failed"] >= 1 and seen["ok"] >= 9
    assert seen["gap_started_at"] < seen["gap_ended_at"] <= seen["stopped_at"]
    assert "longest gap" in stderr and stdout == ""


def test_a_proxy_that_never_comes_back_shows_its_whole_outage():
    """The stop bounds the last gap: no answer after the outage is not a short gap."""
    polls = [Poll(10.0, 1000.0, True), Poll(11.0, 1001.0, True), Poll(12.0, 1002.0, False), Poll(40.0, 1030.0, False)]
    seen = summarise(polls, Moment(9.9, 999.9), Moment(41.0, 1031.0), "SIGTERM", "http://127.0.0.1:1/health", 1, 1)
    assert seen.longest_gap_s == 30.0 and (seen.gap_started_at, seen.gap_ended_at) == (1001.0, 1031.0)
    assert seen.answered_before and not seen.answered_after
