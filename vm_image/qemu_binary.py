"""The QEMU binary every VM of ours runs, the agent's and the host's: named here once."""

from __future__ import annotations

import shutil

QEMU = "qemu-system-x86_64"


def find_qemu() -> str | None:
    """The QEMU binary on PATH, or None when it is not installed."""
    return shutil.which(QEMU)
