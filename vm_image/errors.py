"""What can go wrong building, launching or talking to the agent's VM: each error says what and what to do.

One base, every error of vm_image defined here:

    HintedError(message, hint)   what every error carries, vm_image's and takeover's (takeover/errors.py)
    └── VmImageError             vm_image's base; the CLI prints the message and the hint
        ├── MissingTool          a program or package the build needs is not installed
        ├── BadInput             a command-line option or a file is wrong
        ├── BuildFailed          a build command failed
        │   └── VenvError        the proxy's venv could not be built from uv.lock (proxy_venv.py)
        ├── LaunchFailed         QEMU did not start the VM
        ├── MonitorUnreachable   no QMP socket where the VM's monitor should be (qmp.py)
        ├── MonitorNotQMP        the socket does not speak QMP
        ├── QMPCommandError      QEMU refused a command; `command` and `error_class` say which and why
        ├── QMPTimeout           QEMU did not answer a command in time
        ├── HealthTimeout        the proxy's /health did not answer in time (health.py)
        └── ProcessGone          QEMU exited before /health answered

The takeover has its own tree under the same `HintedError`; `takeover.errors.from_vm_image`
turns these into its own, with the takeover's advice, in one place.
"""

from __future__ import annotations


class HintedError(Exception):
    """What went wrong (`str(err)`) and what to do about it (`err.hint`); the base of vm_image's and takeover's."""

    hint = "read the message above, fix the cause and run the command again"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class VmImageError(HintedError):
    hint = "read the message above, fix the cause and run the command again"


class MissingTool(VmImageError):
    hint = "run the README's setup (`make setup`, as root) or apt-get install the package named above"


class BadInput(VmImageError):
    hint = "check the command-line option or the file named in the message"


class BuildFailed(VmImageError):
    hint = "the command's last output is above; `apt-get update` (as root) fixes most package download errors"


class VenvError(BuildFailed):
    hint = "check that uv.lock's wheels can be fetched from PyPI (or are in uv's cache)"


class LaunchFailed(VmImageError):
    hint = "the last lines of the guest's serial log are above; `python -m vm_image stop` cleans up"


# The monitor (qmp.py).
IS_IT_RUNNING = "is the VM running? `python -m vm_image status` tells"


class MonitorUnreachable(VmImageError):
    hint = IS_IT_RUNNING


class MonitorNotQMP(VmImageError):
    hint = "the socket named as the VM's monitor does not speak QMP; check that it is QEMU's"


class QMPCommandError(VmImageError):
    def __init__(self, command: str, error_class: str, message: str) -> None:
        super().__init__(f"QEMU refused {command!r}: {error_class}: {message}")
        self.command = command
        self.error_class = error_class


class QMPTimeout(VmImageError):
    hint = IS_IT_RUNNING


# Waiting for the proxy's /health (health.py).
class HealthTimeout(VmImageError):
    hint = "the guest's serial log says how far its boot got"


class ProcessGone(VmImageError):
    hint = "the VM's QEMU exited; its log and the guest's serial log say why"
