#!/usr/bin/env bash
# Whole-server QPS of inferdns with dnsperf, on loopback only, bounded in time.
#
# Method (from ../shared/anchors): server pinned to SERVER_CPU, dnsperf to
# CLIENT_CPU, both SCHED_FIFO 50 when allowed (else plain taskset); dnsperf
# -c 4 -T 1 -q 100 -l SECS, one query name per run, 2 s warm-up. Knot (if
# installed) serves the same static name in the same run, so the figures can
# be read as ratios. Server CPU is read from /proc: CPU microseconds per
# answered query is the fair figure when dnsperf's one core is the ceiling.
#
# Needs: dnsperf, dig (bind9-dnsutils), python3; optional knotd.
#   benches/dnsperf.sh            # SECS=15 REPS=3 by default
#   SECS=5 REPS=1 benches/dnsperf.sh
set -euo pipefail

SECS=${SECS:-15}
REPS=${REPS:-3}
CLIENTS=${CLIENTS:-4}
OUTSTANDING=${OUTSTANDING:-100}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT=${PORT:-5399}
KNOT_PORT=${KNOT_PORT:-5398}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=$(mktemp -d /tmp/inferdns-dnsperf.XXXXXX)
OUT=${OUT:-$ROOT/benches/results}
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%d-%H%M%S)
RESULTS="$OUT/dnsperf-$STAMP.jsonl"
HZ=$(getconf CLK_TCK)

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN"
}
trap cleanup EXIT

for tool in dnsperf dig python3 taskset; do
  command -v "$tool" >/dev/null || { echo "dnsperf.sh: $tool is missing (apt-get install dnsperf bind9-dnsutils util-linux)" >&2; exit 1; }
done
PRIO=(chrt -f 50)
if ! chrt -f 50 true 2>/dev/null; then
  echo "dnsperf.sh: SCHED_FIFO not allowed here; results will be noisier" >&2
  PRIO=()
fi

echo "Building release binary..." >&2
(cd "$ROOT" && cargo build --release --locked --quiet)
BIN="$ROOT/target/release/inferdns"

# Two health backends on loopback (GET /health -> 200); they exit by themselves.
mkdir -p "$RUN/www"
echo ok > "$RUN/www/health"
for ip in 127.0.0.11 127.0.0.12; do
  timeout 1800 python3 -m http.server 8081 --bind "$ip" --directory "$RUN/www" >/dev/null 2>&1 &
  PIDS+=($!)
done

cat > "$RUN/zone.db" <<ZONE
\$ORIGIN inference.example.com.
\$TTL 300
static  IN A   192.0.2.10
api     IN A   192.0.2.11
api     IN A   192.0.2.12
www     IN CNAME static.inference.example.com.
ZONE
cat > "$RUN/inferdns.toml" <<CONF
[server]
dns-listen = ["127.0.0.1:$PORT"]
admin-listen = "127.0.0.1:0"
[zone]
apex = "inference.example.com"
file = "zone.db"
soa = { primary = "ns1.inference.example.com", contact = "hostmaster.inference.example.com", minimum = 300, ttl = 300 }
ns = [{ name = "ns1.inference.example.com", addresses = ["127.0.0.1"] }]
[regions.primary]
endpoints = [{ address = "127.0.0.11", port = 8081 }]
[regions.secondary]
endpoints = [{ address = "127.0.0.12", port = 8081 }]
[services.dyn]
tiers = [["primary"], ["secondary"]]
CONF

"${PRIO[@]}" taskset -c "$SERVER_CPU" env RUST_LOG=warn "$BIN" run --config "$RUN/inferdns.toml" >"$RUN/inferdns.out" 2>"$RUN/inferdns.err" &
INFERDNS=$!
PIDS+=($INFERDNS)
for _ in $(seq 100); do grep -q "inferdns listening" "$RUN/inferdns.out" 2>/dev/null && break; sleep 0.1; done
grep -q "inferdns listening" "$RUN/inferdns.out" || { cat "$RUN/inferdns.err" >&2; exit 1; }
test "$(dig @127.0.0.1 -p "$PORT" dyn.inference.example.com A +short)" = 127.0.0.11

KNOT=
if command -v knotd >/dev/null; then
  mkdir -p "$RUN/knot/db"
  sed "s/^\$ORIGIN.*/&\n@ IN SOA ns1.inference.example.com. hostmaster.inference.example.com. 1 3600 600 604800 300\n@ IN NS ns1.inference.example.com.\nns1 IN A 127.0.0.1/" "$RUN/zone.db" > "$RUN/knot/inference.example.com.zone"
  cat > "$RUN/knot/knot.conf" <<KCONF
server:
    rundir: "$RUN/knot"
    listen: 127.0.0.1@$KNOT_PORT
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$RUN/knot/db"
log:
  - target: stderr
    any: error
template:
  - id: default
    storage: "$RUN/knot"
    zonefile-sync: -1
    journal-content: none
zone:
  - domain: inference.example.com
    file: "inference.example.com.zone"
KCONF
  "${PRIO[@]}" taskset -c "$SERVER_CPU" knotd -c "$RUN/knot/knot.conf" >"$RUN/knot/log" 2>&1 &
  KNOT=$!
  PIDS+=($KNOT)
  for _ in $(seq 50); do dig @127.0.0.1 -p "$KNOT_PORT" static.inference.example.com +short 2>/dev/null | grep -q 192.0.2.10 && break; sleep 0.1; done
fi

cpu_jiffies() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# one_run LABEL PID PORT QNAME
one_run() {
  local label=$1 pid=$2 port=$3 qname=$4
  echo "$qname A" > "$RUN/q"
  "${PRIO[@]}" taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$RUN/q" -l 2 -c "$CLIENTS" -T 1 -q "$OUTSTANDING" >/dev/null 2>&1 || true
  local c0; c0=$(cpu_jiffies "$pid")
  "${PRIO[@]}" taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$RUN/q" -l "$SECS" -c "$CLIENTS" -T 1 -q "$OUTSTANDING" > "$RUN/perf.txt" 2>&1
  local c1; c1=$(cpu_jiffies "$pid")
  local qps completed lost
  qps=$(awk '/Queries per second/ {print $4}' "$RUN/perf.txt")
  completed=$(awk '/Queries completed/ {print $3}' "$RUN/perf.txt")
  lost=$(awk '/Queries lost/ {print $3}' "$RUN/perf.txt")
  local rcodes
  rcodes=$(awk '/Response codes:/ {$1=$2=""; sub(/^ +/, ""); print}' "$RUN/perf.txt")
  local us
  us=$(awk -v j=$((c1 - c0)) -v hz="$HZ" -v n="$completed" 'BEGIN { printf "%.2f", (n > 0 ? j / hz * 1e6 / n : 0) }')
  printf '{"label":"%s","qname":"%s","qps":%s,"completed":%s,"lost":%s,"server_cpu_us_per_query":%s,"rcodes":"%s","secs":%s}\n' \
    "$label" "$qname" "$qps" "$completed" "$lost" "$us" "$rcodes" "$SECS" | tee -a "$RESULTS"
}

for rep in $(seq "$REPS"); do
  echo "rep $rep/$REPS" >&2
  one_run inferdns-static "$INFERDNS" "$PORT" static.inference.example.com
  one_run inferdns-service "$INFERDNS" "$PORT" dyn.inference.example.com
  if [ -n "$KNOT" ]; then one_run knot-static "$KNOT" "$KNOT_PORT" static.inference.example.com; fi
done

echo
echo "Medians over $REPS run(s) of $SECS s (results: $RESULTS):"
python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
labels = []
for r in rows:
    if r["label"] not in labels:
        labels.append(r["label"])
print("| server / name | QPS | server CPU us/query | lost |")
print("|---|---:|---:|---:|")
for label in labels:
    rs = [r for r in rows if r["label"] == label]
    print(f"| {label} | {statistics.median(r['qps'] for r in rs):,.0f} | "
          f"{statistics.median(r['server_cpu_us_per_query'] for r in rs):.2f} | {sum(r['lost'] for r in rs)} |")
PY
