"""vm_image: the QEMU command line, the initrd, bad input refused before anything starts, and a real
build and boot by the unprivileged agent user under TCG."""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vm_image.errors import BadInput
from vm_image.initrd import build_initrd, module_closure
from vm_image.kvm_probe import Probe
from vm_image.qemu_command import VmConfig, choose_accel, qemu_argv
from vm_image.rootfs import PACKAGES, inputs_key, mmdebstrap_argv
from vm_image.ssh_command import agent_login_argv

from .vm_fixtures import as_agent, free_port, launch_agent_vm, vm_image_as_agent

ROOT = Path(__file__).resolve().parent.parent


def config(tmp_path: Path, **changes) -> VmConfig:
    base = dict(
        disk=tmp_path / "disk.qcow2",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        append="root=/dev/vda rw console=ttyS0",
        monitor=tmp_path / "qmp.sock",
        pidfile=tmp_path / "qemu.pid",
        serial_log=tmp_path / "serial.log",
    )
    return VmConfig(**{**base, **changes})


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_command_line_caps_the_translation_cache_and_forwards_only_loopback(tmp_path):
    argv = qemu_argv(config(tmp_path, accel="tcg", proxy_port=4000, ssh_port=4022, memory_mb=256))
    assert option(argv, "-accel") == ["tcg,tb-size=64"] and option(argv, "-cpu") == ["max"]
    assert option(argv, "-m") == ["256"]
    netdev = option(argv, "-netdev")[0]
    assert "hostfwd=tcp:127.0.0.1:4000-:3737" in netdev and "hostfwd=tcp:127.0.0.1:4022-:22" in netdev
    assert option(argv, "-qmp") == [f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off"]
    assert option(argv, "-pidfile") == [str(tmp_path / "qemu.pid")] and "-daemonize" in argv
    assert option(argv, "-serial") == [f"file:{tmp_path / 'serial.log'}"]
    assert option(argv, "-drive") == [f"file={tmp_path / 'disk.qcow2'},if=virtio,format=qcow2,discard=unmap"]
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_kvm_command_line_uses_the_host_cpu(tmp_path):
    argv = qemu_argv(config(tmp_path, accel="kvm"))
    assert option(argv, "-accel") == ["kvm"] and option(argv, "-cpu") == ["host"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"disk": Path("/x/a,b.qcow2")}, "comma"),
        ({"monitor": Path("relative/qmp.sock")}, "absolute"),
        ({"proxy_host": "localhost"}, "IPv4"),
        ({"proxy_host": "127.0.0.1,hostfwd=tcp::1-:22"}, "IPv4"),
        ({"ssh_port": 70000}, "TCP port"),
        ({"memory_mb": 64}, "out of range"),
    ],
)
def test_values_that_would_change_the_qemu_command_are_refused(tmp_path, changes, message):
    with pytest.raises(BadInput, match=message):
        qemu_argv(config(tmp_path, **changes))


def test_asking_for_kvm_without_a_usable_dev_kvm_is_a_clear_error(tmp_path):
    no_kvm = Probe(device=tmp_path / "kvm", cache_dir=tmp_path / "cache")  # a /dev/kvm that does not exist
    assert choose_accel("auto", no_kvm) == "tcg"
    with pytest.raises(BadInput, match="kvm does not open"):
        choose_accel("kvm", no_kvm)


def fake_module(path: Path, depends: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=6.1\0")
    return path


def test_module_closure_loads_dependencies_first(tmp_path):
    mods = tmp_path / "6.1.0-test"
    fake_module(mods / "kernel/drivers/virtio/virtio.ko", "")
    fake_module(mods / "kernel/drivers/virtio/virtio_ring.ko", "virtio")
    fake_module(mods / "kernel/drivers/virtio/virtio_pci.ko", "virtio_ring,virtio")
    fake_module(mods / "kernel/drivers/char/hw_random/virtio-rng.ko", "virtio_ring,virtio")
    (mods / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    order = [p.name for p in module_closure(mods, ["virtio_pci", "virtio_rng", "ext4"])]
    assert order == ["virtio.ko", "virtio_ring.ko", "virtio_pci.ko", "virtio-rng.ko"]
    with pytest.raises(FileNotFoundError, match="nosuch"):
        module_closure(mods, ["nosuch"])
    fake_module(mods / "kernel/a.ko", "b")
    fake_module(mods / "kernel/b.ko", "a")
    with pytest.raises(ValueError, match="cycle"):
        module_closure(mods, ["a"])


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc cpio archive the way the kernel does: {name: (mode, data)}."""
    entries, at = {}, 0
    while True:
        assert data[at : at + 6] == b"070701", f"bad magic at {at}"
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[at + 110 : at + 110 + namesize - 1].decode()
        at += 110 + namesize
        at += -at % 4
        body = data[at : at + size]
        at += size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body)


def test_initrd_is_a_newc_archive_with_init_busybox_and_modules_in_order(tmp_path):
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    mods = [fake_module(tmp_path / "m/virtio.ko", ""), fake_module(tmp_path / "m/virtio_blk.ko", "virtio")]
    out = build_initrd(busybox, mods, tmp_path / "initrd.img")
    entries = read_newc(gzip.decompress(out.read_bytes()))
    assert entries["init"][0] & 0o777 == 0o755 and b"switch_root /newroot /sbin/init" in entries["init"][1]
    assert entries["bin/busybox"][1] == b"\x7fELF busybox"
    assert entries["modules.order"][1] == b"virtio.ko\nvirtio_blk.ko\n"
    assert entries["modules/virtio_blk.ko"][1] == mods[1].read_bytes()
    assert build_initrd(busybox, mods, tmp_path / "again.img").read_bytes() == out.read_bytes()  # reproducible


def vm_image(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vm_image", *args], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env
    )


def fake_built_image(state: Path) -> None:
    (state / "image").mkdir(parents=True)
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (state / "image" / name).write_bytes(b"x")


def free_ports() -> list[str]:
    """Ports of the test's own, so that a demo left running on the defaults is never in the way."""
    return ["--port", str(free_port()), "--ssh-port", str(free_port())]


def test_extra_packages_are_installed_beside_the_base_and_cached_under_their_own_key(tmp_path):
    out = tmp_path / "rootfs.tar"
    plain = mmdebstrap_argv("unshare", out)
    extra = mmdebstrap_argv("unshare", out, extra_packages=("qemu-utils", "qemu-system-x86"))
    assert option_value(plain, "--include") == ",".join(PACKAGES)
    assert option_value(extra, "--include") == ",".join([*PACKAGES, "qemu-system-x86", "qemu-utils"])
    assert plain[-2:] == extra[-2:] == ["bookworm", str(out)]
    assert inputs_key(None, ("qemu-utils",)) != inputs_key(None)
    assert inputs_key(None, ("a", "b")) == inputs_key(None, ("b", "a"))


def option_value(argv: list[str], name: str) -> str:
    return next(a.partition("=")[2] for a in argv if a.startswith(name + "="))


def test_ssh_command_lines_read_no_config_and_end_options_before_the_remote_command(tmp_path):
    key = tmp_path / "setup_key"
    argv = agent_login_argv(2222, "-oProxyCommand=x", "true", key=key)
    assert argv[:3] == ["ssh", "-F", "/dev/null"]
    assert argv[-5:] == ["2222", "proxy@127.0.0.1", "--", "-oProxyCommand=x", "true"]
    assert argv[argv.index("-i") + 1] == str(key)
    password = agent_login_argv(2222, "true", user="root", options=("PreferredAuthentications=password",))
    assert "-i" not in password and "root@127.0.0.1" in password
    option = password.index("PreferredAuthentications=password")
    assert password[option - 1] == "-o" and option < password.index("root@127.0.0.1")


def test_launch_without_an_image_says_to_build_first(tmp_path):
    result = vm_image("launch", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 1
    assert "the image is not built" in result.stderr and "python -m vm_image build" in result.stderr


def test_launch_on_a_taken_port_fails_before_starting_anything(tmp_path):
    state = tmp_path / "state"
    fake_built_image(state)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = vm_image("launch", "--state-dir", str(state), "--port", str(port), "--accel", "tcg")
    assert result.returncode == 1 and f"127.0.0.1:{port} is already in use" in result.stderr
    assert "--port" in result.stderr
    assert not (state / "run/qemu.pid").exists() and not (state / "run/serial.log").exists()


def test_launch_refuses_an_existing_monitor_path(tmp_path):
    state = tmp_path / "state"
    fake_built_image(state)
    (state / "run").mkdir()
    (state / "run/qmp.sock").write_text("planted")
    result = vm_image("launch", "--state-dir", str(state), "--accel", "tcg", *free_ports())
    assert result.returncode == 1 and "qmp.sock already exists" in result.stderr
    assert (state / "run/qmp.sock").read_text() == "planted"


def test_launch_without_qemu_names_the_package(tmp_path):
    state = tmp_path / "state"
    fake_built_image(state)
    env = {"PATH": "/nonexistent", "HOME": str(tmp_path)}
    result = vm_image("launch", "--state-dir", str(state), *free_ports(), env=env)
    assert result.returncode == 1 and "apt-get install qemu-system-x86" in result.stderr


def test_build_refuses_a_silly_disk_size_before_building(tmp_path):
    result = vm_image("build", "--state-dir", str(tmp_path / "state"), "--disk-size", "10K")
    assert result.returncode == 1 and "between 512M and 64G" in result.stderr
    assert not (tmp_path / "state/cache").exists()


def test_status_of_a_vm_that_does_not_run(tmp_path):
    result = vm_image("status", "--state-dir", str(tmp_path / "state"), "--json")
    assert result.returncode == 3 and json.loads(result.stdout)["running"] is False


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
@pytest.mark.root
def test_agent_builds_launches_and_stops_the_vm():
    vm = launch_agent_vm(memory_mb=256)
    try:
        ready_text = vm.ready.read_text()
        assert ready_text.startswith("READY_FOR_TAKEOVER\n")
        ready = vm.ready_data
        assert ready["monitor"] == str(vm.state / "run/qmp.sock") and ready["disk"] == str(
            vm.state / "image/disk.qcow2"
        )
        assert ready["proxy"] == {"host": "127.0.0.1", "port": vm.proxy_port} and ready["memory_mb"] == 256
        print(f"\nboot to healthy under {ready['accel']}: {ready['boot_seconds']} s", file=sys.stderr)

        assert get_json(vm.url + "/health") == (200, {"status": "ok"})
        assert get_json(vm.url + "/v1/requests/x")[0] == 401

        # QMP answers on the agent's socket, from the agent's QEMU.
        qmp = as_agent(
            [
                sys.executable,
                "-c",
                "import sys; from vm_image import qmp; from pathlib import Path; "
                "print(qmp.execute(Path(sys.argv[1]), 'query-status')['status'])",
                ready["monitor"],
            ]
        )
        assert qmp.stdout.strip() == "running", qmp.stderr

        # SSH: the setup key logs in as proxy; the host key is the one the manifest names.
        who = vm.ssh_as_agent(
            "id -un; stat -c '%a %U' /var/lib/secret-proxy; for d in /proc/[0-9]*; do "
            "tr '\\0' ' ' < $d/cmdline 2>/dev/null | grep -q '[m] proxy serve' && stat -c %U $d; "
            "done | sort -u"
        )
        assert who.returncode == 0, who.stderr
        assert who.stdout.split("\n")[:3] == ["proxy", "700 proxy", "proxy"]
        manifest = json.loads((vm.state / "image/manifest.json").read_text())
        scan = subprocess.run(
            ["ssh-keyscan", "-t", "ed25519", "-p", str(vm.ssh_port), "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        fingerprint = subprocess.run(["ssh-keygen", "-lf", "-"], input=scan.stdout, capture_output=True, text=True)
        assert fingerprint.stdout.split()[1] == manifest["ssh"]["host_key_fingerprint"]
        password = as_agent(
            agent_login_argv(vm.ssh_port, "true", user="root", options=("PreferredAuthentications=password",)),
            timeout=60,
        )
        assert password.returncode == 255 and "publickey" in password.stderr and "password" not in password.stderr

        # The manifest: inputs and outputs a user can check; the disk is small.
        assert manifest["disk"]["bytes"] < 400 * 2**20
        assert "cryptography" in manifest["inputs"]["wheels"] and manifest["inputs"]["wheels"]["cryptography"]["sha256"]
        assert manifest["inputs"]["debian_packages"]["openssh-server"]
        assert "/opt/secret-proxy/venv/lib/python3.11/site-packages/proxy/store.py" in manifest["files"]
        # The agent's own tool (proxy/agent) runs outside the VM: none of it is in the guest.
        assert not [f for f in manifest["files"] if "/site-packages/proxy/agent" in f]

        status = json.loads(vm_image_as_agent("status", "--state-dir", str(vm.state), "--json").stdout)
        assert status["running"] and status["qmp_status"] == "running" and status["health"] == "ok"

        # A proxy that dies is restarted by systemd (Restart=on-failure): kill -9 it, a new one answers.
        find_pid = (
            "for d in /proc/[0-9]*; do tr '\\0' ' ' < $d/cmdline 2>/dev/null | "
            "grep -q '[m] proxy serve' && echo ${d#/proc/}; done; true"
        )
        before = vm.ssh_as_agent(find_pid).stdout.split()
        assert len(before) == 1, before
        assert vm.ssh_as_agent(f"kill -9 {before[0]}").returncode == 0
        deadline = time.monotonic() + 120
        while True:
            after = vm.ssh_as_agent(find_pid).stdout.split()
            try:
                if after and after != before and get_json(vm.url + "/health")[0] == 200:
                    break
            except OSError:
                pass  # still starting
            assert time.monotonic() < deadline, "the proxy did not come back after kill -9"
            time.sleep(1)
    finally:
        stopped = vm_image_as_agent("stop", "--state-dir", str(vm.state), "--timeout", "60", timeout=180)
    assert stopped.returncode == 0 and "VM powered down" in stopped.stdout
    assert not any((vm.state / "run" / n).exists() for n in ("qmp.sock", "qemu.pid", "ready"))

    # A second build with unchanged inputs reuses the image instead of rebuilding.
    again = vm_image_as_agent(
        "build",
        "--state-dir",
        "/var/tmp/secret-proxy-vm-tests/agent-image",
        "--cache-dir",
        "/var/tmp/secret-proxy-vm-tests/agent-cache",
    )
    assert again.returncode == 0 and "inputs unchanged: reusing" in again.stderr


# -- --base-image: a cloud image with a cloud-init NoCloud seed --------------------------------

SETUP_PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHl0dGhpc2lzYXRlc3RrZXlub3RyZWFsbHlhbmtleQ vm_image setup key"


def test_user_data_is_cloud_config_with_the_key_as_a_file_and_no_default_user():
    from vm_image.cloud_init import PROVISION, user_data

    text = user_data(SETUP_PUB)
    assert text.startswith("#cloud-config\n")
    config = json.loads(text.split("\n", 1)[1])  # JSON is YAML: what cloud-init reads
    files = {f["path"]: f for f in config["write_files"]}
    assert files["/home/proxy/.ssh/authorized_keys"]["content"] == SETUP_PUB + "\n"
    assert files["/home/proxy/.ssh/authorized_keys"]["permissions"] == "0600"
    assert (
        "ExecStart=/opt/secret-proxy/venv/bin/python -I -m proxy serve"
        in files["/etc/systemd/system/secret-proxy.service"]["content"]
    )
    assert config["users"] == [] and config["ssh_pwauth"] is False and config["disable_root"] is True
    assert config["runcmd"] == [["sh", "-c", PROVISION]] and SETUP_PUB not in PROVISION


@pytest.mark.parametrize("bad", [SETUP_PUB + "\nruncmd: [reboot]", "ssh-ed25519 AAAA$(reboot)", "", "hello"])
def test_a_setup_key_that_is_not_one_key_line_is_refused(bad):
    from vm_image.cloud_init import user_data

    with pytest.raises(BadInput, match="single OpenSSH public key"):
        user_data(bad)


def test_seed_is_an_iso_labelled_cidata_with_user_data_meta_data_and_the_venv(tmp_path):
    from vm_image.cloud_init import make_seed, user_data

    venv = tmp_path / "venv.tar"
    venv.write_bytes(b"venv tarball")
    seed = make_seed(tmp_path / "seed.iso", SETUP_PUB, venv, tmp_path)
    info = subprocess.run(["isoinfo", "-d", "-i", str(seed)], capture_output=True, text=True, check=True).stdout
    assert "Volume id: cidata" in info
    listing = subprocess.run(["isoinfo", "-R", "-f", "-i", str(seed)], capture_output=True, text=True).stdout.split()
    assert sorted(listing) == ["/meta-data", "/proxy-venv.tar", "/user-data"]
    extracted = subprocess.run(
        ["isoinfo", "-R", "-x", "/user-data", "-i", str(seed)], capture_output=True, text=True
    ).stdout
    assert extracted == user_data(SETUP_PUB)
    meta = json.loads(
        subprocess.run(["isoinfo", "-R", "-x", "/meta-data", "-i", str(seed)], capture_output=True, text=True).stdout
    )
    assert meta["instance-id"].startswith("secret-proxy-") and meta["local-hostname"] == "secret-proxy-vm"


def test_base_image_boots_its_own_bootloader_with_the_seed_read_only(tmp_path):
    argv = qemu_argv(config(tmp_path, kernel=None, initrd=None, seed=tmp_path / "seed.iso"))
    assert "-kernel" not in argv and "-initrd" not in argv and "-append" not in argv
    assert f"file={tmp_path / 'seed.iso'},if=virtio,format=raw,readonly=on" in option(argv, "-drive")


def test_base_image_that_is_not_an_image_is_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a disk\n" * 100)
    result = vm_image("build", "--state-dir", str(tmp_path / "state"), "--base-image", str(text))
    assert result.returncode == 1 and "is not a disk image" in result.stderr
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    layered = tmp_path / "layered.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(layered)], check=True
    )
    result = vm_image("build", "--state-dir", str(tmp_path / "state"), "--base-image", str(layered))
    assert result.returncode == 1 and "backing file of its own" in result.stderr


@pytest.mark.slow
@pytest.mark.root
def test_agent_runs_the_proxy_on_a_cloud_image_through_cloud_init():
    from .cloud_image import cloud_base_image
    from .vm_fixtures import up_agent_vm_on

    base = cloud_base_image()
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    vm = up_agent_vm_on(base, "agent-cloud-")
    try:
        print(f"\ncloud image to healthy under TCG: {vm.ready_data['boot_seconds']} s", file=sys.stderr)
        assert get_json(vm.url + "/health") == (200, {"status": "ok"})
        who = vm.ssh_as_agent("id -un; stat -c '%U %a' /opt/secret-proxy/venv/bin/python3 /var/lib/secret-proxy")
        assert who.returncode == 0, who.stderr
        assert who.stdout.split("\n")[:3] == ["proxy", "root 777", "proxy 700"]  # python3 is a symlink
        manifest = json.loads((vm.state / "image/manifest.json").read_text())
        assert manifest["mode"] == "base-image" and manifest["disk"]["backing_file"] == str(base)
    finally:
        vm.stop()
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before  # the overlay took every write
