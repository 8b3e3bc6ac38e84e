"""The KVM probe: a guest must really run before KVM is used, and the verdict is kept for this boot only.

The bad case is a KVM whose /dev/kvm opens but whose vCPU runs no ordinary guest (a
paravirtual KVM, dmesg `kvm-pvm: loaded`): QEMU starts, prints nothing and never
exits. A stand-in QEMU plays it (a script that starts and sleeps); the good case is
real QEMU running the probe's guest under TCG. Each probe boots a 64 KiB firmware for
a fraction of a second, so these are fast tests.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vm_image import kvm_probe
from vm_image.errors import BadInput
from vm_image.kvm_probe import Probe, guest_runs, kvm_verdict
from vm_image.qemu_command import choose_accel

ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
DEADLINE = 2.0


def stand_in(path: Path, body: str) -> Path:
    """An executable script in place of qemu-system-x86_64; each start appends its pid to `path`.starts."""
    path.write_text(f"#!/bin/sh\necho $$ >> {path}.starts\n{body}\n")
    path.chmod(0o755)
    return path


def starts(path: Path) -> list[int]:
    try:
        return [int(line) for line in Path(f"{path}.starts").read_text().split()]
    except FileNotFoundError:
        return []


def hanging_kvm(tmp_path: Path) -> Path:
    """Like QEMU on a paravirtual KVM: it starts, prints nothing and never exits."""
    return stand_in(tmp_path / "hanging-kvm", "exec sleep 600")


def probe_with(qemu: Path, cache_dir: Path) -> Probe:
    # /dev/null stands for a /dev/kvm that opens: what is being tested is what happens after it opens.
    return Probe(qemu=str(qemu), device=Path("/dev/null"), cache_dir=cache_dir, deadline=DEADLINE)


def test_the_firmware_bytes_are_the_assembled_source(tmp_path):
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("binutils (as, ld) not installed")
    obj, binary = tmp_path / "probe.o", tmp_path / "probe.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(ROOT / "vm_image/kvm_probe_firmware.S")], check=True)
    subprocess.run(
        ["ld", "-e", "0xf0000", "-Ttext=0xf0000", "--oformat", "binary", "-o", str(binary), str(obj)], check=True
    )
    image = kvm_probe.probe_firmware("m")
    marker = slice(kvm_probe.MARKER_OFFSET, kvm_probe.MARKER_OFFSET + kvm_probe.MARKER_SIZE)
    built = bytearray(binary.read_bytes())
    built[marker] = image[marker]
    assert bytes(built) == image


@needs_qemu
def test_a_guest_that_really_runs_is_seen_in_real_qemu_under_tcg():
    verdict = guest_runs("tcg", QEMU, DEADLINE)
    assert verdict.runs, verdict.detail
    assert verdict.seconds < DEADLINE
    assert "real, protected and long mode" in verdict.detail


def test_a_kvm_that_opens_but_runs_nothing_means_tcg_within_the_deadline(tmp_path):
    qemu = hanging_kvm(tmp_path)
    started = time.monotonic()
    assert choose_accel("auto", probe_with(qemu, tmp_path / "cache")) == "tcg"
    assert time.monotonic() - started < DEADLINE + 2
    [pid] = starts(qemu)
    assert not Path(f"/proc/{pid}").exists(), "the hanging stand-in was left running"
    with pytest.raises(BadInput, match=f"did not finish within {DEADLINE:.0f} s") as err:
        choose_accel("kvm", probe_with(qemu, tmp_path / "cache"))
    assert "--accel tcg" in err.value.hint


def test_the_verdict_is_kept_for_this_boot_and_not_probed_again(tmp_path):
    qemu, cache = hanging_kvm(tmp_path), tmp_path / "cache"
    first = kvm_verdict(probe_with(qemu, cache))
    started = time.monotonic()
    again = kvm_verdict(probe_with(qemu, cache))
    assert time.monotonic() - started < 0.5 and len(starts(qemu)) == 1
    assert not first.runs and not again.runs and "probed earlier this boot" in again.detail
    record = json.loads((cache / kvm_probe.CACHE_NAME).read_text())
    assert record["key"]["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert record["key"]["uid"] == os.getuid() and record["verdict"]["runs"] is False
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE((cache / kvm_probe.CACHE_NAME).stat().st_mode) == 0o600


def test_a_verdict_from_another_boot_is_not_used(tmp_path):
    qemu, cache = hanging_kvm(tmp_path), tmp_path / "cache"
    kvm_verdict(probe_with(qemu, cache))
    path = cache / kvm_probe.CACHE_NAME
    record = json.loads(path.read_text())
    record["key"]["boot_id"] = "00000000-0000-0000-0000-000000000000"
    record["verdict"]["runs"] = True
    path.write_text(json.dumps(record))
    assert choose_accel("auto", probe_with(qemu, cache)) == "tcg"
    assert len(starts(qemu)) == 2


@needs_qemu
def test_a_kvm_that_runs_guests_is_chosen_and_kept(tmp_path):
    # Real QEMU with the accelerator swapped for TCG: the whole path (probe, cache, choice) with a guest that runs.
    qemu = stand_in(
        tmp_path / "kvm-that-works",
        f'for a; do shift; case "$a" in kvm) a=tcg;; host) a=max;; esac; set -- "$@" "$a"; done\nexec {QEMU} "$@"',
    )
    assert choose_accel("auto", probe_with(qemu, tmp_path / "cache")) == "kvm"
    assert choose_accel("kvm", probe_with(qemu, tmp_path / "cache")) == "kvm"
    assert len(starts(qemu)) == 1


def test_a_qemu_that_refuses_kvm_at_once_means_tcg(tmp_path):
    qemu = stand_in(tmp_path / "refusing-kvm", "echo 'failed to initialize kvm: Permission denied' >&2; exit 1")
    verdict = kvm_verdict(probe_with(qemu, tmp_path / "cache"))
    assert not verdict.runs and "exited with status 1" in verdict.detail
    assert "QEMU said: failed to initialize kvm" in verdict.detail
    assert verdict.seconds < 1


def test_no_dev_kvm_means_tcg_without_starting_qemu(tmp_path):
    qemu = hanging_kvm(tmp_path)
    probe = Probe(qemu=str(qemu), device=tmp_path / "no-kvm", cache_dir=tmp_path / "cache")
    assert choose_accel("auto", probe) == "tcg" and starts(qemu) == []


def test_roots_verdict_lives_in_a_root_only_directory_under_run():
    assert kvm_probe.cache_dir_for(0) == Path("/run/secret-proxy-vm")
    run = os.stat("/run")
    assert run.st_uid == 0 and not run.st_mode & 0o022  # nobody else can create that directory first


@pytest.mark.root
def test_an_agent_cannot_plant_roots_kvm_verdict(tmp_path):
    """Attack: the agent writes "KVM runs guests" where root's probe would read it, so root's QEMU and
    libguestfs would pick a KVM that hangs. Root's cache is its own 0700 directory; a record in a
    directory or file the agent owns is ignored and root probes for itself."""
    if os.geteuid() != 0:
        pytest.skip("needs root (plays the agent with the `nobody` user)")
    agent = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(prefix="spvm-kvm-probe-attack-", dir="/tmp"))
    try:
        shared.chmod(0o755)  # the agent can reach what is inside, as under /run
        qemu = hanging_kvm(shared)
        roots = shared / "root-cache"
        assert choose_accel("auto", probe_with(qemu, roots)) == "tcg"
        key = kvm_probe.cache_key(str(qemu), 0)
        lie = json.dumps({"key": key, "verdict": {"runs": True, "detail": "planted", "seconds": 0.1}})
        plant = (
            "import os, sys\n"
            "d, text = sys.argv[1], sys.argv[2]\n"
            "os.makedirs(d, mode=0o700, exist_ok=True)\n"
            "open(os.path.join(d, 'kvm-probe.json'), 'w').write(text)\n"
        )

        def as_agent(directory: Path) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["runuser", "-u", agent.pw_name, "--", sys.executable, "-I", "-c", plant, str(directory), lie],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )

        into_roots = as_agent(roots)
        assert into_roots.returncode != 0 and "Permission denied" in into_roots.stderr
        agents = shared / "agent-cache"  # a directory of the agent's own, such as its home
        agents.mkdir(mode=0o700)
        os.chown(agents, agent.pw_uid, agent.pw_gid)
        assert as_agent(agents).returncode == 0 and agents.stat().st_uid == agent.pw_uid
        assert choose_accel("auto", probe_with(qemu, agents)) == "tcg"  # the planted record is not believed
        assert len(starts(qemu)) == 2 and "planted" in (agents / kvm_probe.CACHE_NAME).read_text()
        # Even inside root's own directory, a file that is not root's is not believed.
        os.chown(roots / kvm_probe.CACHE_NAME, agent.pw_uid, agent.pw_gid)
        (roots / kvm_probe.CACHE_NAME).write_text(lie)
        assert choose_accel("auto", probe_with(qemu, roots)) == "tcg" and len(starts(qemu)) == 3
    finally:
        shutil.rmtree(shared)


@needs_qemu
def test_this_machines_kvm_is_judged_within_the_deadline(tmp_path):
    """What the real probe says about this host's /dev/kvm (printed; CI hosts differ), within its deadline."""
    probe = Probe(cache_dir=tmp_path / "cache")
    started = time.monotonic()
    verdict = kvm_verdict(probe)
    assert time.monotonic() - started < kvm_probe.PROBE_SECONDS + 3
    print(f"\nKVM probe on this host: {'runs guests' if verdict.runs else 'no'}: {verdict.detail}", file=sys.stderr)
