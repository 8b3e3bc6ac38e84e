"""The journal is a typed contract: every step's result reads back as its dataclass, and a journal
written by the version before the typed results (each result a hand-made dict, the restart step's
endpoints as "host:port" text, no `qemu_user` before that option existed) still loads, resumes,
starts, stops and rolls back."""

from __future__ import annotations

import json

import pytest

from takeover.config import TakeoverConfig
from takeover.errors import JournalError
from takeover.host.files import ensure_host_dir
from takeover.journal import Journal
from takeover.models import Endpoint, SourceVM
from takeover.progress import Progress
from takeover.record import from_record, to_record
from takeover.steps import ReportResult
from takeover.steps.checkpoint import CheckpointResult
from takeover.steps.context import Context, runner_for, vm_spec
from takeover.steps.relocate import RelocateResult
from takeover.steps.restart import RestartResult
from takeover.steps.revoke import RevokeResult
from takeover.steps.scrub import ScrubOutcome
from takeover.steps.verify import AgentToken, VerifyResult

RESULT_TYPES = {
    "find_vm": SourceVM,
    "checkpoint": CheckpointResult,
    "relocate": RelocateResult,
    "scrub": ScrubOutcome,
    "restart": RestartResult,
    "verify": VerifyResult,
    "revoke": RevokeResult,
    "report": ReportResult,
}


@pytest.fixture
def host_dir(tmp_path):
    return ensure_host_dir(tmp_path / "host")


def old_journal(host_dir, *, with_qemu_user: bool = True) -> dict:
    """A journal as the earlier version wrote it, field for field."""
    h = str(host_dir)
    options = {
        "host_dir": h,
        "ready_file": "/home/agent/.local/state/secret-proxy-vm/run/ready",
        "monitor": None,
        "disk": None,
        "proxy_listen": None,
        "ssh_listen": {"host": "127.0.0.1", "port": 2299},  # asdict kept an Endpoint as an object here
        "runner": "qemu",
        "libvirt_uri": "qemu:///system",
        "qemu_user": "spvm-test",
        "accel": "tcg",
        "memory_mb": 320,
        "cpus": 3,
        "keep_source": False,
        "proxy_config": None,
        "allow_telegram_api_url": None,
        "egress_filter": True,
        "egress_allow": ["https://api.example.com"],
        "agent_name": "alice",
        "agent_secrets": "api-*",
        "token_file": None,
        "vm_name": "secret-proxy-vm",
        "boot_timeout": 600.0,
        "reinstall_venv": True,
        "cache_dir": "/var/cache/secret-proxy-vm",
        "rebuild_system": True,
        "replace_modules": True,
        "kernel": None,
        "initrd": None,
        "kernel_append": None,
        "fail_after": None,
    }
    if not with_qemu_user:
        del options["qemu_user"]
    results = {
        "find_vm": {
            "monitor": "/home/agent/run/qmp.sock",
            "disk": "/home/agent/image/disk.qcow2",
            "disk_dev": 2049,
            "disk_ino": 1234,
            "disk_uid": 1001,
            "pid": 4242,
            "pid_start_ticks": 987654,
            "uid": 1001,
            "gid": 1001,
            "groups": [1001],
            "cwd": "/home/agent",
            "cmdline": ["qemu-system-x86_64", "-name", "secret-proxy-vm"],
            "proxy": {"host": "127.0.0.1", "port": 3737},
            "memory_mb": 256,
            "cpus": 1,
            "block_nodes": ["disk0"],
            "vmstate_node": "disk0",
            "ready_file": "/home/agent/run/ready",
            "pidfile": "/home/agent/run/qemu.pid",
            "setup_key_pub": "/home/agent/image/setup_key.pub",
            "notes": ["a note"],
            "agent_files": ["/home/agent/run/ready"],  # an even older version wrote this; never read
        },
        "checkpoint": {"tag": "takeover-checkpoint", "method": "recovered after an interrupted run"},
        "relocate": {
            "path": f"{h}/disk.qcow2",
            "size": 283115520,
            "sha256": "ab" * 32,
            "allocated": 283115520,
            "source_allocated": 294649856,
            "seconds": 2.7,
            "virtual_size": 2147483648,
            "backing_files": [],
            "agent_uid": 1001,
        },
        "scrub": {
            "changes": [{"path": "/etc/shadow", "action": "rewritten", "why": "passwords locked"}],
            "findings": ["a setuid file"],
            "not_blocked": [],
            "snapshots_removed": ["takeover-checkpoint"],
            "seconds": {"launch": 13.0},
            "keys": {"vm_host_key_fingerprint": "SHA256:x", "login_key": f"{h}/host_key"},
            "boot": {
                "kernel": f"{h}/boot/vmlinuz",
                "initrd": f"{h}/boot/initrd.img",
                "append": "root=/dev/vda rw console=ttyS0 panic=-1",
                "version": "6.1.0-56-cloud-amd64",
                "key": "",
                "source": "vm_image.boot_files",
            },
        },
        "restart": {
            "pid": 5151,
            "pid_start_ticks": 123,
            "start_seconds": 0.24,
            "forwards": {"backlog": {"127.0.0.1:3737": 128}},
            "spec": {  # HostVMSpec.to_dict wrote Paths and Endpoints as text
                "name": "secret-proxy-vm",
                "disk": f"{h}/disk.qcow2",
                "kernel": f"{h}/boot/vmlinuz",
                "initrd": f"{h}/boot/initrd.img",
                "append": "root=/dev/vda rw console=ttyS0 panic=-1",
                "memory_mb": 320,
                "cpus": 3,
                "accel": "tcg",
                "proxy_listen": "127.0.0.1:3737",
                "ssh_listen": "127.0.0.1:2299",
                "monitor": f"{h}/qmp.sock",
                "pidfile": f"{h}/qemu.pid",
                "serial_log": f"{h}/serial.log",
                "qemu_log": f"{h}/qemu.log",
            },
            "runner": "qemu",
            "qemu_user": "spvm-test",
            "monitor": f"{h}/qmp.sock",
            "pidfile": f"{h}/qemu.pid",
            "qemu_log": f"{h}/qemu.log",
            "command": ["/usr/bin/qemu-system-x86_64", "-name", "secret-proxy-vm"],
            "egress": {"filter": "off"},
        },
        "verify": {
            "health_seconds": 24.0,
            "ssh_seconds": 3.0,
            "listener_pids": [5151],
            "host_key": "ssh-ed25519 AAAA",
            "auth_methods": ["publickey"],
            "agent_key": "refused",
            "seconds": 30.0,
            "agent_token": {"agent": "alice", "secrets": "api-*", "token_file": f"{h}/agent-alice.token"},
        },
        "revoke": {"removed": [{"path": "/home/agent/run/qmp.sock", "outcome": "removed"}], "kept": []},
        "report": {"report": f"{h}/report.json"},
    }
    steps = {
        name: {"status": "done", "started": 1.0, "finished": 2.0, "result": result, "duration_s": 1.0}
        for name, result in results.items()
    }
    data = {"version": 1, "state": "done", "created": 1.0, "options": options, "steps": steps, "history": []}
    (host_dir / "journal.json").write_text(json.dumps(data))
    return data


def test_a_journal_in_the_earlier_shape_reads_as_the_typed_results(host_dir):
    old_journal(host_dir)
    journal = Journal.load(host_dir)
    results = {step: journal.read(step, kind) for step, kind in RESULT_TYPES.items()}
    assert results["find_vm"].proxy == Endpoint("127.0.0.1", 3737) and results["find_vm"].groups == [1001]
    assert results["checkpoint"] == CheckpointResult("takeover-checkpoint", "recovered after an interrupted run")
    assert results["scrub"].boot.initrd == host_dir / "boot" / "initrd.img"
    restart = results["restart"]
    assert restart.pid == 5151 and restart.spec.proxy_listen == Endpoint("127.0.0.1", 3737)  # "host:port" text
    assert restart.spec.ssh_listen == Endpoint("127.0.0.1", 2299) and restart.uri is None
    assert results["verify"].agent_token == AgentToken("alice", "api-*", str(host_dir / "agent-alice.token"))
    assert results["revoke"].removed[0]["outcome"] == "removed"


def test_each_typed_result_is_written_in_the_shape_it_was_read_from(host_dir):
    """The earlier shape and the new one are one shape, except an Endpoint is always {"host", "port"}."""
    data = old_journal(host_dir)
    journal = Journal.load(host_dir)
    for step, kind in RESULT_TYPES.items():
        written = json.loads(json.dumps(to_record(journal.read(step, kind))))
        assert from_record(kind, written) == journal.read(step, kind)
        old = dict(data["steps"][step]["result"])
        old.pop("agent_files", None)
        if step == "restart":
            old["spec"] = {**old["spec"], "proxy_listen": written["spec"]["proxy_listen"]}
            old["spec"]["ssh_listen"] = written["spec"]["ssh_listen"]
            assert written["spec"]["proxy_listen"] == {"host": "127.0.0.1", "port": 3737}
        if step == "checkpoint":
            assert written == {**old, "save_seconds": 0.0, "quit_seconds": 0.0}
            continue
        assert written == old


def test_the_saved_options_give_start_stop_and_rollback_the_runs_vm(host_dir):
    old_journal(host_dir)
    journal = Journal.load(host_dir)
    saved = TakeoverConfig.saved(journal.options, host_dir)
    assert (saved.ssh_listen, saved.memory_mb, saved.cpus, saved.qemu_user) == (
        Endpoint("127.0.0.1", 2299),
        320,
        3,
        "spvm-test",
    )
    assert saved.egress_allow == ("https://api.example.com",)
    assert TakeoverConfig.saved(TakeoverConfig(host_dir=host_dir).to_dict(), host_dir) == TakeoverConfig(
        host_dir=host_dir
    )
    spec = vm_spec(Context(saved, host_dir, journal, Progress()))
    assert spec == journal.read("restart", RestartResult).spec  # the VM `start` runs is the VM the run started
    assert runner_for(saved).qemu_user == "spvm-test"


def test_a_journal_from_before_qemu_user_starts_its_qemu_as_root_as_it_did(host_dir):
    old_journal(host_dir, with_qemu_user=False)
    saved = TakeoverConfig.saved(Journal.load(host_dir).options, host_dir)
    assert saved.qemu_user is None and runner_for(saved).qemu_user is None


def test_a_result_that_does_not_fit_its_type_is_a_journal_error_naming_the_field(host_dir):
    data = old_journal(host_dir)
    data["steps"]["restart"]["result"]["pid"] = "5151"
    (host_dir / "journal.json").write_text(json.dumps(data))
    with pytest.raises(JournalError, match=r"step restart's result .*\.pid is '5151', not int"):
        Journal.load(host_dir).read("restart", RestartResult)
