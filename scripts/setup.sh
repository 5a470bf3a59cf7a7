#!/usr/bin/env bash
# One-shot, idempotent set-up of a fresh Debian 12 machine for netbpf (run as root).
# Installs system packages, links kernel headers for bcc, mounts bpffs, builds .venv.
# Quick when everything is already there: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (installs packages, mounts bpffs)" >&2
    exit 1
fi

PKGS=(python3-bpfcc bpfcc-tools libbpfcc clang llvm libbpf1 libbpf-dev bpftool
      linux-headers-amd64 iproute2 netsniff-ng iputils-ping nftables iptables
      python3-venv python3-pip xdp-tools tcpdump make procps ethtool ipset)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# bcc needs kernel headers at /lib/modules/$(uname -r)/{build,source}. The running kernel ships
# none (and no IKHEADERS), so point at Debian's split headers; networking programs only use UAPI.
KREL=$(uname -r)
MOD=/lib/modules/$KREL
if [ ! -e "$MOD/build/include" ]; then
    HDR=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
    COMMON=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)
    if [ -z "$HDR" ] || [ -z "$COMMON" ]; then
        echo "setup: no Debian kernel headers under /usr/src (linux-headers-amd64 failed?)" >&2
        exit 1
    fi
    mkdir -p "$MOD"
    ln -sfn "$HDR" "$MOD/build"
    ln -sfn "$COMMON" "$MOD/source"
    echo "setup: linked $MOD/build -> $HDR, $MOD/source -> $COMMON"
fi

if ! mountpoint -q /sys/fs/bpf || [ "$(stat -f -c %T /sys/fs/bpf)" != "bpf_fs" ]; then
    mount -t bpf bpf /sys/fs/bpf
    echo "setup: mounted bpffs on /sys/fs/bpf"
fi

# bcc lives in /usr/lib/python3/dist-packages: the venv must be built by Debian's python
# with system site-packages so 'import bcc' works next to the PyPI dependencies.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
STAMP=.venv/.netbpf-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$STAMP"
fi
.venv/bin/python -c 'import bcc, pyroute2, scapy, pydantic, netbpf, ansible' \
    || { echo "setup: the venv cannot import its dependencies" >&2; exit 1; }
bash scripts/install-unit.sh
echo "setup: ready ($(.venv/bin/python --version), bcc from $(.venv/bin/python -c 'import bcc,os;print(os.path.dirname(bcc.__file__))'))"
