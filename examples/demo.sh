#!/usr/bin/env bash
# The main job on the embedded default, end to end on a CPU (no downloads):
#   1. generate the embedded corpus, score it into quality tiers, build a two-phase blend
#   2. pretrain the tiny hybrid model on that blend (200 iterations, phase switch inside the run)
#   3. a short RLP stage from the pretrained checkpoint
#   4. export to Hugging Face NemotronH and generate with transformers
#   5. plots and a summary of where everything is
# Usage: bash examples/demo.sh [OUT_DIR]   (default runs/demo; re-running resumes/skips done steps)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/demo}"
export TORCHDYNAMO_DISABLE=1
mkdir -p "$OUT"
start=$(date +%s)
# 200 iterations x 8 sequences x 128 tokens
TOKENS=$((200 * 8 * 128))
RLP_LR=1e-4

echo "== 1/5 embedded corpus -> quality tiers -> two-phase blend =="
bash examples/build_embedded_blend.sh "$OUT/blend" "$TOKENS" "$OUT/data" | tail -n 25

echo "== 2/5 pretraining the tiny hybrid model (examples/tiny_cpu.yaml, two-phase data) =="
python -m megatron_rlp.train --config examples/tiny_cpu.yaml \
    --embedded-data-dir "$OUT/data" --data-phases "$OUT/blend/two_phase_blend.yaml" \
    --save "$OUT/pretrain" --load "$OUT/pretrain" | tee "$OUT/pretrain.log"

echo "== 3/5 RLP stage (examples/tiny_rlp.yaml) from the pretrained weights =="
# The pretrained model has seen thinking-style documents (worked sums with <think> column-wise
# carries </think> before each result), so its thoughts close and can help the next token.
# Thoughts get 64 tokens (the corpus's are at most ~45) and the LR is the CPU-scale one the
# RLP-vs-CPT experiment selects (the paper's 1e-6 does not move a model in 20 steps).
# The progress line's loss is the clipped surrogate, 0 by construction at ratio 1: watch
# reward_mean, info_gain_positive_frac and thought_stopped_frac instead (docs/RLP.md).
# A first run starts the stage from the pretrained weights; a re-run resumes the RLP run itself
# (a new stage into a --save that already holds checkpoints is refused: it would overwrite them).
RLP_FROM="$OUT/pretrain"
[ -f "$OUT/rlp/latest" ] && RLP_FROM="$OUT/rlp"
python -m megatron_rlp.train --config examples/tiny_rlp.yaml \
    --embedded-data-dir "$OUT/data" --load "$RLP_FROM" --save "$OUT/rlp" \
    --rlp-thought-length 64 --lr "$RLP_LR" --min-lr "$RLP_LR" \
    | tee "$OUT/rlp.log"

echo "== 4/5 export to Hugging Face and generate with transformers =="
python tools/convert_checkpoint.py --to-hf --load "$OUT/rlp" --save "$OUT/hf" --overwrite
python - "$OUT/hf" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
hf_dir = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(hf_dir)
model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
print(f"transformers loaded {type(model).__name__} from {hf_dir}")
for prompt in ["12 + 7 = ", "Solve for x: 3x + 4 = 19."]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    print(f"  {prompt!r} -> {tokenizer.decode(out[0, ids.shape[1]:])!r}")
PY

echo "== 5/5 plots =="
python examples/plot_metrics.py "$OUT/pretrain/metrics.jsonl" --out "$OUT/loss.png" \
    --title "tiny hybrid M*M-M- pretraining (dashed: data phase switch)"
python examples/plot_metrics.py "$OUT/rlp/metrics.jsonl" --out "$OUT/rlp.png" \
    --keys reward_mean info_gain_positive_frac thought_stopped_frac thought_len_mean \
    --title "RLP stage (reward = info gain vs EMA teacher; share of thoughts with gain > 0)"

python - "$OUT" "$start" <<'PY'
import json, sys, time
out, start = sys.argv[1], int(sys.argv[2])
def records(run):
    return [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if l.strip()]
pre, rlp = records("pretrain"), records("rlp")
phases = sorted({r.get("phase") for r in pre if r.get("phase")})
print("\n== summary ==")
print(f"pretraining:  loss {pre[0]['loss']:.3f} (iter {pre[0]['iteration']}) -> "
      f"{pre[-1]['loss']:.3f} (iter {pre[-1]['iteration']}), data phases {phases}")
def rlp_span(key, fmt):  # first and last quarter of the run: single iterations are context noise
    q = max(1, len(rlp) // 4)
    first, last = (sum(r[key] for r in part) / len(part) for part in (rlp[:q], rlp[-q:]))
    return f"{key} {format(first, fmt)} -> {format(last, fmt)}"
print(f"RLP stage:    {len(rlp)} iterations (means of the first and last {max(1, len(rlp) // 4)}): "
      + ", ".join(rlp_span(k, f) for k, f in (("reward_mean", "+.3f"),
                                              ("info_gain_positive_frac", ".2f"),
                                              ("thought_stopped_frac", ".2f"),
                                              ("thought_len_mean", ".1f"))))
print("              (the logged loss is the clipped surrogate: 0 by construction at ratio 1)")
print(f"checkpoints:  {out}/pretrain  {out}/rlp   (resume: same command; load: "
      f"megatron_rlp.load_model('{out}/rlp'))")
print(f"HF export:    {out}/hf")
print(f"plots:        {out}/loss.png  {out}/rlp.png")
print(f"wall time:    {time.time() - start:.0f} s")
PY
