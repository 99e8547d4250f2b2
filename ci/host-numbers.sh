#!/usr/bin/env bash
# The host service's numbers for the README ("Operating a node"): a drain of N guests from one
# node to two others with one command naming only hosts (total time, per-guest blackout and
# migration time, from `blip drain --json`), and a service's memory (VmRSS) and CPU
# (utime+stime over an idle minute).
#
# The three "nodes" are network namespaces on a bridge, each running `blip host serve`, as in
# tests/tests/host_netns.rs. Needs root, iproute2, jq and /dev/kvm.
#
#   ci/host-numbers.sh [--blip PATH] [--guests N]... [--idle SECONDS] [--cmdline GUEST]
#                      [--max-blackout D] [--max-precopy-time D] [--mem SIZE] [--verify]
#
# --verify makes every migration compare memory digests, which adds the hashing to each
# blackout: leave it off for blackout numbers.
#
# Prints one table row per N, then the idle line, and the machine (CPU, load average).
set -euo pipefail
cd "$(dirname "$0")/.."

BLIP=target/release/blip
COUNTS=()
IDLE=60
GUEST="dirty ws=2 rate=max heartbeat period=1000"
MAXB=1ms
PRECOPY=2s
MEM=32M
VERIFY=()
while [ $# -gt 0 ]; do
    case "$1" in
        --blip) BLIP=$2; shift 2 ;;
        --guests) COUNTS+=("$2"); shift 2 ;;
        --idle) IDLE=$2; shift 2 ;;
        --cmdline) GUEST=$2; shift 2 ;;
        --max-blackout) MAXB=$2; shift 2 ;;
        --max-precopy-time) PRECOPY=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --verify) VERIFY=(--verify); shift ;;
        *) echo "host-numbers.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ ${#COUNTS[@]} -gt 0 ] || COUNTS=(6)
BLIP=$(realpath "$BLIP")
[ -x "$BLIP" ] || { echo "host-numbers.sh: no blip at $BLIP (cargo build --release -p blip-vmm)" >&2; exit 2; }
command -v jq >/dev/null || { echo "host-numbers.sh: needs jq" >&2; exit 2; }

ID=$$
NET="10.$((100 + ID % 100)).201"
BR="bbrN$((ID % 10000))"
WORK=$(mktemp -d /tmp/blip-host-numbers.XXXXXX)
SVC_PIDS=()

cleanup() {
    set +e
    for p in "${SVC_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for f in "$WORK"/run-*/*.json; do
        [ -e "$f" ] && kill "$(jq -r .pid "$f")" 2>/dev/null
    done
    for i in 0 1 2; do ip netns del "blipN${i}n$ID" 2>/dev/null; done
    ip link del "$BR" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

ip link add "$BR" type bridge
ip addr add "$NET.254/24" dev "$BR"
ip link set "$BR" up
for i in 0 1 2; do
    ns="blipN${i}n$ID"
    ip netns add "$ns"
    ip link add "vN${i}o$ID" type veth peer name "vN${i}i$ID"
    ip link set "vN${i}i$ID" netns "$ns"
    ip link set "vN${i}o$ID" master "$BR" up
    ip -n "$ns" addr add "$NET.$((i + 1))/24" dev "vN${i}i$ID"
    ip -n "$ns" link set "vN${i}i$ID" up
    ip -n "$ns" link set lo up
done
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/key"
chmod 600 "$WORK/key"

# serve NODE: starts node NODE's service (0 = A, 1 = B, 2 = C) and waits until it serves.
serve() {
    local i=$1 run="$WORK/run-$1"
    mkdir -p "$run"
    BLIP_RUN_DIR=$run ip netns exec "blipN${i}n$ID" "$BLIP" host serve \
        --listen "tcp://$NET.$((i + 1)):7000" --ports 7100-7199 --key "$WORK/key" \
        --api "$WORK/api-$i.sock" 2> "$WORK/svc-$i.err" &
    SVC_PIDS+=($!)
    for _ in $(seq 600); do
        grep -q "blip host: serving" "$WORK/svc-$i.err" && return 0
        kill -0 $! 2>/dev/null || break
        sleep 0.1
    done
    echo "host-numbers.sh: service $i did not start: $(cat "$WORK/svc-$i.err")" >&2
    exit 1
}
host() { # host NODE ARGS...: `blip host ARGS` on node NODE's API
    local i=$1; shift
    BLIP_RUN_DIR="$WORK/run-$i" "$BLIP" host --api "$WORK/api-$i.sock" "$@"
}
for i in 0 1 2; do serve "$i"; done

printf '%-7s %-9s %-28s %-28s %s\n' guests "drain s" "blackout us (min/med/max)" \
    "per guest ms (min/med/max)" "placed (B/C)"
stats() { # min/median/max of the numbers on stdin
    sort -g | awk '{a[NR]=$1} END {printf "%.0f / %.0f / %.0f", a[1], a[int((NR+1)/2)], a[NR]}'
}
for n in "${COUNTS[@]}"; do
    for g in $(seq "$n"); do
        host 0 run "g$g" -- --mem "$MEM" --cmdline "$GUEST" > /dev/null
    done
    t0=$(date +%s.%N)
    BLIP_RUN_DIR="$WORK/run-0" ip netns exec "blipN0n$ID" "$BLIP" drain \
        --to "tcp://$NET.2:7000" --to "tcp://$NET.3:7000" ${VERIFY[@]+"${VERIFY[@]}"} --json \
        --max-blackout "$MAXB" --max-precopy-time "$PRECOPY" --key "$WORK/key" \
        > "$WORK/drain-$n.json" 2> "$WORK/drain-$n.err" \
        || { echo "host-numbers.sh: drain of $n failed: $(tail -n 3 "$WORK/drain-$n.err")" >&2; exit 1; }
    t1=$(date +%s.%N)
    ok=$(jq '[.[] | select(.ok == true)] | length' "$WORK/drain-$n.json")
    [ "$ok" = "$n" ] || { echo "host-numbers.sh: $ok of $n moved" >&2; exit 1; }
    bl=$(jq -r '.[].blackout_us' "$WORK/drain-$n.json" | stats)
    tot=$(jq -r '.[].total_ms' "$WORK/drain-$n.json" | stats)
    nb=$(jq --arg u "tcp://$NET.2:7000" '[.[] | select(.to == $u)] | length' "$WORK/drain-$n.json")
    printf '%-7s %-9.1f %-28s %-28s %s\n' "$n" "$(echo "$t1 - $t0" | bc)" "$bl" "$tot" \
        "$nb/$((n - nb))"
    # Stop the moved guests so the next N starts from empty nodes.
    for f in "$WORK"/run-1/*.json "$WORK"/run-2/*.json; do
        [ -e "$f" ] && kill "$(jq -r .pid "$f")" 2>/dev/null
    done
    for _ in $(seq 600); do
        [ "$(host 1 guests --json | jq length)" = 0 ] && [ "$(host 2 guests --json | jq length)" = 0 ] && break
        sleep 0.1
    done
done

# Idle: B's service, no guests, no migrations.
pid=${SVC_PIDS[1]}
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
c0=$(cpu "$pid"); sleep "$IDLE"; c1=$(cpu "$pid")
rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
thr=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status")
echo "service idle: RSS $((rss / 1024)) MiB ($rss kB), $thr threads," \
    "CPU $(echo "scale=2; ($c1 - $c0) * 1000 / $tick / $IDLE" | bc) ms/s over ${IDLE} s" \
    "($((c1 - c0)) ticks of 1/$tick s)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')," \
    "load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "guest: --mem $MEM --cmdline \"$GUEST\"; drain ${VERIFY[*]:+--verify }--max-blackout $MAXB --max-precopy-time $PRECOPY"
