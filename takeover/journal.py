"""The takeover's journal: `journal.json` in the host directory, one entry per step.

Written atomically (temp file 0600, fsync, rename, fsync the directory) after
every change, so a crash leaves either the old or the new journal. A rerun
reads it to resume; `rollback` reads it to find the source VM again. Which steps
there are, in what order, and where a rerun resumes, is the table in `steps/__init__.py`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import DestinationTaken, JournalError
from .host.files import write_json_atomic
from .record import from_record, to_record

VERSION = 1
JOURNAL_NAME = "journal.json"
T = TypeVar("T")

IN_PROGRESS = "in_progress"
DONE = "done"
ROLLED_BACK = "rolled_back"


@dataclass
class Journal:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, host_dir: Path) -> Journal | None:
        path = host_dir / JOURNAL_NAME
        try:
            raw = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise JournalError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("steps"), dict):
            raise JournalError(f"{path} is not a version {VERSION} takeover journal")
        return cls(path, data)

    @classmethod
    def new(cls, host_dir: Path, options: dict[str, Any]) -> Journal:
        journal = cls(
            host_dir / JOURNAL_NAME,
            {
                "version": VERSION,
                "state": IN_PROGRESS,
                "created": time.time(),
                "options": options,
                "steps": {},
                "history": [],
            },
        )
        journal.save()
        return journal

    @property
    def options(self) -> dict[str, Any]:
        """The run's options as `TakeoverConfig.to_dict` wrote them (`TakeoverConfig.saved` reads them)."""
        options: dict[str, Any] = self.data.get("options") or {}
        return options

    @property
    def state(self) -> str:
        return str(self.data.get("state"))

    def set_state(self, state: str) -> None:
        self.data["state"] = state
        self.save()

    def entry(self, step: str) -> dict[str, Any]:
        return self.data["steps"].get(step) or {}

    def done(self, step: str) -> bool:
        return self.entry(step).get("status") == "done"

    def read(self, step: str, kind: type[T]) -> T:
        """A finished step's result as the dataclass the step returned (`record.from_record`)."""
        return from_record(kind, self.result(step), f"step {step}'s result in {self.path}")

    def result(self, step: str) -> dict[str, Any]:
        """A finished step's result as written (JSON); `read` gives it typed."""
        entry = self.entry(step)
        if entry.get("status") != "done":
            raise JournalError(f"step {step!r} has not finished; its result is not in {self.path}")
        result: dict[str, Any] = entry["result"]
        return result

    def begin(self, step: str) -> None:
        self.data["steps"][step] = {"status": "started", "started": time.time()}
        self._log(step, "started")
        self.save()

    def finish(self, step: str, result: object) -> None:
        """`result`: the step's dataclass (or a dict), kept as `record.to_record` writes it."""
        entry = self.data["steps"].setdefault(step, {"started": time.time()})
        entry.update(status="done", finished=time.time(), result=to_record(result))
        entry["duration_s"] = round(entry["finished"] - entry["started"], 3)
        self._log(step, "done")
        self.save()

    def fail(self, step: str, error: BaseException) -> None:
        entry = self.data["steps"].setdefault(step, {"started": time.time()})
        entry.update(status="failed", finished=time.time(), error=f"{type(error).__name__}: {error}")
        self._log(step, "failed", entry["error"])
        self.save()

    def forget(self, step: str) -> None:
        """Drop a step's entry so it runs again (its output was discarded)."""
        if self.data["steps"].pop(step, None) is not None:
            self._log(step, "discarded")
            self.save()

    def _log(self, step: str, event: str, detail: str = "") -> None:
        self.data.setdefault("history", []).append(
            {"at": round(time.time(), 3), "step": step, "event": event, **({"detail": detail} if detail else {})}
        )

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


def check_destination(journal: Journal | None) -> None:
    """Refuse a host directory that already holds a finished takeover."""
    if journal is not None and journal.state == DONE:
        raise DestinationTaken(f"{journal.path.parent} already holds a taken-over VM (journal state 'done')")
