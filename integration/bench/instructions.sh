#!/usr/bin/env bash
# Instructions per call of a leasehold build, counted by valgrind (callgrind),
# for comparing two builds on a machine whose speed drifts: on a shared VM
# the same binary's calls/s moves by a third within minutes, and there are no
# hardware counters, but an instruction count does not depend on the host.
#
#   integration/bench/instructions.sh target/release/leasehold [other builds...]
#
# Runs `leasehold-bench policy` (calls with leases, 64 clients) twice per
# build, for SHORT and LONG seconds, with the broker under callgrind, and
# prints (Ir_long - Ir_short) / (calls_long - calls_short): start-up and
# shutdown cancel out. Expect a few percent between repeats: group commits
# batch differently from run to run. Under valgrind SHA-256 runs without the
# CPU's SHA extensions and Ed25519 without ADX, so crypto weighs more than in
# a native run; compare builds with each other, not with native CPU time.
set -euo pipefail
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
target=${CARGO_TARGET_DIR:-$here/../../target}
bench=${BENCH:-$target/release/leasehold-bench}
short=${SHORT:-5}
long=${LONG:-15}
[ -x "$bench" ] || { echo "no $bench: cargo build --release -p leasehold-bench" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for bin in "$@"; do
  bin=$(realpath "$bin")
  cat > "$work/broker" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/cg.out.%p --dump-instr=no "$bin" "\$@"
WRAP
  chmod +x "$work/broker"
  declare -A calls=() ir=()
  for s in "$short" "$long"; do
    rm -f "$work"/cg.out.*
    out=$("$bench" --leasehold "$work/broker" policy --rounds 1 --seconds "$s" --decisions 1000 2>&1) \
      || { echo "$out" >&2; exit 1; }
    calls[$s]=$(echo "$out" | sed -nE 's/^calls:.*; ([0-9]+) calls in all.*/\1/p')
    [ -n "${calls[$s]}" ] || { echo "$out" >&2; echo "no call count in the output of $bench: rebuild it" >&2; exit 1; }
    ir[$s]=$(grep -h '^summary:' "$work"/cg.out.* | awk '{s += $2} END {printf "%.0f", s}')
  done
  n=$(( calls[$long] - calls[$short] ))
  [ "$n" -gt 0 ] || { echo "$bin: no more calls in $long s than in $short s" >&2; exit 1; }
  echo "$bin: $(( (ir[$long] - ir[$short]) / n )) instructions per call ($n calls apart; ${calls[$short]} and ${calls[$long]} calls, Ir ${ir[$short]} and ${ir[$long]})"
done
