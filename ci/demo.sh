#!/usr/bin/env bash
# The README's first command: build blip and run its built-in demo.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/env.sh
ci/setup.sh
cargo build --release --locked -p blip-vmm --bin blip
exec target/release/blip demo "$@"
