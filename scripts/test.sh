#!/usr/bin/env bash
# The project's test command: installs what the tests need (once), then runs every test.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers and tools the integration tests drive: NBD clients and servers, fio, loop devices.
packages=(fio libnbd-bin nbdkit qemu-utils fuse3 e2fsprogs python3-libnbd util-linux cryptsetup-bin python3-cryptography libssl-dev pkg-config openssl mdadm iproute2)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "warning: missing packages (${missing[*]}); tests that need them will fail" >&2
    fi
fi

cargo test --workspace --release "$@"
