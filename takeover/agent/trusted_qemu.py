"""Step 1: the process behind the agent's monitor must run the host's own QEMU, with the host's own libraries.

A name proves nothing: the agent can copy python to ~/qemu-system-x86_64 and
have it serve a fake QMP socket that tells root whatever it likes (a disk
"open", a status, forwarded ports). So the kernel decides: /proc/PID/exe must
be the very inode of a `qemu-system-*` binary installed in /usr/bin or
/usr/local/bin (root-owned, in root-owned directories no one else can write),
and every file mapped executable into the process (the loader, each library,
each QEMU module) must be root-owned and not writable by others, so no
LD_PRELOAD of the agent's runs inside it.

What this cannot prove: the process is still the agent's, and the agent may
ptrace its own QEMU (this kernel has no Yama) and change what it answers. So
step 1 believes QEMU's answers only where the kernel confirms them: the
socket's peer, the disk inode held open, the address it listens on. The rest
(its status, the commands it offers) only decides how to checkpoint, never what
root touches.
"""

from __future__ import annotations

import os
from pathlib import Path

from vm_image import proc

from ..errors import UntrustedQemu
from ..host.files import only_root_can_change, only_root_can_write

TRUSTED_DIRS = (Path("/usr/bin"), Path("/usr/local/bin"))


def host_qemu_binaries() -> dict[tuple[int, int], Path]:
    """(st_dev, st_ino) of every qemu-system-* the host installed where only root can change it."""
    found = {}
    for directory in TRUSTED_DIRS:
        for path in sorted(directory.glob("qemu-system-*")):
            real = Path(os.path.realpath(path))
            try:
                st = os.stat(real)
            except OSError:
                continue
            if only_root_can_change(real):
                found[(st.st_dev, st.st_ino)] = real
    return found


def check_host_qemu(pid: int) -> Path:
    """The host binary the process runs; refuses a process that is not the host's QEMU."""
    try:
        return _check_host_qemu(pid)
    except OSError as exc:  # it exited, or /proc would not tell: either way nothing is proven
        raise UntrustedQemu(f"cannot inspect QEMU pid {pid} in /proc ({exc.strerror or exc})") from None


def _check_host_qemu(pid: int) -> Path:
    exe = os.stat(f"/proc/{pid}/exe")  # the inode the process was started from, even if renamed or deleted
    trusted = host_qemu_binaries()
    binary = trusted.get((exe.st_dev, exe.st_ino))
    if binary is None:
        shown = os.readlink(f"/proc/{pid}/exe")
        installed = ", ".join(str(p) for p in trusted.values()) or "none found in /usr/bin or /usr/local/bin"
        raise UntrustedQemu(
            f"the process behind the monitor (pid {pid}) runs {shown!r}, which is not the "
            f"host's installed QEMU ({installed}); nothing it says is believed"
        )
    for path, st in proc.executable_files(pid):
        if not only_root_can_write(st):
            owner = f"owned by uid {st.st_uid}" if st.st_uid != 0 else "writable by others"
            raise UntrustedQemu(
                f"QEMU pid {pid} runs code from {path!r} ({owner}), not only the host's own "
                f"libraries (LD_PRELOAD or a changed library path); nothing it says is believed"
            )
    return binary
