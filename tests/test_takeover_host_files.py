"""The operator's files, screen and ports against an agent on the same machine (issue 11; docs/threat-model.md).

Each attack is played by a real unprivileged user (`nobody`) on real files,
directories, processes and ports: a proxy config or token file reached through
a directory or link the agent controls, a Bot API URL that points back at the
host, control sequences in strings the agent wrote that would otherwise reach
root's terminal, and, after a host reboot, an agent's process at the old pid
of the host's QEMU while the agent holds the proxy's port.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from takeover.config import TakeoverConfig, read_proxy_config
from takeover.errors import InvalidInput
from takeover.host.files import create_private_under_trusted_dirs, ensure_host_dir, write_json_atomic
from takeover.host.runners import QemuIdentity, identity_path, read_identity
from takeover.host.ssh import SSHTarget
from takeover.host.terminal import printable
from takeover.journal import DONE, Journal
from takeover.models import Endpoint, SourceVM
from takeover.runbook import finished_vm
from takeover.steps import IN_ORDER
from takeover.steps.context import DISK_NAME
from takeover.steps.report import summary
from takeover.steps.verify import create_agent_token
from vm_image import proc
from vm_image.proc import current_boot_id

from .takeover_helpers import MonitorOnlyQemu, make_qcow2
from .vm_fixtures import free_port

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
AGENT = "nobody"  # a real unprivileged account plays the agent
TOML = 'telegram_token = "123:host-secret"\ntelegram_chat_id = 42\n'
FAKE_BOT_API = "http://10.0.2.2:8081"  # from the guest: the host's loopback, where any local user can listen


@pytest.fixture
def work():
    """A root-owned 0755 directory the agent can reach (pytest's own tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="spvm-host-files-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(AGENT)
    return entry.pw_uid, entry.pw_gid


def as_agent(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", AGENT, "--", *argv], capture_output=True, text=True, timeout=60)


def agent_dir(path: Path) -> Path:
    """A directory the agent owns (its home, a dir it made in /tmp...)."""
    path.mkdir(mode=0o755)
    os.chown(path, *agent_ids())
    return path


def root_file(path: Path, text: str = TOML, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def takeover_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "takeover", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


# -- --proxy-config: the bot token ----------------------------------------------------------------


def test_proxy_config_in_root_only_directories_is_read(work):
    path = root_file(work / "proxy.toml")
    assert read_proxy_config(path) == TOML.encode()


def test_proxy_config_written_by_the_agent_is_refused(work):
    # The agent writes a 0600 file of its own (with its own bot token and approvers) and hopes root
    # is pointed at it: only the mode was checked before.
    home = agent_dir(work / "agent")
    planted = home / "proxy.toml"
    made = as_agent(
        sys.executable,
        "-c",
        "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT, 0o600); os.write(fd, sys.argv[2].encode())",
        str(planted),
        TOML,
    )
    assert made.returncode == 0, made.stderr
    with pytest.raises(InvalidInput, match=f"directory {home} is owned by uid {agent_ids()[0]}"):
        read_proxy_config(planted)
    # Even in root's own directory, a file the agent owns is not root's settings.
    os.rename(planted, work / "moved.toml")
    with pytest.raises(InvalidInput, match=f"owned by uid {agent_ids()[0]}, not root"):
        read_proxy_config(work / "moved.toml")


def test_proxy_config_behind_a_symlink_is_refused(work):
    real = root_file(work / "real.toml")
    (work / "link.toml").symlink_to(real)
    with pytest.raises(InvalidInput, match="without following links"):
        read_proxy_config(work / "link.toml")
    # A symlinked directory on the way is refused too: the agent could repoint a link it owns.
    (work / "conf").symlink_to(work)
    with pytest.raises(InvalidInput, match=r"conf is a symlink or not a directory"):
        read_proxy_config(work / "conf" / "real.toml")


def test_proxy_config_in_a_directory_others_can_write_is_refused(work):
    shared = work / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # without the sticky bit: anyone may rename root's file away and put theirs
    path = root_file(shared / "proxy.toml")
    with pytest.raises(InvalidInput, match="someone other than root can change what is in it"):
        read_proxy_config(path)
    os.chmod(shared, 0o1777)  # like /tmp: others cannot replace root's entries
    assert read_proxy_config(path) == TOML.encode()


def test_proxy_config_readable_by_others_or_not_a_file_is_refused(work):
    path = root_file(work / "proxy.toml", mode=0o640)
    with pytest.raises(InvalidInput, match="readable by others"):
        read_proxy_config(path)
    fifo = work / "fifo.toml"
    os.mkfifo(fifo, 0o600)  # opened non-blocking: no writer cannot hang the takeover
    with pytest.raises(InvalidInput, match="not a regular file"):
        read_proxy_config(fifo)


def test_a_bot_api_other_than_telegrams_needs_the_operators_flag(work):
    path = root_file(work / "proxy.toml", TOML + f'telegram_api_url = "{FAKE_BOT_API}"\n')
    with pytest.raises(InvalidInput, match="not to Telegram") as err:
        read_proxy_config(path)
    assert f"--allow-telegram-api-url {FAKE_BOT_API}" in err.value.hint
    with pytest.raises(InvalidInput, match="not to Telegram"):
        read_proxy_config(path, allow_telegram_api_url="http://10.0.2.2:9999")
    assert read_proxy_config(path, allow_telegram_api_url=FAKE_BOT_API + "/") == path.read_bytes()
    telegram = root_file(work / "telegram.toml", TOML + 'telegram_api_url = "https://api.telegram.org/"\n')
    assert read_proxy_config(telegram) == telegram.read_bytes()


def test_cli_refuses_a_fake_bot_api_before_touching_anything(work):
    path = root_file(work / "proxy.toml", TOML + f'telegram_api_url = "{FAKE_BOT_API}"\n')
    result = takeover_cli(
        "run", "--host-dir", str(work / "host"), "--ready-file", str(work / "ready"), "--proxy-config", str(path)
    )
    assert result.returncode == 1
    assert "not to Telegram" in result.stderr and "--allow-telegram-api-url" in result.stderr
    assert "123:host-secret" not in result.stderr + result.stdout
    assert not (work / "host").exists()
    # With the flag the config passes and the run goes on to look for the agent's VM.
    result = takeover_cli(
        "run",
        "--host-dir",
        str(work / "host"),
        "--ready-file",
        str(work / "ready"),
        "--proxy-config",
        str(path),
        "--allow-telegram-api-url",
        FAKE_BOT_API,
    )
    assert result.returncode == 1 and "no ready file" in result.stderr


# -- --token-file ---------------------------------------------------------------------------------


def test_token_file_through_the_agents_symlinked_directory_is_refused(work):
    # The operator means a root directory; the agent made that name a link to a directory it owns
    # (here in sticky /tmp-like space it may write), so the token would land where it chooses.
    drop = work / "drop"
    drop.mkdir()
    os.chmod(drop, 0o1777)
    loot = agent_dir(work / "loot")
    planted = as_agent("ln", "-s", str(loot), str(drop / "tokens"))
    assert planted.returncode == 0, planted.stderr
    token_file = drop / "tokens" / "alice.token"
    with pytest.raises(InvalidInput, match="tokens is a symlink or not a directory"):
        create_private_under_trusted_dirs(token_file, "--token-file")
    result = takeover_cli(
        "run",
        "--host-dir",
        str(work / "host"),
        "--ready-file",
        str(work / "ready"),
        "--agent-name",
        "alice",
        "--token-file",
        str(token_file),
    )
    assert result.returncode == 1 and "symlink" in result.stderr and "what to do:" in result.stderr
    assert not (work / "host").exists()  # refused before anything changed
    assert list(loot.iterdir()) == []


def test_token_file_in_a_host_dir_not_yet_made_gets_past_the_early_check(work):
    # The demo's way: the token goes into --host-dir, which the takeover itself creates (root, 0700).
    host = work / "host-not-yet"
    result = takeover_cli(
        "run",
        "--host-dir",
        str(host),
        "--ready-file",
        str(work / "no-ready"),
        "--agent-name",
        "alice",
        "--token-file",
        str(host / "alice.token"),
    )
    assert "--token-file" not in result.stderr and "no ready file" in result.stderr


def test_token_file_in_the_agents_directory_is_refused_before_the_agent_is_made(work):
    loot = agent_dir(work / "loot")
    ssh = SSHTarget(Endpoint("127.0.0.1", 9), work / "no-key", work / "no-known-hosts")
    # Refused before any SSH: no agent is created in the VM for a token that cannot be kept.
    with pytest.raises(InvalidInput, match=f"directory {loot} is owned by uid {agent_ids()[0]}"):
        create_agent_token(ssh, "alice", "api-*", loot / "alice.token")
    assert list(loot.iterdir()) == []


def test_token_file_is_new_and_0600_from_its_first_byte(work):
    old = os.umask(0)
    try:
        fd = create_private_under_trusted_dirs(work / "alice.token", "--token-file")
        os.close(fd)
    finally:
        os.umask(old)
    st = os.stat(work / "alice.token")
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == 0
    (work / "planted.token").symlink_to("/etc/passwd")
    with pytest.raises(InvalidInput, match="already exists"):
        create_private_under_trusted_dirs(work / "planted.token", "--token-file")
    with pytest.raises(InvalidInput, match="already exists"):
        create_private_under_trusted_dirs(work / "alice.token", "--token-file")


# -- root's terminal ------------------------------------------------------------------------------

ESCAPES = "\x1b]0;root is pwned\x07\x1b[2J\x1b[1A\x9b31m\u202egnp.exe\u2028"


def test_printable_escapes_controls_bidi_and_broken_utf8():
    shown = printable("a" + ESCAPES + "\x7f\udcff\tb\nc")
    assert shown == ("a\\x1b]0;root is pwned\\x07\\x1b[2J\\x1b[1A\\x9b31m\\u202egnp.exe\\u2028\\x7f\\udcff\\x09b\\x0ac")
    assert printable("one\ntwo", newlines=True) == "one\ntwo"
    assert printable("plain ünïcode, 日本") == "plain ünïcode, 日本"


def test_agent_control_sequences_never_reach_roots_terminal(work):
    # The agent writes its ready file; the monitor path carries terminal escapes (a window title, clear
    # screen, cursor up, a C1 CSI, a bidi override, a line separator). The run fails at step 1 and both
    # the progress display and the error quote that path.
    home = agent_dir(work / "agent")
    ready = home / "ready"
    data = {"version": 1, "monitor": f"/tmp/qmp{ESCAPES}.sock", "disk": f"/tmp/disk{ESCAPES}.qcow2"}
    written = as_agent(
        sys.executable,
        "-c",
        "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
        str(ready),
        "READY_FOR_TAKEOVER\n" + json.dumps(data) + "\n",
    )
    assert written.returncode == 0, written.stderr
    result = takeover_cli("run", "--host-dir", str(work / "host"), "--ready-file", str(ready))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "[1/9] find and check the agent's VM" in result.stderr and "FAILED" in result.stderr
    assert "\\x1b]0;root is pwned\\x07" in result.stderr  # shown, escaped
    for raw in ("\x1b", "\x07", "\x9b", "\u202e", "\u2028"):
        assert raw not in out, repr(raw)


def test_summary_keeps_each_agent_string_on_its_own_escaped_line(work):
    report = {
        "steps": [{"title": "t", "status": "done", "duration_s": 1.0}] * 2,
        "scrub": {
            "changes": [{"action": "removed", "path": "/x"}],
            "findings": ["/home/agent/.bashrc\nTakeover complete.\x1b[2J"],
            "not_blocked": [],
        },
        "keys": {},
        "vm": {"spec": {}},
        "files": {"disk": "/d", "report": "/r"},
        "agent_token": None,
    }
    text = summary(report)
    assert "\x1b" not in text
    assert "  seen: /home/agent/.bashrc\\x0aTakeover complete.\\x1b[2J" in text.splitlines()


def test_summary_shows_the_addresses_the_journal_records_as_the_operator_types_them():
    report = {
        "steps": [{"title": "t", "status": "done", "duration_s": 1.0}] * 2,
        "scrub": {"changes": [], "findings": [], "not_blocked": []},
        "keys": {"login_key": "/h/host_key", "known_hosts": "/h/known_hosts"},
        "vm": {
            "spec": {
                "proxy_listen": {"host": "10.213.9.1", "port": 3737},
                "ssh_listen": {"host": "127.0.0.1", "port": 2223},
            }
        },
        "source": {"machine": "root@10.213.9.2"},
        "revoked": {"told_agent": ["/etc/secret-proxy/url"]},
        "files": {"disk": "/d", "report": "/r"},
        "agent_token": None,
    }
    lines = summary(report).splitlines()
    assert any(line.startswith("Proxy:         http://10.213.9.1:3737 (") for line in lines), lines
    assert any(line.endswith("-p 2223 proxy@127.0.0.1") for line in lines), lines
    assert (
        "Agent machine: root@10.213.9.2, told SECRET_PROXY_URL=http://10.213.9.1:3737 (/etc/secret-proxy/url)" in lines
    )


# -- `takeover start` after a host reboot: stale pidfiles and squatted ports -----------------------

AGENT_PROXY = r"""
import http.server, os, sys
class Fake(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # a fake proxy: /health 200, so a start that believed it would look healthy
        self.send_response(200); self.end_headers(); self.wfile.write(b'{"status": "ok"}')
    def log_message(self, *a): pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Fake)
print(os.getpid(), flush=True)
server.serve_forever()
"""


def halting_kernel(path: Path) -> Path:
    """A multiboot image of four instructions (cli; hlt): QEMU really runs it, and it idles at once."""
    magic, flags, base = 0x1BADB002, 0x00010000, 0x100000  # flags: load addresses given in the header
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, base, base, 0, 0, base + 32)
    root_file(path, "", 0o600)
    path.write_bytes(header + bytes([0xFA, 0xF4, 0xEB, 0xFD]) + bytes(28))
    return path


@pytest.fixture
def finished(work):
    """A host directory as a finished takeover leaves it, built by hand: journal, disk, boot files."""
    host_dir = ensure_host_dir(work / "host")
    make_qcow2(host_dir / DISK_NAME)
    boot = host_dir / "boot"
    boot.mkdir(mode=0o700)
    kernel = halting_kernel(boot / "vmlinuz")
    root_file(boot / "initrd.img", "initrd", 0o600)
    proxy, ssh = Endpoint("127.0.0.1", free_port()), Endpoint("127.0.0.1", free_port())
    options = TakeoverConfig(
        host_dir=host_dir, ssh_listen=ssh, qemu_user=None, accel="tcg", memory_mb=320, cpus=3
    ).to_dict()
    journal = Journal.new(host_dir, options)  # what `takeover run` records
    source = SourceVM(
        monitor="/nonexistent/qmp.sock",
        disk="/nonexistent/disk.qcow2",
        disk_dev=0,
        disk_ino=0,
        disk_uid=agent_ids()[0],
        pid=1,
        pid_start_ticks=0,
        uid=agent_ids()[0],
        gid=agent_ids()[1],
        groups=[],
        cwd="/",
        cmdline=[],
        proxy=proxy,
        memory_mb=4096,  # the agent's VM: never the host's size
        cpus=8,
        block_nodes=[],
        vmstate_node="",
    )
    results = {
        "find_vm": source.to_dict(),
        "scrub": {
            "boot": {
                "kernel": str(kernel),
                "initrd": str(boot / "initrd.img"),
                "version": "test",
                "append": "console=ttyS0",
                "source": "test",
            }
        },
    }
    for step in IN_ORDER.names:
        journal.begin(step)
        journal.finish(step, results.get(step, {}))
    journal.set_state(DONE)
    spec, runner = finished_vm(TakeoverConfig(host_dir=host_dir))
    assert spec.ssh_listen == ssh and spec.proxy_listen == proxy
    assert (spec.memory_mb, spec.cpus) == (320, 3)  # the run's --memory/--cpus, not the agent's nor the defaults
    yield host_dir, spec, runner
    runner.stop(spec)


def agent_listens(port: int) -> tuple[subprocess.Popen, int]:
    """The agent serves a fake proxy on `port`; returns the process and the server's own pid."""
    server = subprocess.Popen(
        ["runuser", "-u", AGENT, "--", sys.executable, "-c", AGENT_PROXY, str(port)], stdout=subprocess.PIPE, text=True
    )
    return server, int(server.stdout.readline())


def stop_server(server: subprocess.Popen, pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)  # the server itself: runuser does not pass SIGKILL on
    except ProcessLookupError:
        pass
    server.wait(30)


def agent_qemu_naming(work: Path, disk: Path) -> MonitorOnlyQemu:
    """A real QEMU of the agent's whose command line carries the host's disk path (as a -name)."""
    home = agent_dir(work / "agent-qemu")
    monitor, pidfile = home / "qmp.sock", home / "qemu.pid"
    subprocess.run(
        [
            "runuser",
            "-u",
            AGENT,
            "--",
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-name",
            f"decoy-{disk}",
            "-qmp",
            f"unix:{monitor},server=on,wait=off",
            "-daemonize",
            "-pidfile",
            str(pidfile),
        ],
        check=True,
        timeout=60,
    )
    pid = int(pidfile.read_text())
    return MonitorOnlyQemu(pid, proc.start_ticks(pid), monitor, disk, pidfile)


def test_start_after_a_reboot_ignores_the_agents_process_at_the_old_pid_and_names_the_squatter(work, finished):
    host_dir, spec, runner = finished
    decoy = agent_qemu_naming(work, spec.disk)
    proxy_squatter, proxy_pid = agent_listens(spec.proxy_listen.port)
    ssh_squatter, ssh_pid = agent_listens(spec.ssh_listen.port)
    try:
        # After the reboot the pidfile names the old pid, which is now the agent's QEMU with the disk's path in
        # its arguments. Before: "already running", while the agent served the proxy's port.
        spec.pidfile.write_text(f"{decoy.pid}\n")
        assert runner.pid(spec) is None
        # Even an identity recorded at start does not carry over a reboot (another boot id).
        write_json_atomic(
            identity_path(spec),
            QemuIdentity("another-boot", decoy.pid, decoy.ticks, 0, "/usr/bin/qemu-system-x86_64", 0, 0).to_dict(),
        )
        assert runner.pid(spec) is None

        result = takeover_cli("start", "--host-dir", str(host_dir))
        assert result.returncode == 1, result.stdout
        assert "already running" not in result.stdout
        uid = agent_ids()[0]
        assert f"{spec.proxy_listen} (the proxy's port) is held by pid {proxy_pid} (uid {uid} {AGENT}" in result.stderr
        assert "what to do:" in result.stderr

        stop_server(proxy_squatter, proxy_pid)
        result = takeover_cli("start", "--host-dir", str(host_dir))
        assert result.returncode == 1
        assert f"{spec.ssh_listen} (the host's SSH forward) is held by pid {ssh_pid} (uid {uid}" in result.stderr
        assert decoy.alive()  # refused without touching anyone's process
        assert not any(
            str(spec.disk) in arg and "decoy" not in arg for pid in proc_pids() for arg in cmdline(pid)
        )  # no host QEMU was started
    finally:
        stop_server(proxy_squatter, proxy_pid)
        stop_server(ssh_squatter, ssh_pid)
        decoy.kill()


def test_start_knows_the_hosts_qemu_by_pid_start_time_owner_and_binary(work, finished):
    host_dir, spec, runner = finished
    pid = runner.start(spec)  # the real runner, a real QEMU (running a guest that only halts)
    st = os.stat(identity_path(spec))
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o600
    identity = read_identity(identity_path(spec))
    assert (identity.pid, identity.start_ticks, identity.uid) == (pid, proc.start_ticks(pid), 0)
    assert identity.boot_id == current_boot_id()
    assert runner.pid(spec) == pid

    result = takeover_cli("start", "--host-dir", str(host_dir))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"started": False, "pid": pid, "detail": "already running"}

    # The record names this process only: a pidfile of another's, or an owner not root's or QEMU's, does not match.
    decoy = agent_qemu_naming(work, spec.disk)
    try:
        spec.pidfile.write_text(f"{decoy.pid}\n")
        assert runner.pid(spec) == pid
        write_json_atomic(identity_path(spec), {**identity.to_dict(), "pid": decoy.pid, "start_ticks": decoy.ticks})
        assert runner.pid(spec) is None  # right boot, start time and binary, but the agent's uid
    finally:
        decoy.kill()
    # A host directory from before the record: its pidfile is believed only for root's (or QEMU's) own QEMU.
    identity_path(spec).unlink()
    spec.pidfile.write_text(f"{pid}\n")
    assert runner.pid(spec) == pid
    write_json_atomic(identity_path(spec), identity.to_dict())
    assert runner.stop(spec) and not proc.alive(pid, identity.start_ticks)
    assert not identity_path(spec).exists()


def proc_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
