"""A short synchronous QMP exchange with our QEMU (qemu.qmp's legacy client does the protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from .errors import VmImageError


def execute(monitor: Path, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
    """Run one QMP command and return its result; errors say which socket and command failed."""
    qmp = QEMUMonitorProtocol(str(monitor))
    try:
        qmp.connect()
        qmp.settimeout(timeout)
        return qmp.cmd(command, **arguments)
    except (QMPError, OSError, EOFError) as exc:
        raise VmImageError(f"QMP {command!r} on {monitor} failed: {exc or type(exc).__name__}",
                           hint="is the VM running? `python -m vm_image status` tells") from None
    finally:
        qmp.close()
