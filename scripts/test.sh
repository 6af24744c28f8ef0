#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Builds the `floe` binary the
# process-level tests start, then runs every test with nextest (cargo test if it is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/floe-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

cargo build -p floe-node --bin floe
export FLOE_BIN="$CARGO_TARGET_DIR/debug/floe"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  # The simulator must catch every planted bug (test-only feature, never in production builds).
  cargo nextest run -p floe-sim --features planted-bugs --no-fail-fast -E 'test(planted)'
else
  cargo test --workspace --no-fail-fast
  cargo test -p floe-sim --features planted-bugs --no-fail-fast planted
fi
