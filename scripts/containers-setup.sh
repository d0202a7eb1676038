#!/usr/bin/env bash
# Prepares a Debian machine for the container suite (tests/containers.rs):
# podman with runc, and local stand-ins for the base images that
# deploy/docker/Dockerfile names in its FROM lines, built from Debian's
# packages because container registries may be out of reach.
#
#   1. apt-get install podman mmdebstrap runc iptables catatonit (when missing).
#   2. /etc/containers/containers.conf: [containers] default_ulimits = []
#      (root cannot raise rlimits on some CI kernels; podman would try to).
#      The suite runs podman with --runtime runc --cgroup-manager cgroupfs
#      (crun fails on cgroup v1 layouts like this CI machine's).
#   3. Root filesystems with mmdebstrap, cached as tarballs under
#      target/containers/bases/, imported with `podman import` and tagged with
#      the exact names the Dockerfile's FROM lines use (ARG defaults read from
#      the Dockerfile), so `podman build --pull=never` builds it unchanged:
#        gcr.io/distroless/cc-debian13:nonroot  trixie: base-files, netbase,
#                                               libc6, libgcc-s1; no shell;
#                                               user nonroot (65532)
#        erlang:${OTP_VERSION}                  bookworm + erlang-base (OTP 25)
#        erlang:${DEMO_OTP_VERSION}-slim        trixie + erlang-base (OTP 27)
#        rust:${RUST_VERSION}-slim-trixie       the distroless stand-in under
#                                               that name: the suite never runs
#                                               the Rust stage (it replaces it
#                                               with the host-built binary, see
#                                               tests/containers.rs), the tag
#                                               only lets the FROM resolve.
#
# Idempotent: a second run only re-tags images that are missing. Run as root.
# Environment: DISTPROXY_CONTAINERS_CACHE (default <repo>/target/containers).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DISTPROXY_CONTAINERS_CACHE:-$repo/target/containers}/bases"
dockerfile="$repo/deploy/docker/Dockerfile"
podman=(podman --runtime runc --cgroup-manager cgroupfs)

log() { printf 'containers-setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (rootful podman, iptables)"
  exit 1
fi

need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
# The pause process of pods' infra containers.
command -v catatonit >/dev/null 2>&1 || need+=(catatonit)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

conf=/etc/containers/containers.conf
mkdir -p /etc/containers
if ! grep -qs '^[[:space:]]*default_ulimits' "$conf"; then
  log "setting default_ulimits = [] in $conf"
  if grep -qs '^\[containers\]' "$conf"; then
    sed -i 's/^\[containers\].*/&\ndefault_ulimits = []/' "$conf"
  else
    printf '\n[containers]\ndefault_ulimits = []\n' >>"$conf"
  fi
fi

# ARG defaults of the Dockerfile, e.g. `arg OTP_VERSION` -> 25.
arg() {
  sed -n "s/^ARG $1=\(.*\)$/\1/p" "$dockerfile" | head -n1
}
rust_version="$(arg RUST_VERSION)"
otp_version="$(arg OTP_VERSION)"
demo_otp_version="$(arg DEMO_OTP_VERSION)"
for v in rust_version otp_version demo_otp_version; do
  [ -n "${!v}" ] || { log "no default for $v in $dockerfile"; exit 1; }
done

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# Bump when a recipe below changes: cached tarballs are rebuilt.
recipe=1
# Bump when the image settings of `import` calls change: re-imported.
import_rev=2

distroless_hook='
set -e
root="$1"
mkdir -p "$root/tmp" "$root/home/nonroot" "$root/etc"
chmod 1777 "$root/tmp"
chown 65532:65532 "$root/home/nonroot"
printf "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n" >"$root/etc/passwd"
printf "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n" >"$root/etc/group"
# distroless has no shell: neither has the stand-in.
rm -f "$root/bin/sh" "$root/usr/bin/sh" "$root/bin/dash" "$root/usr/bin/dash"
'

# rootfs NAME SUITE VARIANT PACKAGES [HOOK]
rootfs() {
  local name="$1" suite="$2" variant="$3" packages="$4" hook="${5:-}"
  local tar="$cache/$name-r$recipe.tar"
  if [ ! -s "$tar" ]; then
    log "building $name root filesystem ($suite, $variant: $packages)"
    local args=(--quiet --format=tar --variant="$variant" --include="$packages")
    [ -z "$hook" ] || args+=(--customize-hook="$hook")
    mmdebstrap "${args[@]}" "$suite" "$tar.part" >"$cache/$name.log" 2>&1 || {
      log "mmdebstrap $name failed:"
      tail -n 30 "$cache/$name.log" >&2
      return 1
    }
    mv "$tar.part" "$tar"
  fi
}

# import NAME TAG [--change ...]
import() {
  local name="$1" tag="$2"
  shift 2
  local tar="$cache/$name-r$recipe.tar"
  local id
  id="$(cat "$tar.id$import_rev" 2>/dev/null || true)"
  if [ -z "$id" ] || ! "${podman[@]}" image exists "$id"; then
    log "importing $name"
    id="$("${podman[@]}" import --quiet "$@" "$tar" "localhost/distproxy-standin-$name:r$recipe-$import_rev")"
    printf '%s\n' "$id" >"$tar.id$import_rev"
  fi
  "${podman[@]}" tag "$id" "$tag"
}

pids=()
rootfs distroless trixie extract base-files,netbase,tzdata,libc6,libgcc-s1 "$distroless_hook" & pids+=($!)
rootfs otp-bookworm bookworm apt erlang-base & pids+=($!)
rootfs otp-trixie trixie apt erlang-base,ca-certificates & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done

import distroless "gcr.io/distroless/cc-debian13:nonroot" \
  --change 'USER 65532' --change 'WORKDIR /home/nonroot' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
import distroless "rust:${rust_version}-slim-trixie"
path='ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
import otp-bookworm "erlang:${otp_version}" --change "$path" --change 'CMD ["erl"]'
import otp-trixie "erlang:${demo_otp_version}-slim" --change "$path" --change 'CMD ["erl"]'
log "base images ready: gcr.io/distroless/cc-debian13:nonroot rust:${rust_version}-slim-trixie erlang:${otp_version} erlang:${demo_otp_version}-slim"
