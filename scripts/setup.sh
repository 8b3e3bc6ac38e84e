#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian 12 machine (run as root), then
# builds .venv on Debian's python3 with system site packages, because libguestfs's
# Python bindings come only from Debian (python3-guestfs).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-pip python3-guestfs
  qemu-system-x86 qemu-utils mmdebstrap uidmap debian-archive-keyring
  libguestfs-tools linux-image-amd64 openssh-client openssh-server
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc
  sqlite3 curl ca-certificates wrk genisoimage
  nftables tinyproxy-bin iproute2 systemd util-linux
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}; run this as root (or apt-get install them)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v uv >/dev/null 2>&1; then
  echo "setup: installing uv from PyPI"
  python3 -m pip install -q uv 2>/dev/null || /usr/bin/python3 -m pip install -q --break-system-packages uv
fi
UV=$(command -v uv || echo "$HOME/.local/bin/uv")

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import guestfs' 2>/dev/null; then
  rm -rf .venv
  "$UV" venv -q --python /usr/bin/python3 --system-site-packages .venv
fi
"$UV" sync -q --frozen --extra host --extra agent --python .venv/bin/python
echo "setup: ready (.venv on $(.venv/bin/python --version))"
