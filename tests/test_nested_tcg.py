"""TCG inside TCG, opt-in: the proxy VM launched with `vm_image launch` inside a real agent machine (a VM).

The machine is scripts/agent_machine_vm.py's; the path is bench/bench_nested_tcg.py's. On this project's
2-core machine without KVM the nested guest did not answer /health within the test's 40 minutes
(docs/benchmarks.md, "TCG inside TCG"), so CI does not run it; it is kept to run on a faster host:
`SPVM_NESTED_TCG=1 flock /var/tmp/spvm-slow.lock .venv/bin/python -m pytest tests/test_nested_tcg.py`.
The overlay test below runs everywhere.
"""

from __future__ import annotations

import os
import sys
import tarfile

import pytest

from scripts.agent_machine_vm import (
    CHECKOUT,
    SITE_PACKAGES,
    boot_machine,
    build_machine_image,
    copy_proxy_image,
    launch_nested,
    write_machine_overlay,
)

from .vm_fixtures import agent_image

NESTED_LAUNCH_TIMEOUT = 2400.0


def test_the_agent_machine_lets_root_in_by_its_key_only_and_carries_vm_image_with_qemu_qmp(tmp_path):
    out = write_machine_overlay(tmp_path / "overlay.tar", b"ssh-ed25519 AAAA root-key\n", b"private", b"public\n")
    with tarfile.open(out) as tar:
        members = {m.name.removeprefix("."): m for m in tar.getmembers()}
        keys = members["/root/.ssh/authorized_keys"]
        assert (keys.mode, keys.uid) == (0o600, 0)
        assert tar.extractfile(keys).read() == b"ssh-ed25519 AAAA root-key\n"
        assert members["/etc/ssh/ssh_host_ed25519_key"].mode == 0o600
        dropin = tar.extractfile(members["/etc/ssh/sshd_config.d/10-agent-machine.conf"]).read().decode()
    assert "PermitRootLogin prohibit-password" in dropin and "PasswordAuthentication no" in dropin
    assert f"{CHECKOUT}/vm_image/launch.py" in members and f"{CHECKOUT}/vm_image/__main__.py" in members
    assert f"{SITE_PACKAGES}/qemu/qmp/__init__.py" in members  # vm_image/qmp.py's one import from PyPI


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(
    os.environ.get("SPVM_NESTED_TCG") != "1",
    reason="TCG inside TCG: no /health within 40 min on 2 cores (docs/benchmarks.md); SPVM_NESTED_TCG=1 runs it",
)
def test_the_proxy_vm_nested_in_a_real_agent_machine_answers_health_inside_it(tmp_path):
    image_state = agent_image()
    machine = boot_machine(build_machine_image(tmp_path / "machine"))
    try:
        copy_proxy_image(machine, image_state)
        nested = launch_nested(machine, NESTED_LAUNCH_TIMEOUT, lambda s, line: sys.stderr.write(f"{s:6.0f} s {line}\n"))
        assert nested.healthy, "\n".join([*nested.output[-20:], nested.serial_tail])
        assert nested.boot_seconds is not None
    finally:
        machine.stop()
