"""`--base-image`: the proxy on a cloud image the user brings, provisioned by cloud-init from a NoCloud seed.

The seed is an ISO 9660 volume labelled `cidata` (what cloud-init's NoCloud
datasource looks for) holding `meta-data`, `user-data` and the proxy's venv as a
tarball, built from the same locked wheels as `vm_image build`. The user-data
is generated here in full; the only value from outside is the setup key, which
is checked to be one OpenSSH public key line and is written as a file, never
put into a command line. The image must run Debian 12's python3.11 (glibc),
because the venv is built for it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

from . import guest_files as gf
from .errors import BadInput, BuildFailed, MissingTool

SEED_LABEL = "cidata"
SEED_VENV = "proxy-venv.tar"
_KEY_LINE = re.compile(r"^(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa) [A-Za-z0-9+/=]+( [^\n\r]*)?$")

# Runs once, as root, from cloud-init's runcmd (argv form: no shell parses anything of ours but this).
PROVISION = f"""set -eu
usermod --home {gf.PROXY_HOME} --shell /bin/bash proxy
install -d -m 0750 -o proxy -g proxy {gf.PROXY_HOME}
install -d -m 0700 -o proxy -g proxy {gf.PROXY_HOME}/.ssh {gf.DATA_DIR}
chown proxy:proxy {gf.PROXY_HOME}/.ssh/authorized_keys
chmod 0600 {gf.PROXY_HOME}/.ssh/authorized_keys
install -d -m 0755 {gf.VENV} /run/secret-proxy-seed
mount -o ro LABEL={SEED_LABEL} /run/secret-proxy-seed
tar -xf /run/secret-proxy-seed/{SEED_VENV} -C {gf.VENV} --no-same-permissions
umount /run/secret-proxy-seed
systemctl daemon-reload
systemctl enable --now secret-proxy.service
systemctl reload ssh.service || systemctl restart ssh.service
"""


def check_public_key(text: str) -> str:
    line = text.strip()
    if "\n" in line or not _KEY_LINE.match(line):
        raise BadInput("the setup key is not a single OpenSSH public key line")
    return line


def user_data(setup_key_pub: str) -> str:
    """The #cloud-config document; JSON is YAML, so it is written with json.dumps (no quoting mistakes)."""
    config = {
        "disable_root": True,
        "ssh_pwauth": False,
        "users": [],  # no default user with sudo: the proxy user is the only login
        "write_files": [
            {
                "path": f"{gf.PROXY_HOME}/.ssh/authorized_keys",
                "permissions": "0600",
                "content": check_public_key(setup_key_pub) + "\n",
            },
            {"path": "/etc/systemd/system/secret-proxy.service", "permissions": "0644", "content": gf.UNIT},
            {"path": "/usr/local/bin/secret-proxy", "permissions": "0755", "content": gf.WRAPPER},
            {"path": "/etc/ssh/sshd_config.d/10-secret-proxy.conf", "permissions": "0644", "content": gf.SSHD_DROPIN},
        ],
        "runcmd": [["sh", "-c", PROVISION]],
    }
    return "#cloud-config\n" + json.dumps(config, indent=2) + "\n"


def meta_data(instance_id: str | None = None) -> str:
    return (
        json.dumps(
            {
                "instance-id": instance_id or f"secret-proxy-{uuid.uuid4().hex[:12]}",
                "local-hostname": gf.HOSTNAME.strip(),
            }
        )
        + "\n"
    )


def make_seed(out: Path, setup_key_pub: str, venv_tar: Path, work: Path) -> Path:
    """The NoCloud seed ISO at `out` (genisoimage, no root needed)."""
    tool = shutil.which("genisoimage")
    if tool is None:
        raise MissingTool("genisoimage is not installed (package genisoimage)")
    staging = work / "seed"
    staging.mkdir()
    (staging / "user-data").write_text(user_data(setup_key_pub))
    (staging / "meta-data").write_text(meta_data())
    shutil.copyfile(venv_tar, staging / SEED_VENV)
    partial = out.with_name(f".{out.name}.partial")
    result = subprocess.run(
        [
            tool,
            "-quiet",
            "-output",
            str(partial),
            "-volid",
            SEED_LABEL,
            "-joliet",
            "-rock",
            "--",
            str(staging / "user-data"),
            str(staging / "meta-data"),
            str(staging / SEED_VENV),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildFailed(f"genisoimage failed: {result.stderr.strip()[-400:]}")
    partial.replace(out)
    return out
