"""The files the host writes into the guest, in full: none of them is the agent's text."""

from __future__ import annotations

# The proxy's unit and CLI wrapper are vm_image's text, written again by the host (one source for both).
from vm_image.guest_files import UNIT as UNIT
from vm_image.guest_files import WRAPPER as WRAPPER

HEADER = "# Written by the host's takeover (python -m takeover); what the agent left here is gone.\n"

# Only the host's key, only as proxy, no passwords, no PAM (its stack is the agent's), no
# forwarding, no per-user rc or environment, no drop-ins (no Include).
SSHD_CONFIG = (
    HEADER
    + """\
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
)

SUDOERS = (
    HEADER
    + """\
Defaults	env_reset
Defaults	mail_badpass
Defaults	secure_path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
Defaults	use_pty
root	ALL=(ALL:ALL) ALL
"""
)

BASH_BASHRC = (
    HEADER
    + """\
[ -z "$PS1" ] && return
PS1='\\u@\\h:\\w\\$ '
"""
)

PROFILE = (
    HEADER
    + """\
PATH="/usr/local/bin:/usr/bin:/bin"
export PATH
"""
)
