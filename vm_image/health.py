"""Waiting for the proxy's /health: one loop for vm_image's launch and the takeover's restart, verify and rollback."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable

from .errors import HealthTimeout, ProcessGone


def answers(url: str, timeout: float = 5) -> bool:
    """`url`/health answers 200 with {"status": "ok"}."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:
            return bool(resp.status == 200 and json.loads(resp.read()).get("status") == "ok")
    except (OSError, ValueError, AttributeError):
        return False


def wait_for_health(
    url: str,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    *,
    interval: float = 1.0,
    waiting: Callable[[float], None] = lambda _: None,
    note_every: float = 10,
) -> float:
    """Poll `url`/health until it answers; returns the seconds it took.

    Raises ProcessGone as soon as `alive()` is false (the QEMU that should answer has exited),
    HealthTimeout after `timeout` seconds. `waiting(seconds)` is called every `note_every` seconds.
    """
    started = time.monotonic()
    last_note = started
    while True:
        if answers(url):
            return time.monotonic() - started
        if not alive():
            raise ProcessGone(f"QEMU exited before {url}/health answered")
        now = time.monotonic()
        if now - started >= timeout:
            raise HealthTimeout(f"{url}/health did not answer within {timeout:.0f} s")
        if now - last_note >= note_every:
            last_note = now
            waiting(now - started)
        time.sleep(interval)
