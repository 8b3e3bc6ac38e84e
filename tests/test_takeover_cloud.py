"""A VM on a cloud image (`vm_image up --base-image`: a qcow2 overlay on the user's image) is taken over,
and everything the takeover reads of the agent's disk is read as the agent, in a sandbox.

Fast tests: the sandbox itself (a real unprivileged user), the NBD server the sandbox writes to (a
hostile peer), QEMU's view of a backing chain, and checkpoint, relocation and rollback of a real QEMU
(as the agent) whose disk has a backing file. One slow test plays it all end to end under TCG.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from takeover.agent import nbd_sink
from takeover.agent.diskimage import inspect_image
from takeover.agent.qemu_answers import disk_nodes
from takeover.agent.replay import start_source_vm
from takeover.agent.sandbox import AgentUser, SandboxError, run_as_agent, sandbox_argv
from takeover.errors import DiskMismatch
from takeover.models import CHECKPOINT_TAG, Endpoint
from takeover.steps.checkpoint import save_checkpoint_and_stop
from takeover.steps.context import DISK_NAME
from takeover.steps.find_vm import explicit_ready, find_and_check_vm
from takeover.steps.relocate import relocate_disk

from .takeover_helpers import (
    AGENT,
    HOST_SYSTEM_CACHE,
    agent_image,
    assert_replayed_and_quit,
    open_appliance,
    start_monitor_only_qemu,
)


def sandboxed(agent_user, script: str, timeout: float = 20) -> tuple[int, str, str]:
    user = AgentUser(agent_user.pw_uid, agent_user.pw_gid, (agent_user.pw_gid,))
    result = run_as_agent(["sh", "-c", script], user, timeout=timeout)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


# -- the sandbox -----------------------------------------------------------------------------------


@pytest.mark.root
def test_the_sandbox_is_the_agent_without_privileges_network_or_a_terminal(agent_user):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        code, out, err = sandboxed(
            agent_user,
            f"""
            id -u; id -G
            grep -E '^(NoNewPrivs|CapEff|CapPrm|CapBnd|CapAmb):' /proc/self/status
            tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '
            echo "sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$ tty=$(cut -d' ' -f7 /proc/$$/stat)"
            cat /etc/shadow >/dev/null 2>&1 || echo shadow-denied
            python3 -I -c 'import socket; socket.create_connection(("127.0.0.1", {port}), timeout=2)' \\
                2>/dev/null || echo connect-failed
            env | sort | tr '\\n' ' '; echo
        """,
        )
    finally:
        listener.close()
    lines = out.splitlines()
    assert code == 0, err
    assert lines[0] == str(agent_user.pw_uid) and lines[1] == str(agent_user.pw_gid)
    status = dict(line.split(":\t") for line in lines[2:7])
    assert status == {"NoNewPrivs": "1", "CapEff": "0" * 16, "CapPrm": "0" * 16, "CapBnd": "0" * 16, "CapAmb": "0" * 16}
    assert lines[7] == "lo"  # a network namespace of its own, with nothing but loopback
    sid, pid, tty = (field.split("=")[1] for field in lines[8].split())
    assert sid == pid and tty == "0"  # a session of its own, no controlling terminal
    assert lines[9:11] == ["shadow-denied", "connect-failed"]
    assert set(lines[11].split()) <= {"PATH=/usr/bin:/bin", "LANG=C.UTF-8", "HOME=/nonexistent", "PWD=/"}


@pytest.mark.root
def test_the_sandbox_writes_no_file_and_its_output_and_time_are_bounded(agent_user, agent_dir):
    code, _, _ = sandboxed(agent_user, f"echo planted > {agent_dir}/planted")
    assert code != 0 and os.path.getsize(agent_dir / "planted") == 0  # RLIMIT_FSIZE 0: not one byte
    with pytest.raises(SandboxError, match="printed more than"):
        sandboxed(agent_user, "yes")
    started = time.monotonic()
    with pytest.raises(SandboxError, match="did not finish within 1 s"):
        sandboxed(agent_user, "sleep 30 & sleep 30", timeout=1)
    assert time.monotonic() - started < 10


def test_the_sandbox_never_runs_as_root():
    for user in (AgentUser(0, 1000), AgentUser(1000, 0), AgentUser(1000, 1000, (1000, 0))):
        with pytest.raises(SandboxError, match="never runs with root"):
            sandbox_argv(["true"], user, cpu_seconds=1)
    argv = sandbox_argv(["qemu-img", "info"], AgentUser(1000, 1000), cpu_seconds=5)
    assert argv[:3] == ["unshare", "--net", "--"] and "--no-new-privs" in argv and "--clear-groups" in argv
    assert "--fsize=0:0" in argv and argv[-2:] == ["qemu-img", "info"]


# -- the NBD server the sandboxed qemu-img writes to -----------------------------------------------


class Client:
    """Just enough of an NBD client to play a hostile qemu-img."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def handshake(self) -> int:
        assert self.recv(18)[:8] == b"NBDMAGIC"
        self.sock.sendall(struct.pack(">I", 3))
        data = struct.pack(">I", 0) + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", nbd_sink.IHAVEOPT, nbd_sink.OPT_GO, len(data)) + data)
        size = None
        while True:
            _, _, kind, length = struct.unpack(">QIII", self.recv(20))
            payload = self.recv(length)
            if kind == nbd_sink.REP_INFO:
                size = struct.unpack(">Q", payload[2:10])[0]
            if kind == nbd_sink.REP_ACK:
                return size

    def request(self, kind: int, offset: int, length: int, data: bytes = b"", magic: int = nbd_sink.REQUEST_MAGIC):
        self.sock.sendall(struct.pack(">IHHQQI", magic, 0, kind, 7, offset, length) + data)

    def reply(self) -> int:
        magic, error, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd_sink.SIMPLE_REPLY_MAGIC and handle == 7
        return error


def serve(tmp_path: Path, play, *, size: int = 2**20, budget: int = 2**30, idle: float = 5.0):
    """Run the server on one end of a socketpair while `play(client)` drives the other end."""
    ours, theirs = socket.socketpair()
    fd = os.open(tmp_path / "raw", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    thread = threading.Thread(target=play, args=(Client(theirs),), daemon=True)
    thread.start()
    try:
        return nbd_sink.serve_writes(ours, fd, size, budget=budget, idle_timeout=idle, deadline=time.monotonic() + 30)
    finally:
        os.close(fd)
        ours.close()
        thread.join(5)
        theirs.close()


def test_the_nbd_server_takes_writes_and_refuses_anything_past_the_end(tmp_path):
    errors = []

    def play(c: Client) -> None:
        assert c.handshake() == 2**20
        c.request(nbd_sink.CMD_WRITE, 4096, 5, b"hello")
        errors.append(c.reply())
        c.request(nbd_sink.CMD_WRITE, 2**20 - 2, 5, b"tail!")  # past the end of the export
        errors.append(c.reply())
        c.request(9, 0, 0)  # a command the server does not know
        errors.append(c.reply())
        c.request(nbd_sink.CMD_DISC, 0, 0)

    result = serve(tmp_path, play)
    assert errors == [0, 28, 22] and result.written == 5  # ENOSPC, EINVAL
    data = (tmp_path / "raw").read_bytes()
    assert len(data) == 2**20 and data[4096:4101] == b"hello" and data.count(0) == 2**20 - 5


@pytest.mark.parametrize(
    "attack, message",
    [
        (lambda c: (c.handshake(), c.request(nbd_sink.CMD_WRITE, 0, 1, b"x", magic=0xDEADBEEF)), "request magic"),
        (lambda c: (c.handshake(), c.request(nbd_sink.CMD_WRITE, 0, 64 * 2**20)), "larger than"),
        (lambda c: (c.handshake(), c.sock.shutdown(socket.SHUT_WR)), "closed the connection"),
        (lambda c: (c.recv(18), c.sock.sendall(struct.pack(">I", 0xFF))), "client flags"),
        (
            lambda c: (
                c.recv(18),
                c.sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd_sink.IHAVEOPT, 99, 2**20)),
            ),
            "option of",
        ),
        (lambda c: time.sleep(3), "sent nothing for 1 s"),
    ],
)
def test_a_hostile_nbd_peer_ends_the_session_with_an_error(tmp_path, attack, message):
    started = time.monotonic()
    with pytest.raises(nbd_sink.SinkError, match=message):
        serve(tmp_path, attack, idle=1.0)
    assert time.monotonic() - started < 10


def test_the_nbd_server_stops_at_its_budget(tmp_path):
    def play(c: Client) -> None:
        c.handshake()
        for i in range(4):
            c.request(nbd_sink.CMD_WRITE, i * 2**20, 2**20, b"\x01" * 2**20)
            if c.reply():
                return

    with pytest.raises(nbd_sink.SinkError, match="more than 2 MiB") as err:
        serve(tmp_path, play, size=8 * 2**20, budget=2 * 2**20)
    assert err.value.over_budget


# -- QEMU's view of the chain (step 1) --------------------------------------------------------------


def block(disk: str, chain: list[str], ro: bool = False) -> dict:
    image: dict = {"format": "qcow2", "filename": disk}
    node = image
    for fmt in chain:
        node["backing-image"] = {"format": fmt, "filename": f"/base.{fmt}"}
        node = node["backing-image"]
    return {
        "device": "d0",
        "inserted": {
            "node-name": "top",
            "file": disk,
            "drv": "qcow2",
            "ro": ro,
            "backing_file_depth": len(chain),
            "image": image,
            **({"backing_file": "/base"} if chain else {}),
        },
    }


def test_step_1_accepts_an_overlay_on_a_base_image_and_refuses_long_or_odd_chains():
    disk = "/agent/disk.qcow2"
    seed = {"device": "seed", "inserted": {"node-name": "seed", "file": "/agent/seed.iso", "drv": "raw", "ro": True}}
    assert disk_nodes([block(disk, ["qcow2"]), seed], Path(disk)) == (["top"], "top")
    assert disk_nodes([block(disk, ["qcow2", "raw"])], Path(disk)) == (["top"], "top")
    with pytest.raises(DiskMismatch, match="over 3 backing files"):
        disk_nodes([block(disk, ["qcow2", "qcow2", "qcow2"])], Path(disk))
    with pytest.raises(DiskMismatch, match="'vmdk'"):
        disk_nodes([block(disk, ["vmdk"])], Path(disk))


# -- step 1, 2, 3 and rollback on a real QEMU (as the agent) whose disk has a backing file ----------


@pytest.mark.root
def test_checkpoint_relocation_and_rollback_work_over_a_backing_file(agent_user, agent_dir, host_dir):
    base = agent_image(agent_user, agent_dir / "base.qcow2", fill="write -P 0x41 0 1M")
    os.chmod(base, 0o444)  # the user's cloud image: read-only, never written
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    disk = agent_image(
        agent_user, agent_dir / "disk.qcow2", "64M", "-b", str(base), "-F", "qcow2", fill="write -P 0x42 2M 1M"
    )
    vm = start_monitor_only_qemu(agent_dir, disk, user=AGENT)
    try:
        source = find_and_check_vm(explicit_ready(vm.monitor, disk), host_dir)
        assert source.uid == agent_user.pw_uid and source.block_nodes == [source.vmstate_node]
        assert inspect_image(disk, force_share=True).backing[0].path == str(base)  # read as the agent

        save_checkpoint_and_stop(source)  # the snapshot lands in the overlay only
        assert inspect_image(disk).snapshots == (CHECKPOINT_TAG,)
        assert inspect_image(base).snapshots == ()
        assert hashlib.sha256(base.read_bytes()).hexdigest() == before

        result = relocate_disk(disk, host_dir, expect_inode=(source.disk_dev, source.disk_ino))
        copy = inspect_image(host_dir / DISK_NAME)  # root's: self-contained, and without the agent's RAM
        assert copy.backing == () and copy.snapshots == () and result.backing_files == [str(base)]
        assert (
            subprocess.run(
                ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(disk), str(host_dir / DISK_NAME)],
                capture_output=True,
            ).returncode
            == 0
        )

        # Rollback: the agent's own command line, as the agent, from the overlay's checkpoint.
        start_source_vm(source, host_dir / "rollback-qemu.log")
        assert_replayed_and_quit(vm.monitor, agent_user.pw_uid)
    finally:
        vm.kill()
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before


# -- end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.root
def test_a_vm_on_a_cloud_image_is_taken_over_and_the_agent_keeps_only_http(tmp_path):
    from scripts import demo

    from .cloud_image import cloud_base_image
    from .takeover_helpers import E2E_QEMU_USER, host_ssh, stop_host_vm, takeover_run
    from .vm_fixtures import AGENT_USER, AgentVM, free_port, up_agent_vm_on

    base = cloud_base_image()
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    host_dir = tmp_path / "host"
    ssh_port = free_port()
    token_file = tmp_path / "alice.token"
    vm = up_agent_vm_on(base, "agent-cloud-takeover-")
    state = vm.state

    def http(method: str, path: str, token: str = "", body: dict | None = None) -> tuple[int, dict]:
        status, text = demo.agent_http(AGENT_USER, method, vm.url + path, token, body)[0]
        return status, json.loads(text or "{}")

    try:
        assert json.loads((state / "image/manifest.json").read_text())["disk"]["backing_file"] == str(base)

        result = takeover_run(
            vm.ready,
            host_dir,
            "--accel",
            "tcg",
            "--agent-name",
            "alice",
            "--agent-secrets",
            "api-*",
            "--token-file",
            str(token_file),
            "--qemu-user",
            E2E_QEMU_USER,
            ssh_port=ssh_port,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        report = json.loads((host_dir / "report.json").read_text())
        assert report["disk"]["backing_files"] == [str(base)] and report["disk"]["agent_uid"] == vm.uid

        # The host's disk: root's, 0600, one self-contained qcow2 (nothing of the base image's path in it).
        st = os.stat(host_dir / DISK_NAME)
        assert st.st_uid == 0 and st.st_mode & 0o777 == 0o600
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(host_dir / DISK_NAME)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )  # the VM holds it
        assert info["format"] == "qcow2" and not any(k.startswith(("backing", "full-backing")) for k in info)

        # The host's VM answers; the agent has HTTP with the token the host made, and nothing else.
        assert http("GET", "/health") == (200, {"status": "ok"})
        stored = host_ssh(
            host_dir, ssh_port, "/usr/local/bin/secret-proxy", "secrets", "set", "api-key", stdin="sk-cloud-0123456789"
        )
        assert stored.returncode == 0, stored.stderr
        token = token_file.read_text().strip()
        status, body = http("POST", "/v1/requests", token, {"secret": "api-key", "reason": "cloud e2e"})
        assert status == 201 and body["status"] == "pending", body
        login = AgentVM(state, vm.ready, vm.proxy_port, ssh_port, vm.uid).ssh_as_agent("true")
        assert login.returncode != 0 and "Permission denied" in login.stderr
        old_login = vm.ssh_as_agent("true")  # the agent's own forward is gone with its QEMU
        assert old_login.returncode != 0
        assert not (state / "image/disk.qcow2").exists()  # the agent's overlay is revoked
    finally:
        stop_host_vm(host_dir)
        vm.discard()
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before  # the user's image was never written
    print(f"\ncloud takeover steps (s): { {s['step']: s.get('duration_s') for s in report['steps']} }", file=sys.stderr)


MARKER = b"agent-bytes-7f3a9c"


@pytest.mark.slow
@pytest.mark.root
def test_the_rebuild_never_mounts_the_agents_filesystem_and_drops_its_partition_table(tmp_path):
    """A cloud image's disk is partitioned; the agent's filesystem in it may be built to hurt its parser.

    With the rebuild (the default) the appliance never reads it: the host's copy is replaced by a blank
    disk of the same size before libguestfs starts, then formatted whole.
    """
    from takeover.guest.scrub import ScrubPlan, scrub_and_rekey
    from takeover.host.keys import generate_host_keys
    from vm_image.disk import write_system_overlay
    from vm_image.rootfs import base_rootfs

    raw = tmp_path / "agent.raw"
    with open(raw, "wb") as f:
        f.truncate(2 * 2**30)
        # An MBR with one Linux partition from 1 MiB to the end, holding an "ext4" that is garbage
        # after its magic number: mounting it would hand ext4 a hostile superblock.
        entry = struct.pack("<B3sB3sII", 0x80, b"\0\0\0", 0x83, b"\0\0\0", 2048, 4 * 2**20 - 2048)
        f.seek(446)
        f.write(entry + bytes(48) + b"\x55\xaa")
        f.seek(2**20)
        f.write(os.urandom(2**20))
        f.seek(2**20 + 1024 + 0x38)
        f.write(b"\x53\xef")  # ext2/3/4 superblock magic
        f.seek(2**30)
        f.write(MARKER * 1024)  # data the agent left: nothing of it may reach the host's disk
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True)
    HOST_SYSTEM_CACHE.mkdir(parents=True, exist_ok=True)
    host_dir = tmp_path / "host"
    host_dir.mkdir(mode=0o700)
    plan = ScrubPlan(
        keys=generate_host_keys(host_dir, Endpoint("127.0.0.1", 2223)),
        proxy_config=None,
        system_tar=base_rootfs(HOST_SYSTEM_CACHE),
        system_overlay=write_system_overlay(tmp_path / "overlay.tar"),
    )
    result = scrub_and_rekey(disk, plan)
    assert {"path": "/", "action": "replaced"}.items() <= result.changes[0].items()
    assert "blank" in result.seconds and os.stat(disk).st_mode & 0o777 == 0o600
    after = tmp_path / "after.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(after)], check=True)
    with open(after, "rb") as f:
        assert not any(MARKER in chunk for chunk in iter(lambda: f.read(2**24), b""))
    g = open_appliance(disk, readonly=True)
    try:
        assert g.list_partitions() == [] and g.list_filesystems() == {"/dev/sda": "ext4"}
        g.mount_ro("/dev/sda", "/")
        assert g.is_file("/usr/sbin/sshd") and "proxy:" in g.cat("/etc/passwd")
    finally:
        g.close()
