#!/usr/bin/env bash
# gpuval-prepare.sh -- prepare, on this machine, what scripts/gpu-validate.sh needs on the GPU one.
#
#   bash scripts/gpuval-prepare.sh REFERENCE_GIT_DIR [CIFAR_PACK_DIR]
#
# REFERENCE_GIT_DIR: a git directory of github.com/Tab-ct/ContSup (the `fetch` tool's
#   github:Tab-ct/ContSup gives /work/.mirror/Tab-ct+ContSup/repo); its networks_dev/ is
#   exported into .gpuval/ContSup (git-ignored, never committed: it is not this project's code).
# CIFAR_PACK_DIR: the JPEG pack of CIFAR-10 (default ../shared/data/cifar10: cifar10_jpeg.npz,
#   unpack.py, SHA256SUMS, README.md), copied into .gpuval/cifar10 (the GPU machine has no ../shared).
# Then it checks that what the device tool sends (tree + .gpuval) stays under 64 MiB.
# Run it in the root of the checkout the session was started in (the tool sends that one).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
REF=${1:?usage: gpuval-prepare.sh REFERENCE_GIT_DIR [CIFAR_PACK_DIR]}
PACK=${2:-$ROOT/../shared/data/cifar10}
PY=${PYTHON:-python3}
[ -f "$PACK/cifar10_jpeg.npz" ] || { echo "gpuval-prepare: no cifar10_jpeg.npz in '$PACK'" >&2; exit 2; }
git --git-dir="$REF" rev-parse --verify -q HEAD >/dev/null || { echo "gpuval-prepare: '$REF' is not a git directory" >&2; exit 2; }
git check-ignore -q .gpuval || { echo "gpuval-prepare: .gpuval is not git-ignored here (add /.gpuval/ to .gitignore)" >&2; exit 2; }
rm -rf .gpuval/ContSup .gpuval/cifar10
mkdir -p .gpuval/ContSup .gpuval/cifar10
git --git-dir="$REF" archive HEAD networks_dev | tar -x -C .gpuval/ContSup
echo "reference: $(git --git-dir="$REF" rev-parse HEAD) networks_dev/ -> .gpuval/ContSup"
cp "$PACK"/cifar10_jpeg.npz "$PACK"/unpack.py .gpuval/cifar10/
cp "$PACK"/SHA256SUMS "$PACK"/README.md .gpuval/cifar10/ 2>/dev/null || true
echo "CIFAR-10 pack: $PACK -> .gpuval/cifar10"
# the tree travels without .git: record what is being validated
echo "$(git rev-parse HEAD) with $(git status --porcelain | grep -vc '^??') modified tracked files ($(date -u +%FT%TZ))" > .gpuval/commit.txt
"$PY" scripts/gpuval_tools.py travel-size --carry .gpuval
