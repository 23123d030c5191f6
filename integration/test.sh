#!/usr/bin/env bash
# The whole test suite, from a fresh clone: build the workspace, start the
# peers the tests need on free loopback ports, run every test with
# cargo-nextest, stop the peers. The last line is nextest's own summary.
#
# Peers today: none beyond the broker itself (the token provider's peer is
# the broker's own store, and the tests start brokers themselves). Provider
# issues add theirs here (PostgreSQL, OpenBao, moto), each started on a free
# loopback port and stopped by its PID on exit.
#
# Extra arguments go to nextest, e.g. `integration/test.sh -E 'test(expiry)'`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest is required: cargo install cargo-nextest --locked" >&2
  exit 2
fi

PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

# `fault-injection` compiles the test-only pause between issue and activation
# that the crash test needs; release builds never have it.
cargo nextest run --workspace --features leasehold/fault-injection --no-fail-fast "$@"
