#!/usr/bin/env bash
# The main job on the embedded default, end to end on a CPU:
#   1. generate the embedded corpus and train the tiny hybrid model (200 iterations)
#   2. plot the loss curve and print where everything is
# Usage: bash examples/demo.sh [OUT_DIR]   (default runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/demo}"
export TORCHDYNAMO_DISABLE=1
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1/2 pretraining the tiny hybrid model (examples/tiny_cpu.yaml) =="
python -m megatron_rlp.train --config examples/tiny_cpu.yaml \
    --embedded-data-dir "$OUT/data" --save "$OUT/pretrain" --load "$OUT/pretrain" \
    | tee "$OUT/pretrain.log"

echo "== 2/2 plotting =="
python examples/plot_metrics.py "$OUT/pretrain/metrics.jsonl" --out "$OUT/loss.png" \
    --title "tiny hybrid M*M-M- pretraining"

python - "$OUT" "$start" <<'PY'
import json, sys, time
out, start = sys.argv[1], int(sys.argv[2])
records = [json.loads(l) for l in open(f"{out}/pretrain/metrics.jsonl") if l.strip()]
print("\n== summary ==")
print(f"pretraining: loss {records[0]['loss']:.3f} (iter {records[0]['iteration']}) -> "
      f"{records[-1]['loss']:.3f} (iter {records[-1]['iteration']})")
print(f"checkpoints:  {out}/pretrain/iter_*   metrics: {out}/pretrain/metrics.jsonl")
print(f"loss plot:    {out}/loss.png")
print(f"wall time:    {time.time() - start:.0f} s")
PY
