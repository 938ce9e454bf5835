#!/usr/bin/env bash
# fetch-references.sh -- put the authors' code that `python -m bench.parity` compares against
# into a git-ignored folder, one checkout per repository name, at the commits the parity
# results were measured on. Their code is imported from there at run time and never committed.
#
#   bash scripts/fetch-references.sh [DIR]            # clone from github.com (default DIR: .refs)
#   MIRRORS=/work/.mirror bash scripts/fetch-references.sh [DIR]
#                                                     # or export from bare mirrors <owner>+<name>/repo
# then
#   CONTSUP_REFERENCE_DIR=DIR python -m bench.parity          (or --ref-dir DIR)
#   CONTSUP_REFERENCE_DIR=DIR python -m pytest -m reference tests/test_parity.py
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$ROOT/.refs}
# owner/name commit
REPOS=(
  "Tab-ct/ContSup 0717be600730f3eeeac6b740f37822896af1bc2c"
  "blackfeather-wang/InfoPro-Pytorch a38362a2b59949a82b7451af7b95dc0b8da31a0b"
  "eugenium/DGL 4cc7c178ecfc0f780976cda99abf57517bed7b00"
  "ChenxiangMA/AugLocal 98c90d61455cc00d5d8f31f485bfbaa0ece073a0"
  "adeetyapatel12/GN-DGL b7a3c1a9be326c8189f862b9cc3e5f25be6ecdda"
)
if [ "$DIR" = "$ROOT/.refs" ] && ! git -C "$ROOT" check-ignore -q .refs/; then  # the slash: .refs need not exist yet
  echo "fetch-references: .refs is not git-ignored here (add /.refs/ to .gitignore)" >&2
  exit 2
fi
mkdir -p "$DIR"
for entry in "${REPOS[@]}"; do
  read -r repo commit <<<"$entry"
  name=${repo#*/}
  out=$DIR/$name
  rm -rf "$out"
  mkdir -p "$out"
  if [ -n "${MIRRORS:-}" ]; then
    git --git-dir="$MIRRORS/${repo/\//+}/repo" archive "$commit" | tar -x -C "$out"
  else
    tmp=$(mktemp -d)
    git clone -q "https://github.com/$repo" "$tmp/src"
    git -C "$tmp/src" archive "$commit" | tar -x -C "$out"
    rm -rf "$tmp"
  fi
  echo "$repo@$commit -> $out"
done
