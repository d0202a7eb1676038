#!/usr/bin/env bash
# Extra suite for scripts/test-all.sh: a short run of every bench, so that a
# bench that no longer runs to its end (not only one that no longer builds)
# fails CI. The figures themselves are measured by hand with the full runs
# (DEVELOPING.md, docs/benchmarks.md): these runs are too short and the CI
# machine too noisy for them to mean anything, and nothing here asserts a
# timing. Benches that need root or `erl` say why and fail without them,
# unless DISTPROXY_SKIP_E2E=1 (as the e2e suites).
#
# Prints "N passed, M failed" for test-all.sh.
set -u
cd "$(dirname "$0")/../.."

passed=0
failed=0
smoke() {
  local name=$1
  shift
  echo "== bench-smoke $name: $*"
  local start=$SECONDS
  if "$@"; then
    passed=$((passed + 1))
    echo "== bench-smoke $name: ok ($((SECONDS - start)) s)"
  else
    failed=$((failed + 1))
    echo "== bench-smoke $name: FAILED ($((SECONDS - start)) s)"
  fi
}

# Built by the build suite (`cargo build --profile ci --benches`).
# Criterion runs each benchmark once; the relay and tunnel benches their
# quick plans (the tunnel's BEAM part needs `erl`); 500 held connections.
smoke codec cargo bench --profile ci --bench codec -- --test
smoke relay cargo bench --profile ci --bench relay -- --quick
smoke tunnel cargo bench --profile ci --bench tunnel -- --quick
smoke hold cargo bench --profile ci --bench hold -- 500 --rounds 1

if [ "${DISTPROXY_SKIP_E2E:-}" = 1 ]; then
  echo "bench-smoke: beam, mesh and attack skipped (DISTPROXY_SKIP_E2E=1)"
else
  # Real OTP nodes; one round of the quick plan (HAProxy's row is left out
  # when haproxy is not installed).
  smoke beam env BEAM_BENCH_ROUNDS=1 cargo bench --profile ci --bench beam -- --quick
  # Two pods of three nodes, every layout.
  smoke mesh cargo bench --profile ci --bench mesh -- 2 3
  # Three seconds of each attack.
  smoke attack env ATTACK_SECS=3 cargo bench --profile ci --bench attack
fi

echo "bench-smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
