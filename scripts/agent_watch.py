"""Root's side of the agent's /health watch: start scripts/health_watch.py as the agent, stop it, read it.

The bench, the demo and the takeover's end-to-end test all want the agent's view of a takeover: how
long its proxy went unanswered. The watcher runs as the unprivileged agent with Debian's python3 and
the environment given (the demo's plain agent environment), so it sees exactly what the agent sees.
"""

from __future__ import annotations

import json
import pwd
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WATCHER = Path(__file__).resolve().parent / "health_watch.py"
STARTUP_S = 2.0  # the watcher's interpreter starts and answers are seen before the takeover begins
STOP_WAIT_S = 30.0


class WatchError(Exception):
    """The watcher failed or would not stop; the message says what it printed."""


@dataclass
class AgentWatch:
    process: subprocess.Popen[str]

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then its JSON (health_watch.py's); one that does not stop in 30 s is killed: an error."""
        self.process.send_signal(signal.SIGTERM)
        try:
            out, err = self.process.communicate(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            stopped = f"the agent's watcher did not stop within {STOP_WAIT_S:.0f} s of SIGTERM; it was killed"
            raise WatchError(stopped) from None
        sys.stderr.write(err)
        if self.process.returncode != 0:
            raise WatchError(f"the agent's watcher failed ({self.process.returncode}): {err.strip()[-1000:]}")
        result: dict[str, Any] = json.loads(out)
        return result


def start_agent_watch(
    user: str,
    env: dict[str, str],
    url: str,
    *,
    interval: float = 0.05,
    timeout: float = 1.0,
    max_seconds: float = 3600,
) -> AgentWatch:
    """health_watch.py as `user`, polling URL/health. setpriv, not runuser: it execs, so SIGTERM reaches the
    watcher itself (runuser's parent would kill it 2 s after passing it on). `max_seconds` ends it even if
    the caller never stops it."""
    entry = pwd.getpwnam(user)
    argv = [
        "setpriv",
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",
        "--init-groups",
        "--",
        "env",
        "-i",
        *(f"{k}={v}" for k, v in env.items()),
        "/usr/bin/python3",
        "-I",
        str(WATCHER),
        url,
        "--interval",
        str(interval),
        "--timeout",
        str(timeout),
        "--max-seconds",
        str(max_seconds),
    ]
    # A session of its own: a ^C at root's terminal reaches root's command, whose stop() then stops it.
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=env.get("HOME", entry.pw_dir),
        start_new_session=True,
    )
    time.sleep(STARTUP_S)
    if process.poll() is not None:
        raise WatchError(f"the agent's watcher exited at once ({process.returncode}): {process.communicate()[1]}")
    return AgentWatch(process)
