#!/usr/bin/env bash
# Install the Debian packages QWAMOS needs (QEMU for x86_64 and arm64, NBD tools, fio, python3-venv, a C compiler
# with the Python and OpenSSL headers for the block-runs extension (src/qwamos/_aead_runs.c), and
# virt-xml-validate with its xmllint to check `qwamos vm domxml` against libvirt's schema, zsh to check the
# generated completion), Ceph 16 (one-node test cluster: scripts/ceph-cluster.sh; librbd for rbd: volumes), and
# enable the arm64 foreign architecture so tools/build_guest.py can `apt-get download` arm64 guest packages.
# Idempotent and quick when everything is there: apt-get update runs only when something is missing.
set -euo pipefail

PACKAGES=(
    qemu-utils qemu-system-x86 qemu-system-arm ipxe-qemu
    libnbd-bin nbdkit fio
    libvirt-clients libxml2-utils
    zsh
    python3 python3-venv python3-dev gcc libc6-dev libssl-dev ca-certificates
    xz-utils zstd coreutils
    ceph-mon ceph-mgr ceph-osd ceph-common python3-rbd python3-rados qemu-block-extra
)

if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then
        exec sudo bash "$0" "$@"
    fi
    echo "install-deps: needs root (or sudo) to install Debian packages" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

need_update=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "install-deps: dpkg --add-architecture arm64"
    dpkg --add-architecture arm64
    need_update=1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$pkg")
done

# The guest builder needs the arm64 package lists; an earlier update without arm64 leaves them absent.
if ! apt-cache show busybox-static:arm64 >/dev/null 2>&1; then
    need_update=1
fi

if ((${#missing[@]})) || ((need_update)); then
    echo "install-deps: apt-get update"
    apt-get update -q
fi
if ((${#missing[@]})); then
    echo "install-deps: installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
echo "install-deps: all packages present"
