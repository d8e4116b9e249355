#!/usr/bin/env bash
# Scale: 10,000 services over 1,000 endpoints (one per region), GeoIP
# database of GeoLite2-City size. Loopback only; every step is bounded and
# every process it starts is stopped.
#
#   benches/scale.sh            # REGIONS=1000 SERVICES=10000 SECS=30
#
# Prints, with the load average:
#   1. `inferdns check` of the config: wall time and peak RSS;
#   2. in-process snapshot builds (`examples/scale.rs build`): first build,
#      rebuild after one endpoint changes (median and max of 100), one
#      rebuild after a tenth of the endpoints die together;
#   3. the release daemon probing 1,000 live simulated regions (alive and
#      model list every 1 s): its CPU share over SECS seconds in steady
#      state, its RSS, and then a tenth of the regions dying together: how
#      many snapshots that cost, and when the last one of them came.
set -euo pipefail
cd "$(dirname "$0")/.."
REGIONS=${REGIONS:-1000}
SERVICES=${SERVICES:-10000}
SECS=${SECS:-30}
DB=${DB:-${TMPDIR:-/tmp}/inferdns-large-city.mmdb}
PORT=${PORT:-18600}
DNS=${DNS:-15356}
ADMIN=${ADMIN:-18697}
BIN=${BIN:-target/release/inferdns}
SCALE=target/release/examples/scale
cargo build --release --bin inferdns --example scale --example geoip-table 2>/dev/null
[ -f "$DB" ] || cargo run --release --example geoip-table >/dev/null
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
metric() {
  curl -s --max-time 30 "http://127.0.0.1:$ADMIN/metrics" | awk -v m="$1" '$1 == m {print $2}'
}

echo "machine: $(nproc) cores; $(uptime)"
"$SCALE" gen --regions "$REGIONS" --services "$SERVICES" --dir "$DIR" \
  --geoip "$DB" --port "$PORT" --interval 1s >/dev/null
sed -i -e "s/dns-listen = \[\"127.0.0.1:0\"\]/dns-listen = [\"127.0.0.1:$DNS\"]/" \
  -e "s/admin-listen = \"127.0.0.1:0\"/admin-listen = \"127.0.0.1:$ADMIN\"/" "$DIR/inferdns.toml"
echo "config: $REGIONS regions, $SERVICES services; database $DB ($(stat -c %s "$DB") bytes)"

echo "== 1. check"
for _ in 1 2 3; do
  /usr/bin/time -f "check: %e s wall, %U s user, %M KiB peak RSS" \
    "$BIN" check --config "$DIR/inferdns.toml" >/dev/null
done

echo "== 2. snapshot builds, in process (endpoints refused, then up, then changes)"
timeout 600 "$SCALE" build --config "$DIR/inferdns.toml" --changes 50

echo "== 3. the daemon over $REGIONS live regions"
# The regions serve for the whole step; a tenth of them die together
# after warm-up + the measured window.
DOWN_AFTER=$((20 + SECS + 5))
timeout $((DOWN_AFTER + 60)) "$SCALE" serve --regions "$REGIONS" --port "$PORT" \
  --seconds $((DOWN_AFTER + 40)) --down-after "$DOWN_AFTER" --down $((REGIONS / 10)) \
  >"$DIR/serve.log" 2>&1 &
PIDS+=($!)
sleep 3
START=$(date +%s.%N)
RUST_LOG=warn timeout $((DOWN_AFTER + 50)) "$BIN" run --config "$DIR/inferdns.toml" \
  >"$DIR/daemon.log" 2>&1 &
PIDS+=($!)
# The daemon itself, not the `timeout` that runs it.
for _ in $(seq 50); do DAEMON=$(pgrep -P "$!" -x inferdns || true); [ -n "$DAEMON" ] && break; sleep 0.1; done
timeout 60 "$SCALE" first-answer --dns "127.0.0.1:$DNS" --name s0.inference.example.com --seconds 60
echo "start to first answer: $(echo "$(date +%s.%N) - $START" | bc) s (includes the first probe round)"
# Warm-up: every endpoint has risen and the keep-alive connections are open.
sleep 17
G0=$(metric inferdns_snapshot_generation)
C0=$(cpu_ticks "$DAEMON")
T0=$(date +%s.%N)
sleep "$SECS"
C1=$(cpu_ticks "$DAEMON")
T1=$(date +%s.%N)
G1=$(metric inferdns_snapshot_generation)
echo "(snapshot generation $G0 -> $G1)"
echo "steady state over $(echo "$T1 - $T0" | bc | cut -c1-5) s: daemon CPU $(echo "scale=1; 100 * ($C1 - $C0) / $TICK / ($T1 - $T0)" | bc) % of one core;" \
  "probes: $REGIONS endpoints x (alive + model list) per second; snapshots published: $((G1 - G0)) (latency moves)"
echo "daemon RSS: $(($(rss_kib "$DAEMON") / 1024)) MiB (VmHWM $(($(awk '/^VmHWM:/ {print $2}' "/proc/$DAEMON/status") / 1024)) MiB)"
# The death: wait for the serve log's line, then 10 s.
for _ in $(seq 200); do grep -q "regions down" "$DIR/serve.log" && break; sleep 0.1; done
G2=$(metric inferdns_snapshot_generation)
C2=$(cpu_ticks "$DAEMON")
sleep 10
G3=$(metric inferdns_snapshot_generation)
echo "(snapshot generation $G2 -> $G3)"
C3=$(cpu_ticks "$DAEMON")
# Latency moves republish about once a second in steady state: the
# death's own snapshots are what the 10 s took beyond that rate.
BASE=$(echo "scale=1; 10 * ($G1 - $G0) / ($T1 - $T0)" | bc)
echo "$((REGIONS / 10)) regions died together: $((G3 - G2)) snapshots in the next 10 s," \
  "where steady state publishes $BASE in 10 s" \
  "(daemon CPU $(echo "scale=2; ($C3 - $C2) / $TICK" | bc) s in those 10 s)"
echo "down endpoints in status: $(curl -s --max-time 5 "http://127.0.0.1:$ADMIN/v1/status" | grep -o '"status":"down"' | wc -l)"
echo "done; $(uptime)"
