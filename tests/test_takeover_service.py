"""The systemd unit: written atomically 0644 root's, accepted by `systemd-analyze verify`, and its commands
run as systemd runs them (the unit's words as argv, `%f` the host directory, no shell)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from takeover import service
from takeover.errors import InvalidInput

from .takeover_helpers import as_systemd_runs, run_unit_command, unit_fields

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", ["/var/lib/secret-proxy-vm", "/srv/a.b/c_d+e", "/x/.hidden", "/", "/var/lib/vm-2/"])
def test_the_instance_is_the_host_directory_escaped_as_systemd_escape_does(path):
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape is not installed (apt-get install systemd)")
    expected = subprocess.run(["systemd-escape", "--path", path], capture_output=True, text=True, check=True)
    assert service.escape_path(Path(path)) == expected.stdout.strip()


def test_the_unit_is_written_0644_roots_and_replaces_the_old_one_whole(tmp_path):
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / service.UNIT_NAME).write_text("old text\n")
    path = service.install(unit_dir, check_owners=False)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 0
    fields = unit_fields(path.read_text())
    assert fields["Type"] == "forking" and fields["PIDFile"] == "%f/qemu.pid"
    assert fields["Restart"] == "on-failure" and int(fields["StartLimitBurst"]) == service.START_LIMIT_BURST
    assert fields["ExecStartPre"].endswith("-m takeover service prepare --host-dir %f")
    assert fields["ExecStart"].endswith("-m takeover start --host-dir %f")
    assert [p.name for p in unit_dir.iterdir()] == [service.UNIT_NAME]  # no temporary file left


def test_systemd_analyze_verifies_the_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    service.install(tmp_path, check_owners=False)
    instance = tmp_path / service.instance_unit(Path("/var/lib/secret-proxy-vm"))
    shutil.copy(tmp_path / service.UNIT_NAME, instance)
    checked = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(instance)], capture_output=True, text=True, timeout=120
    )
    ours = [line for line in checked.stderr.splitlines() if "secret-proxy-vm@" in line]
    assert checked.returncode == 0 and ours == [], checked.stderr[-2000:]


def test_systemd_analyze_would_catch_a_broken_unit(tmp_path):
    """The check above can fail: the same unit with a relative ExecStart is refused."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    service.install(tmp_path, check_owners=False)
    text = (tmp_path / service.UNIT_NAME).read_text().replace(f"ExecStart={sys.executable}", "ExecStart=python")
    instance = tmp_path / service.instance_unit(Path("/var/lib/secret-proxy-vm"))
    instance.write_text(text)
    checked = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(instance)], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode != 0 or "secret-proxy-vm@" in checked.stderr


@pytest.mark.parametrize("key", ["ExecStartPre", "ExecStart"])
def test_the_units_commands_run_as_systemd_runs_them(tmp_path, key):
    """The words of the unit, as argv, from its WorkingDirectory, with its environment: the checkout's
    takeover answers (here: no verified takeover in this host directory, so nothing is started)."""
    service.install(tmp_path, check_owners=False)
    fields = unit_fields((tmp_path / service.UNIT_NAME).read_text())
    host_dir = tmp_path / "host"
    host_dir.mkdir(mode=0o700)
    argv = as_systemd_runs(fields[key], host_dir)
    assert argv[0] == sys.executable and argv[1:4] == ["-E", "-s", "-m"]
    ran = run_unit_command(fields, key, host_dir)
    assert ran.returncode == 1, ran.stderr
    assert f"{host_dir} holds no verified takeover" in ran.stderr
    assert fields["WorkingDirectory"] == str(ROOT)


def test_install_refuses_a_unit_directory_others_could_change(tmp_path):
    (tmp_path / "units").mkdir()
    os.chmod(tmp_path / "units", 0o777)
    with pytest.raises(service.UnitError, match="other than root"):
        service.install(tmp_path / "units")


def test_the_cli_installs_and_names_the_instance_but_refuses_a_shared_directory(tmp_path):
    ran = subprocess.run(
        [sys.executable, "-m", "takeover", "service", "install", "--unit-dir", str(tmp_path), "--host-dir",
         "/var/lib/secret-proxy-vm"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 1 and "can be changed by a user other than root" in ran.stderr  # /tmp is 1777
    assert not (tmp_path / service.UNIT_NAME).exists()


@pytest.mark.parametrize("bad", ["/var/lib/a b", "/var/lib/%i", "/var/lib/$HOME", "relative/dir", "/a/../etc", "/a\\b"])
def test_a_path_the_unit_cannot_hold_is_refused(tmp_path, bad):
    with pytest.raises(InvalidInput):
        service.UnitText(Path(bad), ROOT).render()
    with pytest.raises(InvalidInput):
        service.UnitText(Path(sys.executable), Path(bad)).render()
