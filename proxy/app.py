"""Assembles the proxy's ASGI app: routes, error handlers, limits, background work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors, wake
from .config import Settings, check_metrics_listen
from .metrics import CountRequests, MetricsListener
from .routes import routes
from .state import ProxyState
from .store import Store
from .watch import DirectoryWatch

log = logging.getLogger("proxy")


class BodyLimit:
    """Refuse bodies over the limit with 413 before reading them into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int, call_max_bytes: int = 0) -> None:
        self.app = app
        self.plain_max_bytes = max_bytes
        self.call_max_bytes = max(max_bytes, call_max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            # GET handlers never read a body, and polls are the hot path.
            await self.app(scope, receive, send)
            return
        # Brokered calls carry the call's body in base64; every other route keeps the small limit.
        path = scope["path"]
        limit = self.call_max_bytes if path == "/v1/calls" or path.endswith("/call") else self.plain_max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(scope, receive, send, limit)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise errors.ApiError("too_large", f"the body is over {limit} bytes")
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        scope[errors.OUTCOME_KEY] = "too_large"
        response = errors.error_response("too_large", f"the body is over {limit} bytes")
        await response(scope, receive, send)


async def sweep(state: ProxyState, every: float = 1.0) -> None:
    """Every second: expire undecided requests on time, even when nobody asks about them; audit the
    counted repeats of refusals whose window closed; look at the change feed in case a wake-up was lost."""
    while True:
        try:
            await state.write(state.store.expire_due)
            await state.audit_repeats()
        except Exception:  # a failing sweep must not end the sweeper
            log.exception("sweep failed; retrying")
        state.look_for_changes()
        await asyncio.sleep(every)


async def poll_changes(state: ProxyState, every: float = 0.05) -> None:
    """Where inotify is unavailable: look at the change feed often instead."""
    while True:
        state.look_for_changes()
        await asyncio.sleep(every)


def create_app(settings: Settings, store: Store | None = None, *, background: bool = True) -> Starlette:
    store = store or Store(settings)
    state = ProxyState.create(settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(sweep(state))] if background else []
        watch = DirectoryWatch(settings.data_dir, state.look_for_changes)
        if not watch.start():
            tasks.append(asyncio.create_task(poll_changes(state)))
        listener = start_metrics(state) if background else None
        bot = None
        unhandle: Callable[[], None] | None = None
        if background and settings.telegram_enabled:
            from .telegram_bot import TelegramChannel

            bot = TelegramChannel(state)
            state.channels.append(bot)
            await bot.start()
            unhandle = _handle_retry(bot.retry_now)
        elif background:
            log.warning("Telegram is not configured: approve and deny with `python -m proxy approve|deny ID`")
        try:
            yield
        finally:
            if unhandle is not None:
                unhandle()
            if bot is not None:
                await bot.stop()
            for task in tasks:
                task.cancel()
            watch.stop()
            if listener is not None:
                listener.stop()
            try:
                await state.audit_repeats(closing=True)
            except Exception:
                log.exception("could not audit the counted refusals at shutdown")
            state.close()

    app = Starlette(
        routes=routes(),
        exception_handlers={
            errors.ProxyError: errors.on_proxy_error,
            HTTPException: errors.on_http_exception,
            Exception: errors.on_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.proxy = state
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        call_max_bytes=settings.broker_max_request_bytes * 4 // 3 + settings.max_body_bytes,
    )
    # Outermost: a body refused by BodyLimit is counted too.
    app.add_middleware(CountRequests, metrics=state.metrics)
    return app


def _handle_retry(retry: Callable[[], None]) -> Callable[[], None]:
    """SIGUSR1 wakes the bot (`secret-proxy telegram retry-now`); returns the undo. Only the main
    thread can handle a signal: `proxy serve` is, an in-process test client's lifespan is not."""
    try:
        return wake.handle_retry(asyncio.get_running_loop(), retry)
    except (ValueError, RuntimeError) as exc:
        log.warning("SIGUSR1 cannot wake the Telegram bot here (%s); `telegram retry-now` will not reach it", exc)
        return lambda: None


def start_metrics(state: ProxyState) -> MetricsListener | None:
    """The metrics listener on `metrics_listen` (a loopback address), if set. A port it cannot bind is
    logged and the API serves on: secrets must not wait for a dashboard."""
    if not state.settings.metrics_listen:
        return None
    host, port = check_metrics_listen(state.settings.metrics_listen)
    try:
        listener = MetricsListener.start(state.metrics, host, port)
    except OSError as exc:
        log.error("metrics: cannot listen on %s (%s); serving without metrics", state.settings.metrics_listen, exc)
        return None
    log.info("metrics on http://%s/metrics (loopback only)", state.settings.metrics_listen)
    return listener
