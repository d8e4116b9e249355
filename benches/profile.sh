#!/usr/bin/env bash
# Where inferdns's CPU goes under load: the compare.sh setup (same config, same GeoIP database, same two
# health backends, server pinned to SERVER_CPU and dnsperf to CLIENT_CPU, both SCHED_FIFO), dnsperf at
# saturation on one name while `perf record -g` samples the server, then `perf report` by symbol.
#
#   benches/profile.sh [NAME]          # NAME: static (default), dyn, geo, geo-ecs, cap
#
# Needs what compare.sh needs (run compare.sh once: it installs dnsperf and renders the configs into $RUN)
# and `perf` (linux-perf). env: INFERDNS_BIN (default: target/release/inferdns), SECS (8), RUN, ANCHORS.
# out: benches/results/profile-<name>-<stamp>.txt (the report); perf.data stays in $RUN.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=$(cd "${ANCHORS:-$ROOT/../shared/anchors}" && pwd) || exit 1
export RUN=${RUN:-/tmp/inferdns-compare}
# shellcheck source=/dev/null
source "$ANCHORS/lib.sh"
NAME=${1:-static}
SECS=${SECS:-8}
INFERDNS_BIN=${INFERDNS_BIN:-$ROOT/target/release/inferdns}
[ -s "$RUN/inferdns/inferdns.toml" ] || { log "run benches/compare.sh once first (it renders $RUN)"; exit 1; }
command -v perf >/dev/null || { log "perf is missing (apt-get install linux-perf)"; exit 1; }
qname=$NAME.inference.example.com; ecs=()
[ "$NAME" = geo-ecs ] && { qname=geo.inference.example.com; ecs=(-E 8:00011800c63364); }
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=$ROOT/benches/results/profile-$NAME-$STAMP.txt

trap 'stop_all' EXIT
trap 'exit 130' INT TERM
stop_all
ports_free || exit 1
start_backend primary "$PRIMARY_IP" || exit 1
start_backend secondary "$SECONDARY_IP" || exit 1
start_server inferdns default || exit 1
pid=$(cat "$PIDS/server-inferdns.pid")
sleep 3   # the probes make the regions fit
printf '%s A\n' "$qname" > "$RUN/profile.q"
perf record -g -p "$pid" -o "$RUN/perf.data" -- sleep "$((SECS + 1))" >/dev/null 2>&1 &
perf_pid=$!
chrt -f 50 taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "${PORT[inferdns]}" -d "$RUN/profile.q" -l "$SECS" \
  -c 4 -T 1 -q 100 "${ecs[@]}" > "$RUN/profile-dnsperf.txt" 2>&1
wait "$perf_pid"
{
  build="$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo +local-changes)"
  echo "# $build $NAME, $SECS s at saturation; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  grep -E 'Queries per second|Queries completed' "$RUN/profile-dnsperf.txt"
  perf report -i "$RUN/perf.data" --no-children --sort symbol --stdio --percent-limit 0.7 -g none 2>/dev/null \
    | grep -v '^$'
} > "$OUT"
log "report: $OUT"
cat "$OUT"
