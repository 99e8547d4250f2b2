#!/usr/bin/env bash
# Installs what building and testing blip needs on a Debian machine (run as root): a C
# toolchain, libibverbs/librdmacm headers and libclang (rdma-sys generates its bindings with
# bindgen at build time), iproute2 (network-namespace tests), QEMU (the benchmark's peer VMM and
# the soft-RoCE hosts) and a font for the benchmark plots.
# Idempotent: packages already present are not reinstalled. Rust itself comes from rustup
# (blip needs Rust >= 1.85); Debian's own rustc is too old for blip's dependencies.
set -euo pipefail

need=()
for pkg in build-essential pkg-config libibverbs-dev librdmacm-dev libclang-dev util-linux \
    iproute2 procps qemu-system-x86 fonts-dejavu-core; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "ci/setup.sh: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "ci/setup.sh: no cargo found; install Rust >= 1.85 with rustup (https://rustup.rs)" >&2
        exit 1
    fi
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

if [ ! -e /dev/kvm ]; then
    modprobe kvm_amd 2>/dev/null || modprobe kvm_intel 2>/dev/null || true
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "ci/setup.sh: /dev/kvm is missing or not accessible; blip needs KVM" >&2
    exit 1
fi
