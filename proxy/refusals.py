"""Refusals of agents' calls, audited without one durable write per refused call.

The first refusal of a kind (agent, action, code) in a window is audited at once;
the repeats are only counted, and one entry carrying the count is written when the
window closes (the sweeper asks for `due` every second). So each kind costs at most
two audit entries per window and agent, whatever the agent sends, and a flood of
refused calls costs no fsync each. A crash loses only the counts of open windows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Repeats:
    """The repeats of one kind of refusal in a window that closed: audited as one entry."""

    actor: str
    action: str
    code: str
    count: int
    window_seconds: float


@dataclass
class _Window:
    opened: float
    repeats: int = 0


@dataclass
class RefusalCounter:
    window_seconds: float
    _open: dict[tuple[str, str, str], _Window] = field(default_factory=dict)
    _closed: list[Repeats] = field(default_factory=list)

    def note(self, actor: str, action: str, code: str, now: float | None = None) -> bool:
        """Count one refusal; True when it opens a window and must be audited now."""
        now = time.monotonic() if now is None else now
        key = (actor, action, code)
        window = self._open.get(key)
        if window is not None and now - window.opened >= self.window_seconds:
            self._close(key, window)
            window = None
        if window is None:
            self._open[key] = _Window(now)
            return True
        window.repeats += 1
        return False

    def due(self, now: float | None = None) -> list[Repeats]:
        """Close the windows that ran out; the repeats they counted, to audit."""
        now = time.monotonic() if now is None else now
        for key, window in list(self._open.items()):
            if now - window.opened >= self.window_seconds:
                self._close(key, window)
        closed, self._closed = self._closed, []
        return closed

    def close_all(self) -> list[Repeats]:
        """At shutdown: every open window's repeats."""
        for key, window in list(self._open.items()):
            self._close(key, window)
        closed, self._closed = self._closed, []
        return closed

    def _close(self, key: tuple[str, str, str], window: _Window) -> None:
        del self._open[key]
        if window.repeats:
            self._closed.append(Repeats(*key, window.repeats, self.window_seconds))
