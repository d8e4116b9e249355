#!/usr/bin/env bash
# inferdns next to Knot and gdnsd in one run: the same zone, the same health-checked and GeoIP names,
# dnsperf against each server in turn, one Markdown table out.
#
#   benches/compare.sh                 # SECS=8 REPS=3 LAT_SECS=5 RATE=5000: about 10 minutes
#   QUICK=1 benches/compare.sh         # SECS=3 REPS=1 LAT_SECS=2: about 2 minutes, to check that it works
#
# The method, and the code that carries it out, are the anchors' (../shared/anchors, override with ANCHORS=):
# lib.sh starts and stops the servers and the two health backends by pid, bench.py runs one dnsperf
# measurement with CPU accounting. Server (every thread) pinned to SERVER_CPU (0), dnsperf to CLIENT_CPU (1),
# both SCHED_FIFO 50; one UDP worker per server; dnsperf -c 4 -T 1 -q 100 -l SECS, one query name per run,
# 2 s warm-up; latency from a separate run at RATE q/s (dnsperf -Q RATE -v, every answer; half the measured
# capacity if RATE would overload a server). Reps are interleaved: rep 1 of every server, then rep 2, ...;
# medians are reported. Configs: benches/compare/ (copies of the anchors' ones, one GeoIP City database for
# gdnsd and inferdns). Knot serves the static name only, gdnsd has no capacity-weighted answer.
#
# Names (zone inference.example.com; health backends 127.0.0.11:8081 primary, 127.0.0.12:8081 secondary):
#   static   A 192.0.2.10                                   knot, gdnsd, inferdns
#   dyn      failover primary -> secondary, HTTP /health     gdnsd metafo + http_status, inferdns failover service
#   geo      GeoIP by resolver address (127/8 -> DE)         gdnsd geoip plugin, inferdns proximity service
#   geo-ecs  the same name with ECS 198.51.100.0/24 (US)     (answer: the secondary)
#   cap      capacity-weighted draw over both regions        inferdns only
#
# Installs dnsperf, knot, gdnsd, dig and the MaxMind DB writer (for the synthetic GeoIP database) with
# apt-get when missing; builds inferdns (cargo build --release --locked) unless INFERDNS_BIN is given.
# Everything listens on and talks to 127.0.0.x only; every wait is bounded in time, every load run by -l;
# the daemons and backends started here are stopped by pid on exit.
#
# env: SECS REPS LAT_SECS RATE OUTSTANDING CLIENTS QUICK=1 INFERDNS_BIN ANCHORS RUN SERVER_CPU CLIENT_CPU
#      SERVERS="knot inferdns" KINDS="static dyn": a subset (the table then has only those)
# out: the table on stdout; every measurement in benches/results/compare-<stamp>.jsonl (first line: run metadata)
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=$(cd "${ANCHORS:-$ROOT/../shared/anchors}" 2>/dev/null && pwd) || {
  echo "compare.sh: the anchors (lib.sh, bench.py) are not at ${ANCHORS:-$ROOT/../shared/anchors}; set ANCHORS" >&2; exit 1; }
if [ "${QUICK:-0}" = 1 ]; then SECS=${SECS:-3}; REPS=${REPS:-1}; LAT_SECS=${LAT_SECS:-2}; fi
SECS=${SECS:-8}; REPS=${REPS:-3}; LAT_SECS=${LAT_SECS:-5}; RATE=${RATE:-5000}
OUTSTANDING=${OUTSTANDING:-100}; CLIENTS=${CLIENTS:-4}
export RUN=${RUN:-/tmp/inferdns-compare}
# shellcheck source=/dev/null
source "$ANCHORS/lib.sh"   # PORT, PRIMARY_IP, SECONDARY_IP, start_/stop_server, start_/stop_backend, stop_all, render, log
CONF="$ROOT/benches/compare"  # lib.sh renders the gdnsd config from $CONF; everything else is rendered below
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=${OUT:-$ROOT/benches/results/compare-$STAMP.jsonl}
ECS_US=00011800c63364   # EDNS Client Subnet option payload: family 1, /24, 198.51.100.0
SERVERS=${SERVERS:-knot gdnsd inferdns}

records_all() { case "$1" in knot) echo static ;; gdnsd) echo "static dyn geo geo-ecs" ;; inferdns) echo "static dyn geo geo-ecs cap" ;; esac; }
records_for() { # the server's kinds, only those in KINDS when it is set
  local r; for r in $(records_all "$1"); do
    [ -z "${KINDS:-}" ] || [[ " $KINDS " == *" $r "* ]] && echo "$r"
  done
}
qname_of() { case "$1" in geo-ecs) echo geo.inference.example.com ;; *) echo "$1.inference.example.com" ;; esac; }
expect_of() { case "$1" in static) echo 192.0.2.10 ;; dyn|geo) echo "$PRIMARY_IP" ;; geo-ecs) echo "$SECONDARY_IP" ;; cap) echo any ;; esac; }
check_answer() { # server record -> first address of the answer
  local extra=()
  [ "$2" = geo-ecs ] && extra=(+subnet=198.51.100.0/24)
  dig +short +tries=1 +time=1 "${extra[@]}" -p "${PORT[$1]}" @127.0.0.1 "$(qname_of "$2")" A 2>/dev/null | head -1
}

install_missing() { # Debian packages, only those missing; the packaged daemons must not start (policy-rc.d)
  local p missing=()
  for p in dnsperf knot gdnsd bind9-dnsutils libmaxmind-db-writer-perl curl util-linux iproute2; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -q >/dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get install -y -q --no-install-recommends "${missing[@]}" >"$RUN/apt.log" 2>&1
  local rc=$?
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ $rc = 0 ] || { log "apt-get install failed, see $RUN/apt.log"; return 1; }
}

prepare() { # render every config into $RUN
  mkdir -p "$RUN"/{zones,knot/db,gdnsd/etc/zones,gdnsd/run,gdnsd/state,geo,inferdns} "$PIDS"
  cp "$CONF/zones/inference.example.com.zone" "$RUN/zones/"
  cat "$CONF/zones/inference.example.com.zone" "$CONF/zones/inference.example.com.gdnsd.dyn" \
    > "$RUN/gdnsd/etc/zones/inference.example.com"
  [ -s "$RUN/geo/anchors-city.mmdb" ] || perl "$ANCHORS/make-mmdb-city.pl" "$RUN/geo/anchors-city.mmdb" >&2 || return 1
  render "$CONF/knot.conf.in" "$RUN/knot/knot.conf"
  # inferdns: SOA, apex NS and glue come from its main file, so its zone file carries only the rest
  grep -vE '^\s*(@|ns1)\s' "$CONF/zones/inference.example.com.zone" > "$RUN/inferdns/static.zone"
  render "$CONF/inferdns/inferdns.toml.in" "$RUN/inferdns/inferdns.toml"
  "$INFERDNS_BIN" check --config "$RUN/inferdns/inferdns.toml" >&2 || { log "inferdns rejects $RUN/inferdns/inferdns.toml"; return 1; }
}

mkdir -p "$RUN" "$(dirname "$OUT")"
install_missing || exit 1
for tool in dnsperf dig knotd gdnsd python3 taskset chrt curl; do
  command -v "$tool" >/dev/null || { log "$tool is missing"; exit 1; }
done
if [ -z "$INFERDNS_BIN" ]; then
  log "building inferdns (cargo build --release --locked)"
  (cd "$ROOT" && CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build --release --locked --quiet) || exit 1
  INFERDNS_BIN="$ROOT/target/release/inferdns"
fi

trap 'stop_all' EXIT
trap 'exit 130' INT TERM
stop_all
ports_free || exit 1
prepare || exit 1
start_backend primary "$PRIMARY_IP" || exit 1
start_backend secondary "$SECONDARY_IP" || exit 1

BUILD="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo +local-changes)"
python3 - "$OUT" <<PY
import json, subprocess, sys
v = lambda p: subprocess.run(["dpkg-query", "-W", "-f=\${Version}", p], capture_output=True, text=True).stdout
meta = {"run": "$STAMP", "host": "$(hostname)", "kernel": "$(uname -r)", "cpus": $(nproc),
        "cpu_model": """$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')""",
        "loadavg_at_start": "$(cut -d' ' -f1-3 /proc/loadavg)", "prio_mode": "$PRIO_MODE",
        "server_cpu": $SERVER_CPU, "client_cpu": $CLIENT_CPU, "secs": $SECS, "reps": $REPS, "lat_secs": $LAT_SECS,
        "rate": $RATE, "outstanding": $OUTSTANDING, "clients": $CLIENTS, "quick": "${QUICK:-0}" == "1",
        "inferdns_build": "$BUILD", "inferdns_version": "$("$INFERDNS_BIN" --version 2>/dev/null)",
        "versions": {p: v(p) for p in ["dnsperf", "knot", "gdnsd"]}}
open(sys.argv[1], "w").write(json.dumps({"meta": meta}) + "\n")
PY

begin=$SECONDS
for rep in $(seq 1 "$REPS"); do
  for srv in $SERVERS; do
    start_server "$srv" default || continue
    pid=$(cat "$PIDS/server-$srv.pid")
    for rec in $(records_for "$srv"); do
      want=$(expect_of "$rec")
      deadline=$((SECONDS + 20)); ok=0   # 5 right answers in a row, bounded
      while [ $ok -lt 5 ]; do
        got=$(check_answer "$srv" "$rec")
        if [ "$got" = "$want" ] || { [ "$want" = any ] && [ -n "$got" ]; }; then ok=$((ok + 1)); else ok=0; fi
        [ $SECONDS -ge $deadline ] && { log "WARN $srv/$rec answers '$got', want $want"; break; }
        sleep 0.2
      done
      ecs=(); [ "$rec" = geo-ecs ] && ecs=(--ecs "$ECS_US")
      tag="{\"rep\": $rep, \"server\": \"$srv\", \"record\": \"$rec\", "
      python3 "$ANCHORS/bench.py" qps --label warmup --port "${PORT[$srv]}" --qname "$(qname_of "$rec")" --secs 2 \
        --clients "$CLIENTS" --outstanding "$OUTSTANDING" "${ecs[@]}" >/dev/null
      python3 "$ANCHORS/bench.py" qps --label "$srv/$rec" --port "${PORT[$srv]}" --qname "$(qname_of "$rec")" \
        --server-pid "$pid" --secs "$SECS" --clients "$CLIENTS" --outstanding "$OUTSTANDING" "${ecs[@]}" \
        | sed "s/^{/$tag/" >> "$OUT"
      sat=$(tail -1 "$OUT" | python3 -c 'import sys,json; print(int(json.load(sys.stdin).get("qps", 0)))')
      rate=$RATE; [ "$sat" -lt $((2 * RATE)) ] && rate=$(( (sat / 2 / 100) * 100 )); [ "$rate" -ge 100 ] || rate=100
      python3 "$ANCHORS/bench.py" lat --label "$srv/$rec" --port "${PORT[$srv]}" --qname "$(qname_of "$rec")" \
        --server-pid "$pid" --secs "$LAT_SECS" --rate "$rate" --clients "$CLIENTS" "${ecs[@]}" \
        | sed "s/^{/$tag/" >> "$OUT"
      after=$(check_answer "$srv" "$rec")
      [ "$after" = "$want" ] || [ "$want" = any ] || log "WARN after the run $srv/$rec answers '$after', want $want"
      log "rep $rep $srv/$rec: $(tail -2 "$OUT" | python3 -c 'import sys,json; a=[json.loads(l) for l in sys.stdin]; print("qps=%.0f server cpu=%s%% p50=%sus p99=%sus @%s q/s" % (a[0].get("qps", 0), a[0].get("server_cpu_pct"), a[1].get("p50_us"), a[1].get("p99_us"), a[1].get("rate")))')"
    done
    stop_server "$srv"
  done
done
stop_all
printf '{"end": {"measured_secs": %d, "loadavg_at_end": "%s"}}\n' $((SECONDS - begin)) "$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT"
log "measured in $((SECONDS - begin)) s; results: $OUT"

python3 - "$OUT" "$ROOT" <<'PY'
import json, os, statistics, sys
path, root = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(path) if l.strip()]
meta = rows[0].get("meta", {})
end = next((r["end"] for r in rows if "end" in r), {})
kinds = [("static", "static A"), ("dyn", "failover, HTTP health-checked"), ("geo", "GeoIP by resolver address"),
         ("geo-ecs", "GeoIP + ECS"), ("cap", "capacity-weighted")]
servers = [("knot", "Knot " + meta.get("versions", {}).get("knot", "").split("-")[0]),
           ("gdnsd", "gdnsd " + meta.get("versions", {}).get("gdnsd", "").split("-")[0]),
           ("inferdns", "inferdns " + meta.get("inferdns_build", ""))]
def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None
def cell(r, k, srv):
    q = [x for x in r if x.get("mode") == "qps" and x.get("server") == srv and x.get("record") == k and x.get("qps")]
    l = [x for x in r if x.get("mode") == "lat" and x.get("server") == srv and x.get("record") == k]
    if not q:
        return None
    us = [x["server_cpu_pct"] / 100.0 / x["qps"] * 1e6 for x in q if x.get("server_cpu_pct") is not None]
    return {"qps": med([x["qps"] for x in q]), "us": med(us),
            "us_range": f"{min(us):.2f}–{max(us):.2f}" if len(us) > 1 else "—",
            "p50": med([x.get("p50_us") for x in l]), "p99": med([x.get("p99_us") for x in l]),
            "rate": med([x.get("rate") for x in l]), "bytes": med([x.get("resp_bytes") for x in q]),
            "lost": sum(x.get("lost", 0) for x in q + l), "reps": len(q),
            "rcodes": sorted({x.get("rcodes", "") for x in q})}
knot = cell(rows, "static", "knot")
f = lambda v, nd=0: "—" if v is None else f"{v:,.{nd}f}"
print(f"Run `{os.path.relpath(path, root)}`: medians of {meta.get('reps')} interleaved reps, {meta.get('secs')} s each "
      f"(dnsperf -c {meta.get('clients')} -q {meta.get('outstanding')}); latency at {meta.get('rate'):,} q/s for "
      f"{meta.get('lat_secs')} s; server on CPU {meta.get('server_cpu')}, dnsperf on CPU {meta.get('client_cpu')}, "
      f"SCHED_FIFO; load average at start {meta.get('loadavg_at_start')}, at end {end.get('loadavg_at_end', '?')}.\n")
print("| name kind | server | QPS | server CPU µs/query | its reps, min–max | CPU/query ÷ Knot static | QPS ÷ Knot static "
      "| p50 µs | p99 µs | reply bytes | lost |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for k, kname in kinds:
    for srv, sname in servers:
        c = cell(rows, k, srv)
        if c is None:
            print(f"| {kname} | {sname} | — | — | — | — | — | — | — | — | — |")
            continue
        ratio_us = c["us"] / knot["us"] if knot and knot["us"] and c["us"] else None
        ratio_q = c["qps"] / knot["qps"] if knot and knot["qps"] else None
        p = lambda v: f(v) + ("" if c["rate"] in (None, meta.get("rate")) else f" (@{c['rate']:,.0f})")
        print(f"| {kname} | {sname} | {f(c['qps'])} | {f(c['us'], 2)} | {c['us_range']} | {f(ratio_us, 2)}{'x' if ratio_us else ''} "
              f"| {f(ratio_q, 2)}{'x' if ratio_q else ''} | {p(c['p50'])} | {p(c['p99'])} | {f(c['bytes'])} | {c['lost']} |")
print("\nserver CPU µs/query = the server's CPU time (all threads, /proc) / answers; the fair figure where dnsperf's one "
      "core (~200k q/s) is the ceiling; its spread over the reps is the run's own noise (on this VM a server's cost moves "
      "between two levels ~12 % apart from one 8 s rep to the next, whatever the server). Reply bytes: dnsperf's average response size (no EDNS; ECS for GeoIP + ECS). "
      "'—': the server has no such name (Knot: static only; gdnsd: no capacity-weighted answer).")
PY
