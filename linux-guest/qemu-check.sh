#!/usr/bin/env bash
# Boots Debian's kernel with the Linux guest's initramfs under plain QEMU (TCG: no blip, no
# KVM) and drives the workload through its console: waits for `WORKLOAD UP` and 10 heartbeats,
# sends `check` and waits for `CHECK OK <n> full console`, sends `poweroff` and waits for QEMU
# to exit. Proves the guest side on its own.
#
#   linux-guest/qemu-check.sh [--smp N] [--kernel FILE] [--tool FILE] [--timeout SECS]
#
# Default kernel: the soft-RoCE harness's cached one; default tool: target/*/blip-linux-guest.
# Prints one line per step with its wall time since QEMU started; exit 0 when all passed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SMP=1
KERNEL=$(ls "${BLIP_SOFTROCE_CACHE:-$HOME/.cache/blip-softroce}"/kernel/*/boot/vmlinuz-* 2>/dev/null | tail -1 || true)
TOOL=""
TIMEOUT=300
while (($#)); do
    case "$1" in
        --smp) SMP=$2; shift 2 ;;
        --kernel) KERNEL=$2; shift 2 ;;
        --tool) TOOL=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        *) echo "qemu-check: unknown argument $1" >&2; exit 2 ;;
    esac
done
T=${CARGO_TARGET_DIR:-$ROOT/target}
[ -n "$TOOL" ] || TOOL=$(ls -t "$T"/release/blip-linux-guest "$T"/debug/blip-linux-guest 2>/dev/null | head -1 || true)
[ -x "$TOOL" ] || { echo "qemu-check: no blip-linux-guest (cargo build -p blip-linux-guest)" >&2; exit 2; }
[ -f "$KERNEL" ] || { echo "qemu-check: no kernel (run ci/softroce.sh once, or --kernel)" >&2; exit 2; }

DIR=$(mktemp -d /tmp/blip-qemu-check.XXXXXX)
trap 'kill "$QPID" 2>/dev/null || true; exec 3>&- || true; rm -rf "$DIR"' EXIT
"$TOOL" initramfs "$DIR/initrd.cpio"
mkfifo "$DIR/in"
T0=$(date +%s.%N)
el() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
qemu-system-x86_64 -accel tcg -m 512 -smp "$SMP" -nographic -no-reboot \
    -kernel "$KERNEL" -initrd "$DIR/initrd.cpio" \
    -append "console=ttyS0 quiet panic=-1 workload.mem=32M" <"$DIR/in" >"$DIR/console.log" 2>&1 &
QPID=$!
exec 3>"$DIR/in"

# Waits until the console shows a line matching $1 (ERE), at most $2 s.
wait_line() {
    local end=$(($(date +%s) + $2))
    while ! grep -aqE "$1" "$DIR/console.log"; do
        if ! kill -0 "$QPID" 2>/dev/null || (($(date +%s) >= end)); then
            echo "qemu-check: FAIL no line /$1/ within $2 s; console tail:" >&2
            tail -n 20 "$DIR/console.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}
wait_line 'WORKLOAD UP' "$TIMEOUT"
echo "qemu-check: +$(el)s $(grep -ao 'WORKLOAD UP.*' "$DIR/console.log" | tr -d '\r')"
wait_line 'HB 10 mono=' 60
echo "qemu-check: +$(el)s 10 heartbeats"
wait_line 'CHECK OK 1 ' 60
echo "qemu-check: +$(el)s $(grep -ao 'CHECK OK 1 .*' "$DIR/console.log" | tr -d '\r')"
echo check >&3
wait_line 'CHECK OK [0-9]+ full console' 60
echo "qemu-check: +$(el)s $(grep -a 'full console' "$DIR/console.log" | tr -d '\r')"
echo poweroff >&3
end=$(($(date +%s) + 60))
while kill -0 "$QPID" 2>/dev/null && (($(date +%s) < end)); do sleep 0.1; done
if kill -0 "$QPID" 2>/dev/null; then
    echo "qemu-check: FAIL QEMU still runs 60 s after poweroff" >&2
    exit 1
fi
echo "qemu-check: +$(el)s QEMU exited after poweroff"
"$TOOL" hb-check --min-beats 10 "$DIR/console.log" | sed 's/^/qemu-check: /'
if grep -aqE 'BUG|WARNING|soft lockup|stall|unstable|hrtimer: interrupt took|CHECK FAILED' "$DIR/console.log"; then
    echo "qemu-check: FAIL the console shows:" >&2
    grep -aE 'BUG|WARNING|soft lockup|stall|unstable|hrtimer: interrupt took|CHECK FAILED' "$DIR/console.log" >&2
    exit 1
fi
echo "qemu-check: PASS smp=$SMP"
