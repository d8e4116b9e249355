#!/usr/bin/env bash
# Start to first answer: the time from exec of the release binary to the
# first DNS reply over UDP on loopback, with a GeoIP database of your choice
# (default: the GeoLite2-City sized one `cargo run --release --example
# geoip-table` writes). Every run is bounded (30 s) and the server is killed.
#
#   benches/startup.sh [DB] [RUNS]
#
# Prints one figure per run (seconds) and the load average before the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${1:-${TMPDIR:-/tmp}/inferdns-large-city.mmdb}
RUNS=${2:-5}
PORT=${PORT:-15353}
BIN=target/release/inferdns
SCALE=target/release/examples/scale
[ -x "$BIN" ] && [ -x "$SCALE" ] || cargo build --release --bin inferdns --example scale
[ -f "$DB" ] || cargo run --release --example geoip-table >/dev/null
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
# Ten regions whose endpoints refuse (port 9): the first probe round is
# over at once, so the figure is the GeoIP load and the start itself.
"$SCALE" gen --regions 10 --services 10 --dir "$DIR" --geoip "$DB" >/dev/null
sed -i "s/dns-listen = \[\"127.0.0.1:0\"\]/dns-listen = [\"127.0.0.1:$PORT\"]/" "$DIR/inferdns.toml"
echo "database: $DB ($(stat -c %s "$DB") bytes); $(uptime)"
for _ in $(seq "$RUNS"); do
  # Page cache warm (the file was just read or written): the figure is CPU, not disk.
  cat "$DB" >/dev/null
  "$SCALE" first-answer --dns "127.0.0.1:$PORT" --name s0.inference.example.com --seconds 30 &
  ASK=$!
  RUST_LOG=warn "$BIN" run --config "$DIR/inferdns.toml" >/dev/null 2>&1 &
  SERVER=$!
  wait "$ASK" || true
  kill "$SERVER"
  wait "$SERVER" 2>/dev/null || true
done
