#!/usr/bin/env bash
# Runs the whole distproxy test suite: unit, integration, end-to-end (real
# OTP nodes in network-namespace pods) and deployment checks.
#
# Installs what the tests need when it is missing (Debian: erlang-nox,
# elixir, iproute2, tcpdump; deployment linters into .tools/; podman and
# the container suite's base images). Run as root:
# the end-to-end tests create network namespaces. Set DISTPROXY_SKIP_E2E=1
# to skip them explicitly (they fail, saying why, when they cannot run).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "test-all: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

need=()
command -v erl >/dev/null 2>&1 || need+=(erlang-nox)
command -v erlc >/dev/null 2>&1 || need+=(erlang-base)
command -v elixir >/dev/null 2>&1 || need+=(elixir)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "test-all: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if [ -x scripts/install-deploy-tools.sh ] || [ -f scripts/install-deploy-tools.sh ]; then
  bash scripts/install-deploy-tools.sh
fi

# The container suite (tests/containers.rs): podman, runc, mmdebstrap,
# catatonit, iptables, containers.conf and the stand-in base images.
# DISTPROXY_SKIP_CONTAINERS=1 skips it explicitly.
if [ "${DISTPROXY_SKIP_CONTAINERS:-}" != 1 ]; then
  bash scripts/containers-setup.sh
fi

# Benches must at least build; they are run by hand (see README).
cargo build --release --benches
# Library, binary and integration tests (no doc tests: the crate has none).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --no-fail-fast --lib --bins --tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite.
read -r passed failed < <(awk '/^test result:/ {
    for (i = 1; i < NF; i++) {
      if ($(i + 1) ~ /^passed;/) p += $i
      if ($(i + 1) ~ /^failed;/) f += $i
    }
  } END { print p + 0, f + 0 }' "$log")
echo
echo "total: $passed passed, $failed failed"
exit "$status"
