#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS each (default 30) and prints a table
# "target | execs | result". Exit status 1 when a target crashed (its artifact path is in the
# output), 2 when something did not build, 0 otherwise. The seed corpus fuzz/corpus/<target> is
# copied to a temp dir first, so runs never grow the repository's corpus.
#
#   ci/fuzz.sh [SECONDS]            all targets
#   FUZZ_TARGETS="elf_loader" ci/fuzz.sh 60
#   FUZZ_EXTRA="-seed=1" ci/fuzz.sh 15      (extra libFuzzer flags; CI uses a fixed seed)
#
# Needs the nightly toolchain (rustup) and cargo-fuzz (installed here when missing).
set -euo pipefail

SECONDS_PER_TARGET="${1:-30}"
case "$SECONDS_PER_TARGET" in
    ''|*[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_DIR="$ROOT/fuzz"
RSS_LIMIT_MB="${RSS_LIMIT_MB:-1024}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is required: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd "$FUZZ_DIR"
TARGETS="${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/blip-fuzz.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "fuzz: building targets"
if ! cargo +nightly fuzz build; then
    echo "fuzz: the fuzz targets do not build" >&2
    exit 2
fi

declare -A EXECS RESULT
failed=0
for t in $TARGETS; do
    corpus="$WORK/corpus/$t"
    mkdir -p "$corpus"
    if [ -d "$FUZZ_DIR/corpus/$t" ]; then
        cp -r "$FUZZ_DIR/corpus/$t/." "$corpus/"
    fi
    log="$WORK/$t.log"
    echo "fuzz: $t for ${SECONDS_PER_TARGET}s (corpus copy $corpus)"
    set +e
    cargo +nightly fuzz run "$t" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb="$RSS_LIMIT_MB" \
        -print_final_stats=1 ${FUZZ_EXTRA:-} >"$log" 2>&1
    rc=$?
    set -e
    execs="$(sed -n 's/^stat::number_of_executed_units:[[:space:]]*\([0-9]*\).*/\1/p' "$log" | tail -1)"
    EXECS[$t]="${execs:-?}"
    if [ "$rc" -eq 0 ]; then
        RESULT[$t]="ok"
    elif ! grep -q '^==[0-9]*==\|Test unit written to\|^INFO: Running with' "$log"; then
        # cargo fuzz run rebuilds first: a compile error is not a crash found by fuzzing.
        [ "$failed" -ne 0 ] || failed=2
        RESULT[$t]="BUILD FAILED (exit $rc)"
        echo "fuzz: $t did not build; last lines of its log:" >&2
        tail -n 30 "$log" >&2
    else
        failed=1
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)"
        RESULT[$t]="CRASH (exit $rc${artifact:+, artifact $artifact})"
        echo "fuzz: $t FAILED (exit $rc); last lines of its log:" >&2
        tail -n 60 "$log" >&2
        if [ -n "$artifact" ]; then
            echo "fuzz: reproduce with: (cd fuzz && cargo +nightly fuzz run $t $artifact)" >&2
        fi
    fi
    echo "fuzz: $t: ${EXECS[$t]} execs, ${RESULT[$t]}"
done

echo
printf '%-20s | %12s | %s\n' target execs result
printf '%-20s-+-%12s-+-%s\n' -------------------- ------------ ------
for t in $TARGETS; do
    printf '%-20s | %12s | %s\n' "$t" "${EXECS[$t]}" "${RESULT[$t]}"
done
exit "$failed"
