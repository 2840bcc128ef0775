#!/usr/bin/env bash
# Download the Python 3.12 x86-64 wheels that an offline GPU machine lacks into .whl/ (run this on
# a machine with internet; then copy the repository, .whl/ included, and run
# benchmarks/gpu_check.sh there). Keep .whl/ out of git: echo /.whl/ >> .git/info/exclude
#
#   bash benchmarks/fetch_gpu_wheels.sh [EXTRA_REQUIREMENT ...]     e.g. ... mamba-ssm==2.2.6
#
# What the lent H200 image lacks (docs/GPU.md): only megatron-core. megatron-core 0.16.1 requires
# torch, numpy and packaging, and this project einops, psutil, pyyaml, tokenizers, tqdm and triton
# (tests: pytest, transformers, safetensors): all present there. megatron-core ships a compiled
# extension (the dataset index helpers), so its wheel must match the target's Python (cp312).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY_VERSION=${PY_VERSION:-3.12}
mkdir -p "$DEST"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || {
    [ -d .git/info ] && echo "/$DEST/" >> .git/info/exclude && echo "added /$DEST/ to .git/info/exclude"; }

REQUIREMENTS=("megatron-core==0.16.1" "$@")
# One version of each package in $DEST: two stop `pip install --no-index` on the target.
for req in "${REQUIREMENTS[@]}"; do
    name=${req%%[=<>!~ ]*}
    stem=$(echo "$name" | tr 'A-Z-.' 'a-z__')
    rm -f "$DEST/$stem"-*.whl
done
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${REQUIREMENTS[@]}"

echo "wheels in $DEST:"
total=0
for whl in "$DEST"/*.whl; do
    size=$(stat -c %s "$whl")
    total=$((total + size))
    awk -v n="$(basename "$whl")" -v s="$size" 'BEGIN { printf "  %-80s %8.2f MiB\n", n, s / 1048576 }'
    # What each needs (skip extras): check these are on the target, or fetch them too.
    needs=$(unzip -p "$whl" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' \
            | grep -v 'extra ==' | tr '\n' ' ' || true)
    echo "      requires: ${needs:-nothing}"
done
awk -v s="$total" 'BEGIN { printf "total: %.2f MiB (at most 64 MiB travel to the device machine)\n", s / 1048576 }'
