"""What can go wrong building or launching the agent's VM: each error says what and what to do."""

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


class LaunchFailed(VmImageError):
    hint = "the last lines of the guest's serial log are above; `python -m vm_image stop` cleans up"
