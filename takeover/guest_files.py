"""The files the host writes into the guest, in full: none of them is the agent's text."""

from __future__ import annotations

HEADER = "# Written by the host's takeover (python -m takeover); what the agent left here is gone.\n"

# Only the host's key, only as proxy, no passwords, no PAM (its stack is the agent's), no
# forwarding, no per-user rc or environment, no drop-ins (no Include).
SSHD_CONFIG = HEADER + """\
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile .ssh/authorized_keys
AuthorizedKeysCommand none
AuthorizedPrincipalsCommand none
AuthorizedPrincipalsFile none
TrustedUserCAKeys none
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
GSSAPIAuthentication no
PermitRootLogin no
PermitEmptyPasswords no
PermitUserEnvironment no
PermitUserRC no
StrictModes yes
UsePAM no
AllowUsers proxy
DisableForwarding yes
PermitTunnel no
X11Forwarding no
PrintMotd no
MaxAuthTries 3
LogLevel VERBOSE
"""

SUDOERS = HEADER + """\
Defaults	env_reset
Defaults	mail_badpass
Defaults	secure_path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
Defaults	use_pty
root	ALL=(ALL:ALL) ALL
"""

BASH_BASHRC = HEADER + """\
[ -z "$PS1" ] && return
PS1='\\u@\\h:\\w\\$ '
"""

PROFILE = HEADER + """\
PATH="/usr/local/bin:/usr/bin:/bin"
export PATH
"""

# The operator CLI with the service's data directory. -I: no current directory, no user site,
# no PYTHON* variables on sys.path, so nothing in the caller's directory or environment is imported.
WRAPPER = """#!/bin/sh
# Written by the host's takeover: the proxy's operator CLI with the service's data directory.
exec /opt/secret-proxy/venv/bin/python -I -m proxy --data-dir /var/lib/secret-proxy "$@"
"""

# The host's own unit for the proxy, used when vm_image does not ship one (docs/architecture.md).
UNIT = """\
# Written by the host's takeover (python -m takeover).
[Unit]
Description=secret-proxy: secret approvals for AI agents
After=network.target

[Service]
Type=simple
User=proxy
Group=proxy
Environment=SECRET_PROXY_DATA_DIR=/var/lib/secret-proxy
ExecStartPre=/bin/sh -c 'test -e /var/lib/secret-proxy/master.key || exec /opt/secret-proxy/venv/bin/python -I -m proxy init'
ExecStart=/opt/secret-proxy/venv/bin/python -I -m proxy serve --host 0.0.0.0 --port 3737
Restart=on-failure
RestartSec=2
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=yes
ReadWritePaths=/var/lib/secret-proxy
UMask=0077

[Install]
WantedBy=multi-user.target
"""
