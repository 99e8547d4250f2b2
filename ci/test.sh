#!/usr/bin/env bash
# The whole test suite: format, lints, unit tests, and end-to-end tests that start the real
# blip binary on the real /dev/kvm. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/env.sh
ci/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (debug and release binaries)"
cargo build --workspace --locked
cargo build --workspace --release --locked
echo "== cargo test"
cargo test --workspace --locked -- --test-threads 2
echo "== bench smoke (asserts it runs, never a timing)"
target/release/blip-bench --quick >/dev/null
echo "ci/test.sh: all passed"
