"""The host's ports (takeover/host/ports.py) and the wait for /health through one, without root or a guest."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from takeover.errors import RestartError
from takeover.host.ports import listener_pids
from takeover.host.runners import wait_until_serving
from takeover.models import Endpoint

from .takeover_helpers import free_port, host_vm_spec


def test_the_process_listening_on_a_port_is_named_by_its_pid_until_it_closes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert listener_pids(Endpoint("127.0.0.1", port)) == {os.getpid()}
    assert listener_pids(Endpoint("127.0.0.1", port)) == set()


def test_a_host_qemu_that_exits_before_health_answers_is_a_restart_error_naming_its_serial_log(tmp_path: Path):
    spec = host_vm_spec(tmp_path, Endpoint("127.0.0.1", free_port()))  # nothing answers there
    stand_in = subprocess.Popen(["sleep", "1"])  # the "QEMU": it exits before anything answers
    try:
        not_serving = rf"the host's VM \(pid {stand_in.pid}\) is not serving: QEMU exited"
        with pytest.raises(RestartError, match=not_serving) as err:
            wait_until_serving(spec, stand_in.pid, timeout=60)
        assert str(spec.serial_log) in err.value.hint
    finally:
        stand_in.kill()
        stand_in.wait()
