#!/usr/bin/env bash
# Soak: N back-and-forth migrations of a dirtying guest between fresh local blip processes,
# with memory digests compared at every hop and the guest's own memory check at the end; then
# checks that nothing leaked (no blip process, no registry entry or socket left behind).
# Usage: ci/soak.sh [N]   (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/env.sh
n="${1:-200}"
cargo build --release --locked -p blip-vmm --bin blip
export BLIP_RUN_DIR="$(mktemp -d /tmp/blip-soak-run.XXXXXX)"
fds_before=$(ls /proc/self/fd | wc -l)
start=$(date +%s)
target/release/blip demo --migrations "$n" --verify
end=$(date +%s)
sleep 1
left=$(pgrep -fc "target/release/blip (run|receive)" || true)
entries=$(ls "$BLIP_RUN_DIR" | grep -cv '^slots$' || true)
echo "soak: $n migrations with --verify in $((end - start)) s; leftover blip processes: $left; leftover registry entries: $entries"
rm -rf "$BLIP_RUN_DIR"
[ "$left" = 0 ] && [ "$entries" = 0 ] && echo "soak: PASS" || { echo "soak: FAIL"; exit 1; }
