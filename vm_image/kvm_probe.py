"""Does KVM really run a guest here? Proved by running one, and remembered for this boot of the host.

Opening /dev/kvm proves little: on a paravirtual KVM (dmesg `kvm-pvm: loaded`, no
vmx/svm in /proc/cpuinfo) QEMU starts, and even a paused QEMU looks healthy, but an
ordinary guest's vCPU spins at 100 % forever and prints nothing (there it runs
real-mode code, then hangs at the switch to protected mode). So the probe boots real
guest code: a 64 KiB firmware of our own that goes from the reset vector through
protected mode to long mode with paging, as a Linux boot does, then writes a marker
(with a fresh nonce) to the serial port and exits QEMU through isa-debug-exit. The
marker within PROBE_SECONDS means guests run; anything else means they do not, and
the caller uses TCG.

The verdict is cached per boot of the host (/proc/sys/kernel/random/boot_id), per uid
and per QEMU binary, in a directory only that uid can write (root: /run/secret-proxy-vm,
0700), because root's verdict decides how root's QEMU and libguestfs run: an agent able
to plant "KVM works" would make the takeover hang. A cache file that is not the uid's
own, or sits in a directory others can write, is ignored.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import stat
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .durable import write_atomic
from .qemu_binary import QEMU, find_qemu
from .shutdown import kill_group

PROBE_SECONDS = 5.0  # a guest that runs prints its marker in well under a second, even under TCG
EXIT_CODE = 0x10  # written to isa-debug-exit; QEMU then exits with (code << 1) | 1
ROOT_CACHE_DIR = Path("/run/secret-proxy-vm")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
CACHE_NAME = "kvm-probe.json"
MARKER_OFFSET, MARKER_SIZE = 0xFE00, 64
# vm_image/kvm_probe_firmware.S, assembled (offsets 0-204 of the image; the rest is zeros).
FIRMWARE_CODE = bytes.fromhex(
    "fafcbaf803b052ee2e660f0116c8000f20c06683c8010f22c066ea21000f00080066b810008ed88ec08ed0b050eebf00"
    "10000031c0b9000c0000f3abc7050010000003200000c7050020000003300000c7050030000083000000b8001000000f"
    "22d80f20e083c8200f22e0b9800000c00f320d000100000f300f20c00d000000800f22c0ea8b000f00180066baf803b0"
    "4ceebe00fe0f00ac84c07403eeebf8b010e6f4f4ebfd66900000000000000000ffff0000009acf00ffff00000092cf00"
    "ffff0000009aaf001f00a8000f"
)


@dataclass(frozen=True)
class Verdict:
    runs: bool
    detail: str  # what was seen, for the user: how far the test guest got, or why QEMU stopped
    seconds: float


@dataclass(frozen=True)
class Probe:
    """Where the probe looks. Tests pass a stand-in QEMU (a wrapper script) and their own cache dir."""

    qemu: str | None = None  # default: qemu-system-x86_64 on PATH
    device: Path = Path("/dev/kvm")
    cache_dir: Path | None = None  # default: cache_dir_for(os.getuid())
    deadline: float = PROBE_SECONDS
    uid: int = field(default_factory=os.getuid)


def kvm_usable(probe: Probe | None = None) -> bool:
    """KVM only when /dev/kvm opens read-write for this user and a guest really runs on it."""
    return kvm_verdict(probe).runs


def kvm_verdict(probe: Probe | None = None) -> Verdict:
    probe = probe or Probe()
    try:
        fd = os.open(probe.device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Verdict(False, f"{probe.device} does not open read-write: {exc.strerror}", 0.0)
    os.close(fd)
    binary = probe.qemu or find_qemu()
    if binary is None:
        return Verdict(False, f"{QEMU} is not installed", 0.0)
    key = cache_key(binary, probe.uid)
    directory = probe.cache_dir or cache_dir_for(probe.uid)
    cached = read_cached(directory, key, probe.uid)
    if cached is not None:
        return cached
    verdict = guest_runs("kvm", binary, probe.deadline)
    write_cached(directory, key, verdict, probe.uid)
    return verdict


def guest_runs(accel: str, binary: str, deadline: float = PROBE_SECONDS) -> Verdict:
    """Boot the probe firmware under `accel` ("kvm" or "tcg"); True only if its marker came out in time."""
    marker = f"spvm-guest-runs-{secrets.token_hex(4)}"
    cpu = "host" if accel == "kvm" else "max"
    with tempfile.TemporaryDirectory(prefix="spvm-kvm-probe-") as tmp:
        firmware, serial, log = Path(tmp) / "probe.bin", Path(tmp) / "serial.out", Path(tmp) / "qemu.log"
        firmware.write_bytes(probe_firmware(marker))
        argv = [
            binary,
            "-machine",
            "q35",
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-m",
            "32",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-bios",
            str(firmware),
            "-serial",
            f"file:{serial}",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        started = time.monotonic()
        # A new session, so a stand-in that forks (or QEMU's helpers) is killed with its group.
        with open(log, "wb") as out:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        try:
            code = child.wait(deadline)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_group(child)
        seconds = time.monotonic() - started
        try:
            seen = serial.read_bytes()[:4096].decode("ascii", "replace")
        except OSError:
            seen = ""
        said = log.read_bytes()[-300:].decode(errors="replace").strip().splitlines()
    if marker in seen and code == (EXIT_CODE << 1) | 1:
        return Verdict(
            True,
            f"a test guest ran under {accel} (real, protected and long mode) and answered after {seconds:.1f} s",
            seconds,
        )
    if code is None:
        return Verdict(
            False, f"a test guest under {accel} did not finish within {deadline:.0f} s: {_stages(seen)}", seconds
        )
    why = f" (QEMU said: {said[-1]})" if said else ""
    return Verdict(
        False,
        f"QEMU with -accel {accel} exited with status {code} before the test guest answered: {_stages(seen)}{why}",
        seconds,
    )


def probe_firmware(marker: str) -> bytes:
    """A 64 KiB x86 firmware image that prints "RPL" and `marker` on COM1, then exits QEMU.

    The code is vm_image/kvm_probe_firmware.S, assembled: from the reset vector it
    prints R (real mode), enters 32-bit protected mode and prints P, turns on paging
    and long mode and prints L, then the marker. Booting Linux crosses the same
    steps; the paravirtual KVM that motivated this runs real mode and hangs at the
    switch to protected mode, exactly where Linux's boot hangs on it.
    """
    text = (marker + "\n").encode("ascii") + b"\0"
    if len(text) > MARKER_SIZE:
        raise ValueError(f"probe marker longer than {MARKER_SIZE - 2} characters")
    image = bytearray(0x10000)
    image[: len(FIRMWARE_CODE)] = FIRMWARE_CODE
    image[MARKER_OFFSET : MARKER_OFFSET + len(text)] = text
    image[0xFFF0:0xFFF3] = b"\xe9\x0d\x00"  # reset vector F000:FFF0: jmp rel16 to offset 0 (IP wraps)
    return bytes(image)


def _stages(seen: str) -> str:
    reached = {"R": "real mode", "P": "protected mode", "L": "long mode"}
    names = [reached[c] for c in seen[:3] if c in reached]
    if not names:
        return "the guest ran no instruction we could see"
    missing = [name for name in reached.values() if name not in names]
    return f"the guest ran in {', '.join(names)}" + (f" but never reached {missing[0]}" if missing else "")


# -- the per-boot cache ------------------------------------------------------------------------


def cache_dir_for(uid: int) -> Path:
    """root: a root-only directory under /run (gone at reboot). Others: their own cache directory."""
    if uid == 0:
        return ROOT_CACHE_DIR
    return Path(pwd.getpwuid(uid).pw_dir) / ".cache" / "secret-proxy-vm-kvm-probe"


def cache_key(binary: str, uid: int) -> dict[str, object]:
    try:
        boot_id = BOOT_ID.read_text().strip()
    except OSError:
        boot_id = "unknown"
    try:
        st = os.stat(binary)
        qemu = [os.path.realpath(binary), st.st_ino, st.st_mtime_ns]  # an upgraded QEMU is probed again
    except OSError:
        qemu = [binary]
    return {"boot_id": boot_id, "uid": uid, "qemu": qemu}


def read_cached(directory: Path, key: dict[str, object], uid: int) -> Verdict | None:
    """The cached verdict for `key`, or None: missing, another boot, or not provably written by `uid`."""
    dir_fd = _open_own_dir(directory, uid, create=False)
    if dir_fd is None:
        return None
    try:
        fd = os.open(CACHE_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022 or st.st_size > 4096:
            return None
        record = json.loads(os.read(fd, 4096))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    try:
        verdict = Verdict(**record["verdict"])
    except (KeyError, TypeError):
        return None
    return Verdict(bool(verdict.runs), f"{verdict.detail} (probed earlier this boot)", float(verdict.seconds))


def write_cached(directory: Path, key: dict[str, object], verdict: Verdict, uid: int) -> bool:
    """Store the verdict atomically; False (and nothing written) when the directory is not safely ours."""
    dir_fd = _open_own_dir(directory, uid, create=True)
    if dir_fd is None:
        return False
    try:
        # In the directory just checked (its descriptor), not looked up again by name.
        write_atomic(CACHE_NAME, json.dumps({"key": key, "verdict": asdict(verdict)}).encode(), dir_fd=dir_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(dir_fd)


def _open_own_dir(directory: Path, uid: int, create: bool) -> int | None:
    """A descriptor of `directory` if it is a real directory owned by `uid` that nobody else can write."""
    if create:
        try:
            os.makedirs(directory.parent, mode=0o700, exist_ok=True)
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != uid or st.st_mode & 0o077:
        os.close(fd)
        return None
    return fd
