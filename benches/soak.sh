#!/usr/bin/env bash
# Chaos soak of the release daemon (examples/soak.rs), loopback only,
# bounded in time: ECS query load from clients in 26 networks (EU and its
# territories, US, CA, JP, SG, elsewhere, unknown) against four services
# (failover, proximity, capacity, failover with residency), while a seeded
# schedule kills, hangs, rate-limits (429), slow-drips (body one byte at a
# time), 503s and loads the six simulated regions, reloads the policies
# (one in three broken) and swaps the GeoIP file (one in three truncated).
# Every reply is checked; any violation exits 1. See the top of
# examples/soak.rs.
#
#   benches/soak.sh                      # 10 minutes, seed from the clock
#   SOAK_SECONDS=60 benches/soak.sh      # what .ci/run does
#   SOAK_SEED=7 benches/soak.sh          # replay a schedule
#   SOAK_PROFILE=debug benches/soak.sh   # the debug build
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
# SOAK_PROFILE=debug soaks the debug build (overflow checks and debug
# assertions on; what `cargo test` already built, so .ci/run adds no
# build); the default is the release build users run, built on its own
# (its features, not the dev-dependencies' ones) before the driver.
profile=${SOAK_PROFILE:-release}
case "$profile" in
  release | debug) ;;
  *) echo "SOAK_PROFILE must be release or debug" >&2; exit 2 ;;
esac
if [ "$profile" = release ]; then
  cargo build --release --locked --bin inferdns
  cargo build --release --locked --example soak
else
  # One invocation: the daemon gets the features `cargo test` built it
  # with, so nothing is compiled again.
  cargo build --locked --bin inferdns --example soak
fi
echo "== ${profile} build"
INFERDNS_BIN="target/$profile/inferdns" \
  "target/$profile/examples/soak" --seconds "$secs" --seed "$seed" --qps "$qps" --out "$out"
