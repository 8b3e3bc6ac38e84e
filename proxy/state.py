"""What the running proxy shares between its handlers, its bot and its sweeper."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .broker import system_resolver
from .config import Settings
from .metrics import Metrics
from .ratelimit import InFlight, RateLimiter
from .refusals import RefusalCounter
from .store import Agent, Request, Store
from .writer import GroupCommitWriter

T = TypeVar("T")
log = logging.getLogger("proxy")


class Changes:
    """Wakes the `?wait=` calls of a request when it changes, whichever process changed it.

    Every change to a request commits together with an audit entry naming it, so the
    audit log is the feed: `check()` reads the entries after the last one it saw and
    wakes the waiters of the requests they name, and no waiter polls. Our own writes
    check when they return (`ProxyState.write`); another process's commit (the CLI
    over SSH) is noticed through inotify (`proxy/watch.py`), and the sweeper checks
    every second in case an event was missed.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._seq = store.last_audit_seq()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._any = asyncio.Event()
        self._waiting = 0  # an int, not a sum over _waiters: the metrics thread reads it

    def check(self) -> None:
        seq, request_ids = self.store.changes_since(self._seq)
        if seq == self._seq:
            return
        self._seq = seq
        self.store.invalidate()  # another process's commit: drop reads cached before it
        for request_id in set(request_ids):
            for waiter in self._waiters.get(request_id, ()):
                _wake(waiter)
        self._any.set()
        self._any = asyncio.Event()

    @property
    def waiting(self) -> int:
        return self._waiting

    async def wait(self, request_id: str, timeout: float) -> None:
        """Until the request changes or `timeout` passes.

        The waiting task awaits the future itself (no `wait_for` task in between), so a change wakes
        it in the loop's next turn: the writer's `ProxyState.write` yields once for it to answer.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(request_id, set()).add(waiter)
        timer = loop.call_later(timeout, _wake, waiter)
        self._waiting += 1
        try:
            await waiter
        finally:
            self._waiting -= 1
            timer.cancel()
            waiters = self._waiters.get(request_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[request_id]

    async def wait_any(self, timeout: float) -> None:
        """Until any request changes or `timeout` passes (the Telegram bot's sync loop)."""
        try:
            await asyncio.wait_for(self._any.wait(), timeout)
        except TimeoutError:
            pass


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ApprovalChannel(Protocol):
    def announce(self, request: Request) -> None: ...


@dataclass
class Limits:
    """Per-agent budgets for each kind of call, and the calls each agent may hold open at once."""

    create: RateLimiter
    poll: RateLimiter
    retrieve: RateLimiter
    call: RateLimiter
    waits: InFlight  # `?wait=` polls
    calls: InFlight  # brokered calls under way: a slow destination holds one

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(
            RateLimiter(s.rate_per_minute, s.rate_burst),
            RateLimiter(s.poll_rate_per_minute, s.poll_burst),
            RateLimiter(s.retrieve_rate_per_minute, s.retrieve_burst),
            RateLimiter(s.call_rate_per_minute, s.call_burst),
            InFlight(s.max_waits_per_agent),
            InFlight(s.broker_max_calls_per_agent, s.broker_max_concurrent_calls),
        )


@dataclass
class ProxyState:
    settings: Settings
    store: Store
    limits: Limits
    changes: Changes
    refusals: RefusalCounter
    metrics: Metrics
    channels: list[ApprovalChannel] = field(default_factory=list)
    # How brokered calls resolve host names; a test may swap in a fake DNS answer.
    resolver: Callable[[str, int], list[str]] = system_resolver
    # One writer thread: commits fsync, and the event loop must not wait on a disk.
    _writer: GroupCommitWriter | None = None

    @classmethod
    def create(cls, settings: Settings, store: Store) -> ProxyState:
        changes = Changes(store)
        metrics = Metrics()
        metrics.watch_store(store)
        metrics.waiters.set_function(lambda: changes.waiting)
        metrics.telegram_configured.set(1 if settings.telegram_enabled else 0)
        return cls(
            settings,
            store,
            Limits.from_settings(settings),
            changes,
            RefusalCounter(settings.refusal_audit_window_seconds),
            metrics,
        )

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store change on the writer thread; returns once it is durable, waiters woken."""
        if self._writer is None:
            self._writer = GroupCommitWriter(self.store)
        try:
            result = await self._writer.submit(lambda: fn(*args, **kwargs))
        finally:
            self.look_for_changes()
        # One turn of the loop for the agents just woken to answer before the caller goes on:
        # what a Telegram tap does next (its reply to Telegram) takes a while to build.
        await asyncio.sleep(0)
        return result

    def look_for_changes(self) -> None:
        try:
            self.changes.check()
        except Exception:  # a failed look must not fail the write that triggered it; the sweeper looks again
            log.exception("reading the change feed failed")

    async def refused(
        self, agent: Agent, action: str, code: str, request_id: str | None = None, secret: str | None = None
    ) -> None:
        """Audit a refused call: the first of its kind in a window now, the repeats as a count later."""
        actor = f"agent:{agent.name}"
        self.metrics.refused(action, code)
        if self.refusals.note(actor, action, code):
            await self.write(self.store.record, actor, action, request_id, secret, code=code)

    async def audit_repeats(self, closing: bool = False) -> None:
        for r in self.refusals.close_all() if closing else self.refusals.due():
            await self.write(
                self.store.record,
                r.actor,
                r.action,
                None,
                None,
                code=r.code,
                repeated=r.count,
                window_seconds=r.window_seconds,
            )

    def announce(self, request: Request) -> None:
        for channel in self.channels:
            channel.announce(request)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
        self.store.close()
