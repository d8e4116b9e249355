#!/usr/bin/env bash
# Reload time: from `POST /v1/reload` (the path SIGHUP takes too) to its
# answer, which comes once the new generation is published. Configs from
# `examples/scale.rs gen` (endpoints on 127.1.x.y:9, refused: loopback
# only) with the GeoLite2-City sized database; every run bounded.
#
#   benches/reload.sh [SERVICES] [REGIONS] [RELOADS] [DB]
#
# Prints the time of each reload with the GeoIP file unchanged, then with
# one policy file changed (one service compiled again), then with the
# GeoIP file replaced by a copy of itself (new inode, same bytes: read and
# compared, not checked), then with a changed file (loaded and checked).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVICES=${1:-1000}
REGIONS=${2:-100}
RELOADS=${3:-10}
DB=${4:-${TMPDIR:-/tmp}/inferdns-large-city.mmdb}
ADMIN=${ADMIN:-127.0.0.1:19153}
BIN=target/release/inferdns
SCALE=target/release/examples/scale
[ -x "$BIN" ] && [ -x "$SCALE" ] || cargo build --release --bin inferdns --example scale
[ -f "$DB" ] || cargo run --release --example geoip-table >/dev/null
DIR=$(mktemp -d)
SERVER=
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$DIR"' EXIT
cp "$DB" "$DIR/city.mmdb"
"$SCALE" gen --regions "$REGIONS" --services "$SERVICES" --dir "$DIR" --geoip "$DIR/city.mmdb" >/dev/null
echo secret-token >"$DIR/token"
# Policy files written within two seconds of a load are read again at the
# next one whatever their keys (config::known): let them settle, as files
# a tool did not just write are.
sleep 3
sed -i "s/admin-listen = \"127.0.0.1:0\"/admin-listen = \"$ADMIN\"\nadmin-token-file = \"token\"/" "$DIR/inferdns.toml"
echo "$SERVICES services, $REGIONS regions, GeoIP $(stat -c %s "$DB") bytes; $(uptime)"
RUST_LOG=warn "$BIN" run --config "$DIR/inferdns.toml" >/dev/null 2>&1 &
SERVER=$!
for _ in $(seq 300); do
  curl -sf "http://$ADMIN/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
reload() {
  curl -s -o /dev/null -w '%{time_total}\n' -X POST -H 'Authorization: Bearer secret-token' \
    --max-time 30 "http://$ADMIN/v1/reload"
}
echo "GeoIP unchanged:"
for _ in $(seq "$RELOADS"); do reload; done
echo "One policy file changed (its TTL), GeoIP unchanged:"
POLICY=$(find "$DIR/policies" -name '*.toml' -print -quit)
for i in $(seq 3); do
  grep -v '^ttl = ' "$POLICY" >"$POLICY.new" && echo "ttl = $((20 + i))" >>"$POLICY.new"
  mv "$POLICY.new" "$POLICY"
  reload
done
echo "GeoIP file replaced by the same bytes (new inode):"
for _ in $(seq 3); do
  cp "$DIR/city.mmdb" "$DIR/city.mmdb.new" && mv "$DIR/city.mmdb.new" "$DIR/city.mmdb"
  reload
done
echo "GeoIP file changed (one byte of its description; loaded and checked):"
for i in $(seq 3); do
  python3 - "$DIR/city.mmdb" "$i" <<'PY'
import sys
p, i = sys.argv[1], sys.argv[2]
b = bytearray(open(p, 'rb').read())
at = max(b.rfind(b'synthetic'), b.rfind(b'Synthetic'))
assert at > 0
b[at] ^= 0x20  # s <-> S
open(p + '.new', 'wb').write(b)
PY
  mv "$DIR/city.mmdb.new" "$DIR/city.mmdb"
  reload
done
