"""Group commit: one writer thread runs queued changes under one durable COMMIT.

Every acknowledged change must survive `kill -9` and power loss, so each commit
waits for an fsync. Batching the changes that queued up during one fsync into the
next transaction keeps that guarantee (no caller hears back before the COMMIT
that holds its change) while paying one fsync per batch instead of per change.
Each change runs as a savepoint (`Store.transaction` nests), so one failing
change rolls back alone.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .store import Store

MAX_BATCH = 128

T = TypeVar("T")


@dataclass
class _Job:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None


@dataclass
class GroupCommitWriter:
    store: Store
    _queue: queue.SimpleQueue[_Job | None] = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    async def submit(self, fn: Callable[[], T]) -> T:
        if self._thread is None:
            self.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, loop, future))
        return await future

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                jobs.append(nxt)
            self._run_batch(jobs)

    def _run_batch(self, jobs: list[_Job]) -> None:
        try:
            with self.store.transaction():
                for job in jobs:
                    try:
                        job.result = job.fn()
                    except Exception as exc:  # this job's savepoint rolled back; the others go on
                        job.error = exc
        except BaseException as exc:  # the COMMIT failed: nothing in the batch is durable
            for job in jobs:
                job.error, job.result = exc, None
        for job in jobs:
            job.loop.call_soon_threadsafe(_settle, job)


def _settle(job: _Job) -> None:
    if job.future.cancelled():
        return
    if job.error is not None:
        job.future.set_exception(job.error)
    else:
        job.future.set_result(job.result)
