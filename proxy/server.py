"""Run the proxy under uvicorn, with uvloop and httptools when installed."""

from __future__ import annotations

import importlib.util
import logging

import uvicorn

from .app import create_app
from .config import Settings

log = logging.getLogger("proxy")


def serve(settings: Settings, host: str, port: int) -> None:
    app = create_app(settings)
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    log.info("serving on http://%s:%d (loop=%s, http=%s, data=%s)", host, port, loop, http, settings.data_dir)
    # Access logs stay off: request ids are bearer-like and logs leave the VM.
    uvicorn.run(app, host=host, port=port, loop=loop, http=http, access_log=False,
                log_level="info", timeout_graceful_shutdown=5)
