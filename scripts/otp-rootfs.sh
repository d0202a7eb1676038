#!/usr/bin/env bash
# Builds the root filesystems of the OTP release matrix
# (tests/e2e_otp_matrix.rs): one Debian tree per OTP release, with
# erlang-nox and elixir from Debian's own packages, under
# target/otp-rootfs/<release>/. A tree that is complete (marked by its
# .distproxy-otp file) is kept, so this runs once per machine or CI run;
# delete the directory to rebuild it.
#
#   27  Debian trixie  (erts 15.x, Elixir 1.18)
#   29  Debian sid     (its Release file may be past Valid-Until)
#   25  the host itself when its erl is OTP 25 (Debian 12); otherwise a
#       bookworm tree is built here too.
#
# The harness runs a node of release R as `chroot target/otp-rootfs/R erl
# ...` inside a pod's network namespace (tests/support/otp.rs). Needs root
# and mmdebstrap; network access to deb.debian.org.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DISTPROXY_OTP_ROOTFS:-target/otp-rootfs}
mkdir -p "$out"

if ! command -v mmdebstrap >/dev/null 2>&1 && [ "${DISTPROXY_SKIP_INSTALL:-}" != 1 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "otp-rootfs: installing mmdebstrap" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends mmdebstrap
fi

# build RELEASE SUITE [mmdebstrap options...]
build() {
  local release=$1 suite=$2
  shift 2
  local dir=$out/$release
  if [ -f "$dir/.distproxy-otp" ]; then
    echo "otp-rootfs: OTP $release: $(cat "$dir/.distproxy-otp") (cached in $dir)"
    return
  fi
  echo "otp-rootfs: building OTP $release from Debian $suite in $dir" >&2
  rm -rf "$dir" "$dir.tmp"
  # Up to three attempts: a mirror can fail now and then.
  local try
  for try in 1 2 3; do
    if timeout 900 mmdebstrap --quiet --variant=apt --include=erlang-nox,elixir \
      "$@" "$suite" "$dir.tmp"; then
      break
    fi
    rm -rf "$dir.tmp"
    [ "$try" -lt 3 ] || { echo "otp-rootfs: mmdebstrap $suite failed" >&2; exit 1; }
    sleep 5
  done
  # Mount points for what the harness binds into the tree when it starts a
  # node: the pod's hosts file and resolver, /proc, /dev.
  touch "$dir.tmp/etc/hosts" "$dir.tmp/etc/resolv.conf"
  mkdir -p "$dir.tmp/proc" "$dir.tmp/dev" "$dir.tmp/tmp"
  local otp erts elixir
  otp=$(chroot "$dir.tmp" erl -noshell -eval \
    'io:put_chars(erlang:system_info(otp_release)), halt().')
  erts=$(chroot "$dir.tmp" erl -noshell -eval \
    'io:put_chars(erlang:system_info(version)), halt().')
  elixir=$(chroot "$dir.tmp" dpkg-query -W -f '${Version}' elixir)
  if [ "$otp" != "$release" ]; then
    echo "otp-rootfs: Debian $suite has OTP $otp, not $release" >&2
    rm -rf "$dir.tmp"
    exit 1
  fi
  echo "otp=$otp erts=$erts elixir=$elixir suite=$suite" >"$dir.tmp/.distproxy-otp"
  mv "$dir.tmp" "$dir"
  echo "otp-rootfs: OTP $release: $(cat "$dir/.distproxy-otp")"
}

host_otp=$(erl -noshell -eval 'io:put_chars(erlang:system_info(otp_release)), halt().' 2>/dev/null || true)
if [ "$host_otp" = 25 ]; then
  echo "otp-rootfs: OTP 25: the host's own erl"
else
  build 25 bookworm
fi
build 27 trixie
build 29 sid --aptopt='Acquire::Check-Valid-Until "false"'
