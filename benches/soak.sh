#!/usr/bin/env bash
# Chaos soak of the release daemon (benches/soak.rs), loopback only,
# bounded in time: ECS query load from clients in 26 networks (EU and its
# territories, US, CA, JP, SG, elsewhere, unknown) against four services
# (failover, proximity, capacity, failover with residency), while a seeded
# schedule kills, hangs, rate-limits (429), slow-drips (body one byte at a
# time), 503s and loads the six simulated regions, reloads the policies
# (one in three broken) and swaps the GeoIP file (one in three truncated).
# Every reply is checked; any violation exits 1. See the top of soak.rs.
#
#   benches/soak.sh                      # 10 minutes, seed from the clock
#   SOAK_SECONDS=60 benches/soak.sh      # what .ci/run does
#   SOAK_SEED=7 benches/soak.sh          # replay a schedule
#
# The summary (JSON) goes to benches/results/soak-<time>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SOAK_SECONDS:-600}
seed=${SOAK_SEED:-$(date +%s)}
qps=${SOAK_QPS:-1000}
mkdir -p benches/results
out=benches/results/soak-$(date -u +%Y%m%d-%H%M%S).json
echo "== soak: ${secs}s at ${qps} q/s, seed $seed (replay: SOAK_SEED=$seed)"
cargo bench --locked --bench soak -- --seconds "$secs" --seed "$seed" --qps "$qps" --out "$out"
