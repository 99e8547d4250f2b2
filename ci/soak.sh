#!/usr/bin/env bash
# Soak, two parts, then a leak check:
#  1. `blip demo --migrations 20 --max-blackout 50ms --verify`: back-and-forth migrations of a
#     dirtying guest (a 50 ms target so each hop converges in well under a second) with
#     memory digests compared at every hop and the guest's own memory check at the end.
#  2. `blip-soak --hops N`: N hops of a heartbeating, dirtying guest between fresh blip
#     processes, one random fault per hop (a lost, stalled or corrupted frame on a relay in
#     front of the destination, or the destination killed at a fault point), in-doubt
#     handovers resolved by the documented rule; it fails when a guest is lost or duplicated,
#     its heartbeats stall or its memory check fails. Fault points exist only in debug builds,
#     so this part runs the debug blip.
# Then nothing may be left behind: no blip process, no registry entry or socket.
# Usage: ci/soak.sh [N]   (default 1000 hops)
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/env.sh
n="${1:-1000}"
cargo build --release --locked -p blip-vmm --bin blip
cargo build --locked -p blip-vmm --bin blip -p blip-tests --bin blip-soak
export BLIP_RUN_DIR="$(mktemp -d /tmp/blip-soak-run.XXXXXX)"
# blip-soak keeps its processes' sockets and logs under TMPDIR: its leftovers are found by it.
soak_tmp="$(mktemp -d /tmp/blip-soak-tmp.XXXXXX)"
start=$(date +%s)
target/release/blip demo --migrations 20 --max-blackout 50ms --verify
mid=$(date +%s)
rc=0
TMPDIR="$soak_tmp" target/debug/blip-soak --hops "$n" --out "${SOAK_JSON:-/dev/null}" || rc=$?
end=$(date +%s)
sleep 1
left=$(pgrep -fc "target/release/blip (run|receive)" || true)
left_soak=$(pgrep -fc -- "$soak_tmp/" || true)
# host/ holds the migration records kept for the host service (by design); its live/ progress
# files must be gone once every migration ended.
entries=$(ls "$BLIP_RUN_DIR" | grep -cv '^\(slots\|host\)$' || true)
live=$(ls "$BLIP_RUN_DIR/host/live" 2>/dev/null | wc -l)
entries=$((entries + live))
echo "soak: demo 20 migrations with --verify in $((mid - start)) s; blip-soak $n hops in $((end - mid)) s (exit $rc)"
echo "soak: leftover blip processes: $left (demo), $left_soak (blip-soak); leftover registry entries: $entries"
rm -rf "$BLIP_RUN_DIR"
[ "$rc" = 0 ] || echo "soak: blip-soak kept its files in $soak_tmp"
[ "$rc" = 0 ] && rm -rf "$soak_tmp"
[ "$rc" = 0 ] && [ "$left" = 0 ] && [ "$left_soak" = 0 ] && [ "$entries" = 0 ] && echo "soak: PASS" || { echo "soak: FAIL"; exit 1; }
