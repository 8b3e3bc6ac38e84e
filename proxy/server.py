"""Run the proxy under uvicorn, with uvloop and httptools when installed."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import resource

import uvicorn

from . import wake
from .app import create_app
from .config import Settings

log = logging.getLogger("proxy")

# Files the proxy needs besides its connections: the database, its WAL and shared memory, the
# inotify watch, the Telegram client's sockets, the interpreter's own.
RESERVED_FDS = 64


def connection_limit(settings: Settings) -> int:
    """Raise the soft open-files limit to the hard one, and keep uvicorn's connection limit below it,
    so a flood of connections gets 503 answers instead of making accept() fail for everyone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, settings.max_connections + RESERVED_FDS)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    limit = min(settings.max_connections, soft - RESERVED_FDS)
    if limit < settings.max_connections:
        log.warning(
            "open-files limit %d allows only %d connections (max_connections is %d); raise LimitNOFILE",
            soft,
            limit,
            settings.max_connections,
        )
    return max(limit, 16)


def _silent_connections_close(protocol: type) -> type:
    """uvicorn closes a connection idle after a response, but not one that never sends a request,
    which would hold a slot of the connection limit for as long as its client likes. Start the same
    keep-alive timer (5 s) when the connection is made; the first byte received cancels it."""

    class Protocol(protocol):  # type: ignore[misc]  # a base chosen at run time: uvicorn's h11 or httptools protocol
        def connection_made(self, transport: object) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    return Protocol


def serve(settings: Settings, host: str, port: int) -> None:
    # SIGUSR1 asks the Telegram bot to retry now (proxy/wake.py); the lifespan handles it when there is a
    # bot. Ignored until then, and without a bot: its default action would end the server.
    wake.ignore_retry()
    app = create_app(settings)
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    base: type[asyncio.Protocol]
    if importlib.util.find_spec("httptools"):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    http = _silent_connections_close(base)
    limit = connection_limit(settings)
    log.info(
        "serving on http://%s:%d (loop=%s, http=%s, connections<=%d, data=%s)",
        host,
        port,
        loop,
        base.__name__,
        limit,
        settings.data_dir,
    )
    # Access logs stay off: request ids are bearer-like and logs leave the VM.
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop=loop,
        http=http,
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=5,
        limit_concurrency=limit,
    )
