"""The files our build writes into the guest, in full (docs/architecture.md, "The guest"), and its paths and ports.

`takeover` writes the same unit and wrapper again after its scrub, so what runs
the proxy is the host's text whatever the agent did to the image.
"""

from __future__ import annotations

PROXY_USER = "proxy"
PROXY_UID = PROXY_GID = 13  # Debian's base-passwd has `proxy` at 13 in every image
PROXY_HOME = "/home/proxy"
DATA_DIR = "/var/lib/secret-proxy"
VENV = "/opt/secret-proxy/venv"
PROXY_PORT = 3737
# The proxy's metrics listener, on the guest's loopback only: QEMU's forwards reach 10.0.2.15, never
# 127.0.0.1, so only a login in the guest (the host's SSH key) reads it (`secret-proxy metrics`).
METRICS_LISTEN = "127.0.0.1:9737"
ROOT_DEVICE = "/dev/vda"  # the one virtio disk (KERNEL_APPEND's root=)
SSH_PORT = 22

# The operator CLI with the service's data directory. -I: no current directory, no user site,
# no PYTHON* variables on sys.path, so nothing in the caller's directory or environment is imported.
WRAPPER = f"""#!/bin/sh
# The proxy's operator CLI with the service's data directory.
exec {VENV}/bin/python -I -m proxy --data-dir {DATA_DIR} "$@"
"""

# A restore is pending while either directory of proxy/restore.py (STAGED, OLD) is in the data directory;
# vm_image never imports proxy, so tests/test_backup.py keeps the names equal.
RESTORE_DIRS = ("restore.staged", "restore.old")
RESTORE_PENDING = " || ".join(f"test -d {DATA_DIR}/{name}" for name in RESTORE_DIRS)

UNIT = f"""\
# secret-proxy.service (vm_image; rewritten by the host's takeover).
[Unit]
Description=secret-proxy: secret approvals for AI agents
After=network.target

[Service]
Type=simple
User=proxy
Group=proxy
Environment=SECRET_PROXY_DATA_DIR={DATA_DIR}
# A restore staged by the host (`secret-proxy restore stage`) is swapped in here, before anything opens the
# store; a swap a crash interrupted is finished. Python starts only when there is something to do.
ExecStartPre=/bin/sh -c '{RESTORE_PENDING} || exit 0; exec {VENV}/bin/python -I -m proxy restore apply-staged'
ExecStartPre=/bin/sh -c 'test -e {DATA_DIR}/master.key || exec {VENV}/bin/python -I -m proxy init'
ExecStart={VENV}/bin/python -I -m proxy serve --host 0.0.0.0 --port {PROXY_PORT} --metrics-listen {METRICS_LISTEN}
Restart=on-failure
RestartSec=2
# Above the proxy's connection limit (max_connections, 2048): a flood gets 503s, not a failing accept().
LimitNOFILE=4096
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=yes
ReadWritePaths={DATA_DIR}
UMask=0077

[Install]
WantedBy=multi-user.target
"""

# QEMU's user-mode network answers DHCP at once; the guest is always 10.0.2.15.
NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"

# The agent's phase: its setup key as `proxy`, nothing else. The takeover replaces all of sshd's config.
SSHD_DROPIN = """\
# vm_image: key-only SSH, as the proxy user only.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PermitEmptyPasswords no
AllowUsers proxy
"""

FSTAB = f"{ROOT_DEVICE} / ext4 rw,errors=remount-ro 0 1\n"
HOSTNAME = "secret-proxy-vm\n"
HOSTS = "127.0.0.1\tlocalhost\n127.0.1.1\tsecret-proxy-vm\n::1\tlocalhost ip6-localhost ip6-loopback\n"
