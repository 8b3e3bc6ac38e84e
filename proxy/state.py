"""What the running proxy shares between its handlers, its bot and its sweeper."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar

from .config import Settings
from .ratelimit import RateLimiter
from .store import Request, Store
from .writer import GroupCommitWriter

T = TypeVar("T")


class Changes:
    """Wakes everyone waiting on `?wait=` when any request changes in this process.

    Decisions made by another process (the CLI over SSH) are seen by polling,
    which is why waiters also wake on a short timeout.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            pass


class ApprovalChannel(Protocol):
    def announce(self, request: Request) -> None: ...


@dataclass
class ProxyState:
    settings: Settings
    store: Store
    limiter: RateLimiter
    changes: Changes = field(default_factory=Changes)
    channels: list[ApprovalChannel] = field(default_factory=list)
    poll_interval: float = 0.5
    # One writer thread: commits fsync, and the event loop must not wait on a disk.
    _writer: GroupCommitWriter | None = None

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store change on the writer thread; returns once it is durable."""
        if self._writer is None:
            self._writer = GroupCommitWriter(self.store)
        return await self._writer.submit(lambda: fn(*args, **kwargs))

    def announce(self, request: Request) -> None:
        self.changes.notify()
        for channel in self.channels:
            channel.announce(request)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
        self.store.close()
