"""What can go wrong in a takeover, one type per failure an operator must act on.

Every error carries what went wrong (`str(err)`) and what to do about it
(`err.hint`); the CLI prints both and exits non-zero. What vm_image (the
shared VM layer) raises becomes a takeover error in one place,
`from_vm_image`, with the takeover's advice: its monitor errors become the
ones of the same name here, any other the kind the caller names.

    HintedError(message, hint)   vm_image/errors.py: what every error of vm_image and takeover carries
    └── TakeoverError            the takeover's base; the CLI prints the message and the hint
        ├── NotRoot, InvalidInput, ReadyFileError                  before anything is looked at
        ├── MonitorUnreachable, MonitorNotQMP                      the agent's monitor (host/monitor.py)
        ├── QMPCommandError, QMPTimeout                            QEMU refused or did not answer a command
        ├── NotTheAgentsVM, PrivilegedAgent, UntrustedQemu, DiskMismatch, UnsafeCommandLine,
        │   DiskFormatError, UnsafeProxyAddress                    step 1: not the agent's own, plain VM
        ├── NotEnoughSpace, DestinationTaken                       the host directory
        ├── CheckpointError, CopyError, ScrubError, HostKeyError,
        │   RestartError, VerifyError                              steps 2-6, one each
        ├── RollbackError, JournalError, InjectedFault             the run as a whole
        ├── CarryError, UpgradeError                               `takeover upgrade` (upgrade.py, guest/carry.py)
        ├── SandboxError (agent/sandbox.py), BootFilesError (guest/boot.py)   defined where they are raised
        ├── AgentMachineError (agent/machine.py)
        │   └── AgentMachineTimeout, AgentMachineFlood
        └── VerifyError
            └── SSHTimeout (host/ssh.py)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vm_image import errors as vm_errors
from vm_image.errors import HintedError, VmImageError


class TakeoverError(HintedError):
    hint = "read the message above, fix the cause and rerun `python -m takeover run`"


@contextmanager
def from_vm_image(
    error: type[TakeoverError] = TakeoverError, context: str = "", hint: str | None = None
) -> Iterator[None]:
    """Raise a VmImageError from the block as `error`: the message prefixed with `context`, and the
    takeover's hint (`error`'s own unless `hint` is given): vm_image's advice names vm_image's commands."""
    try:
        yield
    except vm_errors.QMPCommandError as exc:
        raise QMPCommandError(exc.command, exc.error_class, f"{context}{exc}") from None
    except VmImageError as exc:
        raise _SAME_NAMED.get(type(exc), error)(f"{context}{exc}", hint=hint) from None


class NotRoot(TakeoverError):
    hint = "run the takeover as root (it creates root-only files and restarts a VM the agent cannot touch)"


class InvalidInput(TakeoverError):
    hint = "check the command-line option or the file named in the message"


class ReadyFileError(TakeoverError):
    hint = (
        "wait until the agent's `vm_image launch` has written its ready file, or pass "
        "--ready-file PATH (or --monitor and --disk explicitly)"
    )


class MonitorUnreachable(TakeoverError):
    hint = "check that the agent's VM is running and that the ready file names its monitor socket"


class MonitorNotQMP(TakeoverError):
    hint = (
        "the socket named as the VM's monitor does not speak QMP; it may be planted. "
        "Find the real QEMU monitor socket and pass it with --monitor"
    )


class QMPCommandError(TakeoverError):
    def __init__(self, command: str, error_class: str, message: str) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class


class QMPTimeout(TakeoverError):
    pass


class DiskMismatch(TakeoverError):
    hint = (
        "the QEMU behind the monitor does not have the disk the ready file names open; "
        "the ready file or the socket may be planted. Pass the right --monitor and --disk"
    )


class UnsafeCommandLine(TakeoverError):
    hint = (
        "the source QEMU's command line cannot be replayed safely for a rollback; "
        "start the agent's VM with a plain qemu-system-x86_64 command line and retry"
    )


class DiskFormatError(TakeoverError):
    hint = (
        "the host takes over a qcow2 disk, alone or over at most two qcow2 or raw backing files the "
        "agent's own user can read, and with no external data file; ask the agent to rebuild the image "
        "with `vm_image build`"
    )


class NotEnoughSpace(TakeoverError):
    hint = "free space in the host directory's filesystem or choose another --host-dir"


class DestinationTaken(TakeoverError):
    hint = (
        "the host directory already holds a taken-over VM; choose another --host-dir, "
        "or stop that VM and move the directory away first"
    )


class CheckpointError(TakeoverError):
    hint = (
        "the agent's VM is unchanged or still running; check the VM (serial log) and rerun. "
        "If QEMU has quit, rerun `python -m takeover run`: it resumes after the checkpoint"
    )


class CopyError(TakeoverError):
    hint = (
        "the host copy was discarded; make sure nothing writes the agent's disk "
        "(stop the agent's processes) and rerun `python -m takeover run`"
    )


class ScrubError(TakeoverError):
    hint = (
        "the partly scrubbed copy will be discarded and recopied on the next run; rerun "
        "`python -m takeover run`, or `python -m takeover rollback` to bring the agent's VM back"
    )


class HostKeyError(TakeoverError):
    hint = "check that ssh-keygen (openssh-client) is installed, then rerun"


class RestartError(TakeoverError):
    hint = (
        "the new VM did not start; see its serial log in the host directory. Rerun "
        "`python -m takeover run` to retry, or `python -m takeover rollback` to restore the agent's VM"
    )


class VerifyError(TakeoverError):
    hint = (
        "the new VM is not verified, so the agent's disk and checkpoint are kept. Rerun "
        "`python -m takeover run` to retry, or `python -m takeover rollback` to restore the agent's VM"
    )


class RollbackError(TakeoverError):
    hint = (
        "the agent's disk and its `takeover-checkpoint` snapshot are still in place; "
        "fix the cause and rerun `python -m takeover rollback`"
    )


class JournalError(TakeoverError):
    hint = "look at journal.json in the host directory; it records every step done so far"


class InjectedFault(TakeoverError):
    hint = "a test asked for this failure (--fail-after); rerun without it or roll back"


class CarryError(TakeoverError):
    hint = (
        "the old disk's data directory holds what the proxy never writes (too many files, too many bytes, "
        "or no data directory); the upgrade stopped and the old VM serves again. Look at it over "
        "`ssh` (`ls -la /var/lib/secret-proxy`), remove what does not belong, and rerun `python -m takeover upgrade`"
    )


class UpgradeError(TakeoverError):
    hint = (
        "the old VM serves again with its own disk and data; read the message above, fix the cause and rerun "
        "`python -m takeover upgrade` (HOST_DIR/upgrade.json records each attempt)"
    )


class NotTheAgentsVM(TakeoverError):
    hint = (
        "the ready file must name the agent's own VM: its ready file, monitor socket, disk, pidfile and QEMU "
        "process all owned by one unprivileged user, none of them in a host directory. Ask the agent to start "
        "its VM again with `python -m vm_image up` as its own user and pass that user's ready file"
    )


class PrivilegedAgent(TakeoverError):
    hint = (
        "take the agent's user out of those groups (`gpasswd -d USER GROUP` for each), have the agent log in "
        "again and restart its VM (a running process keeps the groups it started with), then rerun"
    )


class UntrustedQemu(TakeoverError):
    hint = (
        "the agent's VM must run the host's own QEMU (the qemu-system-x86 package's binary and root-owned "
        "libraries); ask the agent to start it with `python -m vm_image up`, which uses "
        "/usr/bin/qemu-system-x86_64. If the package was upgraded since, the agent must restart its VM"
    )


class UnsafeProxyAddress(TakeoverError):
    hint = (
        "the host decides where the proxy listens: by default the agent's own loopback address with a port "
        ">= 1024, as the agent's QEMU really forwarded it. To choose another address, pass "
        "--proxy-listen HOST:PORT"
    )


# vm_image's monitor errors and the takeover's of the same name (the takeover's hint, not vm_image's).
_SAME_NAMED: dict[type[VmImageError], type[TakeoverError]] = {
    vm_errors.MonitorUnreachable: MonitorUnreachable,
    vm_errors.MonitorNotQMP: MonitorNotQMP,
    vm_errors.QMPTimeout: QMPTimeout,
}
