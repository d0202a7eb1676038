#!/usr/bin/env bash
# A short coverage-guided fuzzing pass of every target in fuzz/ (cargo fuzz,
# libFuzzer): each runs for DISTPROXY_FUZZ_SECONDS (default 10) from its
# committed corpus. Long runs are done by hand (DEVELOPING.md, "Fuzzing").
#
# Installs the nightly toolchain (minimal profile) and cargo-fuzz when they
# are missing. When fuzzing cannot run it fails and says why, unless
# DISTPROXY_SKIP_FUZZ=1 opts out explicitly. New corpus entries go to a
# temporary directory, so the checkout stays clean; a crash input is left in
# fuzz/artifacts/<target>/ (replayed by tests/fuzz_corpus.rs).
# Prints one "fuzz-smoke: N passed, N failed" line (one test per target).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${DISTPROXY_SKIP_FUZZ:-}" = 1 ]; then
  echo "fuzz-smoke: skipped (DISTPROXY_SKIP_FUZZ=1)"
  echo "fuzz-smoke: 0 passed, 0 failed"
  exit 0
fi
fail() {
  echo "fuzz-smoke: cannot run: $*" >&2
  echo "fuzz-smoke: set DISTPROXY_SKIP_FUZZ=1 to skip fuzzing explicitly" >&2
  echo "fuzz-smoke: 0 passed, 1 failed"
  exit 1
}

seconds=${DISTPROXY_FUZZ_SECONDS:-10}
command -v rustup >/dev/null 2>&1 || fail "rustup not found (needed for the nightly toolchain)"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing the nightly toolchain" >&2
  rustup toolchain install nightly --profile minimal >&2 || fail "rustup could not install nightly"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz >&2 || fail "cargo install cargo-fuzz failed"
fi

targets=$(cargo +nightly fuzz list) || fail "cargo fuzz list failed"
[ -n "$targets" ] || fail "no fuzz targets in fuzz/"
start=$(date +%s)
# An unoptimised build without a sanitizer: the code under test is safe
# Rust, and this build takes about half the CPU time of `-O` with
# AddressSanitizer (the long runs by hand use those, see DEVELOPING.md).
flags=(--dev --sanitizer none)
cargo +nightly fuzz build "${flags[@]}" || fail "the fuzz targets do not build"
echo "fuzz-smoke: built in $(($(date +%s) - start)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
for target in $targets; do
  [ -d "fuzz/corpus/$target" ] || fail "fuzz/corpus/$target is missing"
  mkdir -p "$work/$target"
  echo "=== fuzz $target (${seconds} s)"
  # The fresh directory comes first: libFuzzer adds new inputs to it only.
  if cargo +nightly fuzz run "${flags[@]}" "$target" "$work/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -jobs=1 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$work/$target.log" 2>&1; then
    passed=$((passed + 1))
    grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$work/$target.log" | tail -2 || true
  else
    failed=$((failed + 1))
    tail -40 "$work/$target.log"
    echo "fuzz-smoke: $target FAILED; the input is in fuzz/artifacts/$target/"
  fi
done
echo "fuzz-smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
