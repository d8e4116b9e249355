#!/usr/bin/env bash
# Probe overhead: CPU and memory of the daemon with N endpoints (default
# 200), each probed every second on two layers (alive /health and the
# model list /v1/models): 2N probes per second against one local backend.
# Loopback only; bounded in time (WARMUP + SECS seconds).
#   benches/probe-overhead.sh               # N=200 SECS=60
#   N=50 SECS=20 benches/probe-overhead.sh
set -euo pipefail

N=${N:-200}
SECS=${SECS:-60}
WARMUP=${WARMUP:-10}
PORT=${PORT:-18081}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=$(mktemp -d /tmp/inferdns-overhead.XXXXXX)
HZ=$(getconf CLK_TCK)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN"
}
trap cleanup EXIT

echo "Building release binary..." >&2
(cd "$ROOT" && cargo build --release --locked --quiet)
BIN="$ROOT/target/release/inferdns"

# One backend for every endpoint: /health and /v1/models as static files.
mkdir -p "$RUN/www/v1"
echo '{"status":"ok"}' > "$RUN/www/health"
echo '{"object":"list","data":[{"id":"llama-3.1-8b-instruct","object":"model"}]}' > "$RUN/www/v1/models"
timeout $((WARMUP + SECS + 60)) python3 -c "
import http.server, functools, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
handler.log_message = lambda *a: None
# HTTP/1.1: connections stay open between probes, as a model server's do.
http.server.SimpleHTTPRequestHandler.protocol_version = 'HTTP/1.1'
http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), handler).serve_forever()
" "$PORT" "$RUN/www" >/dev/null 2>&1 &
PIDS+=($!)

{
  cat <<CONF
[server]
dns-listen = ["127.0.0.1:0"]
admin-listen = "127.0.0.1:0"
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.inference.example.com", contact = "hostmaster.inference.example.com" }
ns = [{ name = "ns1.inference.example.com", addresses = ["127.0.0.1"] }]
CONF
  tiers=""
  for i in $(seq "$N"); do
    echo "[regions.r$i]"
    echo "endpoints = [{ address = \"127.0.0.1\", port = $PORT }]"
    echo "probe = { path = \"/health\", interval = \"1s\", timeout = \"1s\", models-path = \"/v1/models\", models-interval = \"1s\" }"
    tiers="$tiers\"r$i\", "
  done
  echo "[services.chat]"
  echo "model = \"llama-3.1-8b-instruct\""
  echo "tiers = [[${tiers%, }]]"
} > "$RUN/inferdns.toml"

"$BIN" check --config "$RUN/inferdns.toml" >/dev/null
RUST_LOG=warn "$BIN" run --config "$RUN/inferdns.toml" > "$RUN/out" 2> "$RUN/err" &
PID=$!
PIDS+=($PID)
for _ in $(seq 100); do grep -q "inferdns listening" "$RUN/out" 2>/dev/null && break; sleep 0.1; done
ADMIN=$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' "$RUN/out")
sleep "$WARMUP"
probes() { curl -s "http://$ADMIN/metrics" | awk '/^inferdns_probes_total/ {s += $2} END {print s + 0}'; }
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
p0=$(probes); c0=$(cpu)
sleep "$SECS"
p1=$(probes); c1=$(cpu)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
fails=$(curl -s "http://$ADMIN/metrics" | awk '/^inferdns_probes_total/ && !/result="ok"/ {s += $2} END {print s + 0}')
curl -s "http://$ADMIN/metrics" | awk '/^inferdns_probes_total/ && !/result="ok"/ {split($1, a, "result=\""); split(a[2], b, "\""); t[b[1]] += $2} END {for (k in t) printf "failed probes, %s: %d\n", k, t[k]}'
python3 - "$N" "$SECS" "$p0" "$p1" "$c0" "$c1" "$HZ" "$rss" "$hwm" "$fails" <<'PY'
import sys
n, secs, p0, p1, c0, c1, hz, rss, hwm, fails = sys.argv[1:]
secs, hz = float(secs), float(hz)
probes = float(p1) - float(p0)
cpu_s = (float(c1) - float(c0)) / hz
print(f"endpoints: {n}, layers: alive + model list, interval 1 s, window {secs:.0f} s")
print(f"probes: {probes:.0f} ({probes / secs:.0f}/s), failed probes since start: {fails}")
print(f"daemon CPU: {cpu_s:.2f} s over {secs:.0f} s = {100 * cpu_s / secs:.1f}% of one core, {1e6 * cpu_s / max(probes, 1):.0f} us per probe")
print(f"daemon memory: RSS {int(rss) / 1024:.1f} MiB (peak {int(hwm) / 1024:.1f} MiB)")
PY
