"""The proxy's venv, rebuilt on the host from the locked wheels, to replace the agent's copy.

The builder is vm_image's (one recipe for both sides); here its errors become
takeover errors with the takeover's advice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vm_image import proxy_venv

from .errors import TakeoverError, from_vm_image


class VenvError(TakeoverError):
    hint = ("check that uv is installed and uv.lock's wheels can be fetched (or are in uv's cache); "
            "or pass --no-reinstall-venv and accept the agent's venv (the report lists it as not blocked)")


def build_proxy_venv(work_dir: Path, progress: Callable[[str], None] = lambda _: None) -> Path:
    with from_vm_image(VenvError):
        return proxy_venv.build_proxy_venv(work_dir, progress)
