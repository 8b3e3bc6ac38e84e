"""What every step is given: the run's settings, host directory, journal, and where to say what it does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vm_image.boot_files import BootFiles

from ..agent.machine import Connection, connect
from ..config import TakeoverConfig
from ..journal import Journal
from ..models import SourceVM


class Notes(Protocol):
    """What a step may tell the operator: `progress.Progress` (which takes its titles from this table)."""

    def note(self, text: str) -> None: ...


@dataclass
class Context:
    cfg: TakeoverConfig
    host_dir: Path
    journal: Journal
    progress: Notes
    proxy_config: bytes | None = None
    summary: str = ""
    boot: BootFiles | None = None  # the host's kernel and initrd, prepared once per run (steps/scrub.py)
    _machine: Connection | None = None

    def machine(self) -> Connection:
        """The one connection to the agent machine (--agent-machine), opened at first use, closed by `close`."""
        if self._machine is None:
            self._machine = connect(self.cfg, self.host_dir)
        return self._machine

    def close(self) -> None:
        machine, self._machine = self._machine, None
        if machine is not None:
            machine.close()

    @property
    def source(self) -> SourceVM:
        return self.journal.read("find_vm", SourceVM)

    def note(self, text: str) -> None:
        self.progress.note(text)
