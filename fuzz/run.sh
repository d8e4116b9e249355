#!/usr/bin/env bash
# Builds the fuzz targets and runs each one for a bounded time, starting
# from its seeds (fuzz/seeds/<target>/, in git) and the working corpus
# (fuzz/corpus/<target>/, git-ignored, kept between local runs).
#
#   fuzz/run.sh            each target 20 s (what .ci/run does)
#   fuzz/run.sh 600        each target 10 minutes
#   fuzz/run.sh 60 query   one target
#
# Needs the nightly toolchain (libFuzzer's coverage flags) and cargo-fuzz
# (installed here when missing). Without nightly: a visible skip, except
# under CI=true, where it is an error: CI machines carry nightly in their
# image, so its absence is a broken machine, not a reason to pass.
# Built without a sanitizer (`-s none`): the crate's only `unsafe` is the
# batched UDP I/O (src/dns/mmsg.rs) and the thread scheduling calls
# (src/sched.rs), which no target reaches, and
# AddressSanitizer would double the build (ring's C included) and halve
# the executions; debug assertions and overflow checks stay on.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
shift || true

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  msg="the nightly toolchain is missing (rustup toolchain install nightly): fuzz targets not built or run"
  if [ "${CI:-}" = true ]; then
    echo "error: $msg" >&2
    exit 1
  fi
  echo "== SKIPPED: $msg"
  exit 0
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "== cargo install cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

echo "== cargo +nightly fuzz build"
cargo +nightly fuzz build -s none

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
for target in "${targets[@]}"; do
  echo "== fuzz $target for ${secs}s"
  mkdir -p "corpus/$target"
  # New inputs go to the first directory (the working corpus), never to
  # the seeds. A crash stops the run and leaves fuzz/artifacts/<target>/.
  log="corpus/$target.log"
  status=0
  cargo +nightly fuzz run -s none "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+== |thread .* panicked|SUMMARY|artifact_prefix|Test unit written)' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "error: fuzz target $target failed (exit $status; fuzz/artifacts/$target/, fuzz/$log)" >&2
    exit 1
  fi
done
