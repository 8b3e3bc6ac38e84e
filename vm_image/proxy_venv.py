"""The proxy's venv for the guest, built from the wheels locked in uv.lock (hashes required).

`vm_image build` installs it in the agent's image; `takeover` builds it again on
the host and replaces the agent's copy, because the venv is the code that holds
the master key and the agent could have changed any file in it (or added a .pth
that runs at every start). It is built for the guest's Python (Debian 12's
python3.11, the same as the build side's /usr/bin/python3.11), owned by root in
the guest, so the proxy user cannot change its own code either.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import MissingTool, VenvError
from .guest_files import VENV

ROOT = Path(__file__).resolve().parent.parent
GUEST_VENV = VENV
GUEST_PYTHON = "/usr/bin/python3.11"


def find_uv() -> str | None:
    """uv from our own environment first (the setup installs it there), so any user can run the build."""
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("uv")


def export_argv(uv: str, requirements: Path) -> list[str]:
    """uv writing the guest's requirements from uv.lock: the locked versions and hashes, no dev group, no extras."""
    return [
        uv,
        "export",
        "--frozen",
        "--no-dev",
        "--no-emit-project",
        "--format",
        "requirements-txt",
        "--no-header",
        "--project",
        str(ROOT),
        "-o",
        str(requirements),
    ]


def build_proxy_venv(work_dir: Path, progress: Callable[[str], None] = lambda _: None) -> Path:
    """A tarball of the venv's contents (paths relative to /opt/secret-proxy/venv); cached by input hash."""
    work_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(work_dir, 0o700)
    digest = _inputs_digest()
    tarball = work_dir / f"venv-{digest[:16]}.tar"
    if tarball.is_file() and requirements_file(tarball).is_file():
        return tarball
    uv = find_uv()
    if uv is None:
        raise MissingTool("uv is not installed", hint="run `make setup`, which installs uv into .venv")
    if not Path(GUEST_PYTHON).exists():
        raise MissingTool(
            f"{GUEST_PYTHON} is not installed; the venv must be built for the guest's Python",
            hint="apt-get install python3 (Debian 12's python3 is 3.11)",
        )
    progress("building the proxy's venv from the wheels locked in uv.lock")
    with tempfile.TemporaryDirectory(prefix=".venv-build-", dir=work_dir) as tmp:
        stage = Path(tmp) / "stage"
        venv = stage / GUEST_VENV.lstrip("/")
        requirements = Path(tmp) / "requirements.txt"
        _run(export_argv(uv, requirements))
        _run([uv, "venv", "--quiet", "--relocatable", "--python", GUEST_PYTHON, str(venv)])
        _run(
            [
                uv,
                "pip",
                "install",
                "--quiet",
                "--python",
                str(venv / "bin/python"),
                "--require-hashes",
                "--no-deps",
                "--link-mode",
                "copy",
                "--no-compile",
                "-r",
                str(requirements),
            ]
        )
        site = venv / "lib/python3.11/site-packages"
        shutil.copytree(ROOT / "proxy", site / "proxy", ignore=_not_for_the_guest)
        # Byte-compile here, with the guest's paths in the code objects: the venv is read-only for
        # the proxy user, so the guest could never write its own caches (slow starts under TCG).
        _run([GUEST_PYTHON, "-m", "compileall", "-q", "-j", "0", "-s", str(stage), "-p", "/", str(venv / "lib")])
        for activate in venv.glob("bin/activate*"):
            activate.unlink()  # they name the staging path; nobody activates a service's venv
        partial = work_dir / f".{tarball.name}.partial"
        with tarfile.open(partial, "w") as tar:
            tar.add(venv, arcname=".", filter=_root_owned)
        os.chmod(partial, 0o600)
        shutil.copyfile(requirements, requirements_file(tarball))
        os.replace(partial, tarball)
    for stale in work_dir.glob("venv-*"):  # builds for inputs that changed: 50 MB each
        if stale not in (tarball, requirements_file(tarball)):
            stale.unlink()
    return tarball


def requirements_file(tarball: Path) -> Path:
    """The hash-pinned requirements the venv in `tarball` was installed from."""
    return tarball.with_suffix(".requirements.txt")


def locked_wheels(tarball: Path) -> dict[str, dict[str, object]]:
    """{name: {"version", "sha256": [...]}} from the requirements beside the tarball, for the manifest."""
    wheels: dict[str, dict[str, object]] = {}
    current: dict[str, object] | None = None
    hashes: list[str] = []
    for raw in requirements_file(tarball).read_text().splitlines():
        line = raw.strip().rstrip("\\").strip()
        if line.startswith("--hash=sha256:") and current is not None:
            hashes.append(line.removeprefix("--hash=sha256:"))
        elif "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            hashes = []
            current = wheels[name.strip()] = {"version": version.split(";")[0].strip(), "sha256": hashes}
    return wheels


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode &= 0o755  # no group/other write, no setuid
    return info


def _not_for_the_guest(directory: str, names: list[str]) -> set[str]:
    # proxy/agent is the agent's own tool: it runs outside the VM and has no business in the guest.
    skip = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
    if Path(directory) == ROOT / "proxy":
        skip.add("agent")
    return skip


def _guest_sources() -> list[Path]:
    return sorted(p for p in (ROOT / "proxy").rglob("*.py") if (ROOT / "proxy/agent") not in p.parents)


def _inputs_digest() -> str:
    h = hashlib.sha256()
    for path in [ROOT / "uv.lock", ROOT / "pyproject.toml", *_guest_sources()]:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(sys.version.encode())
    return h.hexdigest()


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if proc.returncode != 0:
        raise VenvError(f"{' '.join(argv[:3])} failed: {proc.stderr.strip()[-500:]}")
    return proc
