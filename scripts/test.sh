#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the integration tests start
# (PostgreSQL with wal2json, redis-server, headless Chromium + chromedriver for the dashboard test,
# a Python venv with moto, boto3, websockets, and pyarrow and duckdb as independent Parquet
# readers, and aiosmtpd as the SMTP server of the alert-channel tests), then runs
# `cargo test --release --workspace`. Re-runs reuse everything installed.
set -euo pipefail
cd "$(dirname "$0")/.."
# The build goes where `cargo run` puts it (./target, or $CARGO_TARGET_DIR when set), so the
# README's two commands compile the dependencies once.

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: $* (install them, e.g. sudo apt-get install $*)" >&2
    exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
[ -x "${LLAMAFLOW_CHROMIUM:-/usr/bin/chromium}" ] || need+=(chromium)
[ -x "${LLAMAFLOW_CHROMEDRIVER:-/usr/bin/chromedriver}" ] || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
pgmajor=$(ls /usr/lib/postgresql | sort -n | tail -1)
[ -f "/usr/lib/postgresql/$pgmajor/lib/wal2json.so" ] || apt_install "postgresql-$pgmajor-wal2json"

venv="${LLAMAFLOW_VENV:-$HOME/.cache/llamaflow-venv}"
if ! "$venv/bin/python" -c 'import moto, boto3, websockets, pyarrow, duckdb, aiosmtpd' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'moto[server]' boto3 websockets pyarrow duckdb aiosmtpd
fi
export LLAMAFLOW_VENV="$venv" LLAMAFLOW_MOTO_VENV="$venv"

# The WebSocket fanout test opens 10,000+ connections.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --release --workspace "$@"
