#!/usr/bin/env bash
# The whole test suite, from a fresh clone: build the workspace, start the
# peers the tests need on free loopback ports, run every test with
# cargo-nextest, stop the peers. The last line is nextest's own summary.
#
# Peers: the token provider's peer is the broker's own store, and the tests
# start brokers themselves. PostgreSQL tests start a throwaway cluster each
# (providers/postgres/src/testkit.rs: initdb as the `postgres` user when run
# as root, a free loopback port, stopped on drop); they need the server
# binaries, checked here so a missing one fails at once with how to get it.
# Provider issues still to come add theirs here (OpenBao, moto), each started
# on a free loopback port and stopped by its PID on exit.
#
# Extra arguments go to nextest, e.g. `integration/test.sh -E 'test(expiry)'`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest is required: cargo install cargo-nextest --locked" >&2
  exit 2
fi

have_pg() {
  [ -n "${LEASEHOLD_PG_BINDIR:-}" ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    || command -v initdb >/dev/null 2>&1
}
if ! have_pg && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing the PostgreSQL server for the tests (apt-get install postgresql-15)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 >/dev/null; } \
    || true
fi
if ! have_pg; then
  echo "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql-15," >&2
  echo "or set LEASEHOLD_PG_BINDIR to their directory" >&2
  exit 2
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "running as root, the PostgreSQL tests need the 'postgres' user (initdb refuses root)" >&2
  exit 2
fi

# formatting is part of the suite: a diff fails the run before anything builds
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
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
