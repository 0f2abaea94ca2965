#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root).
#
# Installs the system packages ambient's data path and tests use, then a virtual
# environment in .venv with the Python dependencies.
#
# Python versus bcc: bcc (eBPF) ships only as Debian's python3-bpfcc, a pure-Python
# package in /usr/lib/python3/dist-packages that loads libbcc.so with ctypes.  pyenv's
# or any other Python does not see Debian's dist-packages, and a venv with
# --system-site-packages would drag every Debian Python package in.  So the venv is
# made from Debian's own /usr/bin/python3 (3.11, always present on Debian 12) without
# system site packages, and a .pth file puts a folder holding only symlinks to `bcc`
# and `nftables` on its path.  Nothing else from Debian leaks in.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc make
  iproute2 iptables nftables python3-nftables ipset
  bpfcc-tools python3-bpfcc libbpfcc bpftool linux-libc-dev
  containernetworking-plugins
  curl procps psmisc
  stunnel4 haproxy iperf3 nghttp2-client wrk nginx-light  # make bench: peers and load tools
)
STAMP=.venv/.bootstrap-stamp
INPUTS_HASH=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: missing system packages (${missing[*]}); run as root or apt-get install them" >&2
    exit 1
  fi
  echo "bootstrap: installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS_HASH" ]; then
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv from Debian's /usr/bin/python3"
  /usr/bin/python3 -m venv .venv
fi
# bcc and nftables bindings from Debian, and nothing else from dist-packages.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p .venv/debian-bindings
for mod in bcc nftables; do
  [ -e "/usr/lib/python3/dist-packages/$mod" ] && ln -sfn "/usr/lib/python3/dist-packages/$mod" ".venv/debian-bindings/$mod"
done
echo "$(pwd)/.venv/debian-bindings" > "$site/debian-bindings.pth"

echo "bootstrap: installing Python dependencies into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
echo "$INPUTS_HASH" > "$STAMP"
echo "bootstrap: ready"
