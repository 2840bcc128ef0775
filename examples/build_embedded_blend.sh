#!/usr/bin/env bash
# Build the demo's two-phase blend from the embedded corpus:
#   embedded corpus -> tools/estimate_quality.py (classifier tiers, one .bin/.idx per source/tier)
#                   -> tools/build_phase_blend.py (60/40 phases, epoch caps) -> BLEND.yaml
# The held-out documents are cut into the same tiers (the training tiers' classifier), so the
# blend gives each source a valid_path and training reports valid_loss/<source>.
#
#   examples/build_embedded_blend.sh [OUT_DIR] [TOTAL_TOKENS] [EMBEDDED_DIR]
#   python -m megatron_rlp.train --config ... --data-phases OUT_DIR/two_phase_blend.yaml
#
# TOTAL_TOKENS should be what the run reads: train-iters x global-batch-size x seq-length
# (default 204800 = 200 x 8 x 128). The classifier's "user-given" examples are drawn from a
# separately seeded corpus (seed 99) using its labels, so they never overlap the training docs.
set -euo pipefail
OUT_DIR=${1:-runs/two_phase_data}
TOTAL_TOKENS=${2:-204800}
EMBEDDED_DIR=${3:-${HOME}/.cache/megatron_rlp/embedded}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"

"$PY" - "$EMBEDDED_DIR" "$OUT_DIR" <<'PYEOF'
import sys
from megatron_rlp.data.corpus import generate_corpus, write_jsonl
from megatron_rlp.data.embedded import ensure_embedded_dataset
ensure_embedded_dataset(sys.argv[1])
docs = generate_corpus(1000, 99)
write_jsonl([d for d in docs if d["quality"] == "high"][:200], f"{sys.argv[2]}/examples_high.jsonl")
write_jsonl([d for d in docs if d["quality"] == "low"][:200], f"{sys.argv[2]}/examples_low.jsonl")
PYEOF

"$PY" "$ROOT/tools/estimate_quality.py" --input "$EMBEDDED_DIR/embedded.jsonl" \
    --output-dir "$OUT_DIR/tiers" --append-eod \
    --high-examples "$OUT_DIR/examples_high.jsonl" --low-examples "$OUT_DIR/examples_low.jsonl" \
    --category arithmetic=math algebra=math

"$PY" "$ROOT/tools/estimate_quality.py" --input "$EMBEDDED_DIR/embedded_valid.jsonl" \
    --output-dir "$OUT_DIR/valid_tiers" --append-eod \
    --classifier "$OUT_DIR/tiers/classifier.npz" --category arithmetic=math algebra=math

"$PY" "$ROOT/tools/build_phase_blend.py" --manifest "$OUT_DIR/tiers/manifest.json" \
    --valid-manifest "$OUT_DIR/valid_tiers/manifest.json" \
    --total-tokens "$TOTAL_TOKENS" --output "$OUT_DIR/two_phase_blend.yaml"
