#!/usr/bin/env bash
# Regenerate the DPTrainingJob and DPDataset CRDs from the pydantic models (`dptrain crd`) into the two places
# that ship it: manifests/crd.yaml (kubectl apply -k) and the Helm chart's files/crd.yaml (rendered
# by templates/crd.yaml). Never edit either by hand: tests/test_deploy_crd.py fails on drift.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dptrain="${DPTRAIN:-dptrain}"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
"$dptrain" crd >"$tmp"
for out in "$root/manifests/crd.yaml" "$root/charts/dptrain-operator/files/crd.yaml"; do
  cp "$tmp" "$out"
  echo "wrote $out" >&2
done
"$dptrain" crd --kind DPDataset >"$tmp"
for out in "$root/manifests/crd-dpdataset.yaml" "$root/charts/dptrain-operator/files/crd-dpdataset.yaml"; do
  cp "$tmp" "$out"
  echo "wrote $out" >&2
done
