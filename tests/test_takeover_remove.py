"""`takeover remove` leaves nothing of a host VM behind: no nftables table for a uid a later user may
get, no forward proxy config, none of the users its run created (and never one it did not create),
no host directory; and it refuses while the VM runs or a takeover is unfinished, unless told --stop.

Real nftables, tinyproxy and users, as tests/test_egress.py; the VM itself is a stand-in runner.
"""

from __future__ import annotations

import pwd
from collections.abc import Iterator

import pytest

from takeover import cli
from takeover import remove as remove_module
from takeover.host import egress
from takeover.host.files import ensure_host_dir
from takeover.journal import DONE, Journal
from tests.egress_helpers import exists, forget_user
from tests.takeover_helpers import ensure_user

pytestmark = pytest.mark.root

QEMU_USER = "spvm-rm-qemu"


@pytest.fixture
def qemu_user() -> Iterator[str]:
    forget_user(QEMU_USER)
    yield QEMU_USER
    forget_user(QEMU_USER)


@pytest.mark.parametrize("existed", [False, True], ids=["made-by-the-run", "there-before"])
def test_remove_after_stop_deletes_the_egress_table_and_the_users_the_run_created(qemu_user, tmp_path, existed):
    if existed:
        ensure_user(qemu_user)  # the operator's, or another host VM's: the run did not make it
    host_dir = ensure_host_dir(tmp_path / "host")
    egress.enforce(egress.new_plan([], qemu_user), host_dir)
    uid = pwd.getpwnam(qemu_user).pw_uid
    proxy_user = egress.egress_user(uid)
    egress.release(host_dir)  # what `takeover stop` does: the table stays for the next start
    assert egress.table_owner(uid) == str(host_dir)

    assert cli.main(["remove", "--host-dir", str(host_dir)]) == 0

    assert egress.table_owner(uid) is None  # a user later given this uid inherits no rules
    assert not egress.config_dir(proxy_user).exists()
    assert not exists(proxy_user)
    assert exists(qemu_user) == existed  # never a user the run did not create
    assert not host_dir.exists()


def test_remove_keeps_a_recorded_user_whose_uid_another_host_dirs_table_filters(qemu_user, tmp_path):
    first = ensure_host_dir(tmp_path / "first")
    egress.enforce(egress.new_plan([], qemu_user), first)  # creates both users, recorded in `first`
    egress.release(first, drop_rules=True)
    second = ensure_host_dir(tmp_path / "second")
    egress.enforce(egress.new_plan([], qemu_user), second)  # a later run reuses them
    uid = pwd.getpwnam(qemu_user).pw_uid
    try:
        assert cli.main(["remove", "--host-dir", str(first)]) == 0
        assert exists(qemu_user) and exists(egress.egress_user(uid))
        assert egress.table_owner(uid) == str(second)
    finally:
        egress.release(second, drop_rules=True)


def test_remove_refuses_an_unfinished_takeover_without_stop(tmp_path, capsys):
    host_dir = ensure_host_dir(tmp_path / "host")
    Journal.new(host_dir, {})
    assert cli.main(["remove", "--host-dir", str(host_dir)]) == 1
    assert "unfinished" in capsys.readouterr().err and host_dir.exists()


class StandInRunner:
    """The host's VM as the runner sees it: running until stopped."""

    def __init__(self) -> None:
        self.running, self.undefined = True, False

    def pid(self, spec: object) -> int | None:
        return 4242 if self.running else None

    def stop(self, spec: object, undefine: bool = True) -> bool:
        self.running, self.undefined = False, undefine
        return True


def test_remove_refuses_a_running_vm_unless_told_to_stop_it(tmp_path, monkeypatch, capsys):
    host_dir = ensure_host_dir(tmp_path / "host")
    Journal.new(host_dir, {}).set_state(DONE)
    runner = StandInRunner()
    monkeypatch.setattr(remove_module, "vm_spec", lambda ctx: object())
    monkeypatch.setattr(remove_module, "runner_for", lambda cfg: runner)

    assert cli.main(["remove", "--host-dir", str(host_dir)]) == 1
    err = capsys.readouterr().err
    assert "runs (pid 4242)" in err and "--stop" in err
    assert runner.running and host_dir.exists()

    assert cli.main(["remove", "--stop", "--host-dir", str(host_dir)]) == 0
    assert not runner.running and runner.undefined and not host_dir.exists()


def test_remove_refuses_a_directory_that_holds_no_takeover(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep").write_text("mine")
    assert cli.main(["remove", "--host-dir", str(plain)]) == 1
    assert (plain / "keep").exists()
