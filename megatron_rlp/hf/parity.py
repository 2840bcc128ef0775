"""Layer-by-layer parity: our hidden states vs transformers' NemotronH, on the same tokens.

    python -m megatron_rlp.hf.parity --ours runs/tiny --hf hf/tiny [--seq-length 64 --batch 2]

Prints one row per stage (embedding, every layer, final norm, logits) with the max abs difference
and flags the first layer that exceeds the tolerance: a wrong in_proj split or group norm shows up
at the first Mamba layer, a wrong q/k/v interleave at the first attention layer. Exit code 1 when
the logits differ by more than --tol.

transformers clamps dt at `time_step_min` at run time and megatron does not (DESIGN.md), so the HF
model is loaded with `time_step_min=0.0` here; the shipped config.json keeps HF's default.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List

import torch


def load_hf_reference(hf_dir: str):
    """transformers' NemotronHForCausalLM in fp32 with the dt clamp removed (no remote code)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, time_step_min=0.0, dtype=torch.float32,
                                                 trust_remote_code=False)
    for layer in model.model.layers:  # belt and braces: the mixer copies the limit at init
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (0.0, float("inf"))
    return model.eval()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def compare(ours, hf_model, input_ids: torch.Tensor) -> List[dict]:
    """Rows {stage, kind, max_abs_diff, max_abs} for embedding, each layer, final norm, logits.
    `ours` is our CausalLM wrapper (from `megatron_rlp.load_model`)."""
    mamba = ours.model
    captured_ours, captured_hf = {}, {}
    hooks = []

    def keep(store, name, seq_first):
        def hook(_module, _inputs, output):
            t = _first(output).detach().float()
            store[name] = t.transpose(0, 1) if seq_first else t
        return hook

    pattern = ours.run_config.model.hybrid_override_pattern
    stages = [("embedding", mamba.embedding, hf_model.model.embeddings, "")]
    for i, symbol in enumerate(pattern):
        stages.append((f"layer {i}", mamba.decoder.layers[i], hf_model.model.layers[i], symbol))
    stages.append(("final norm", mamba.decoder.final_norm, hf_model.model.norm_f, ""))
    for name, ours_module, hf_module, _ in stages:
        hooks.append(ours_module.register_forward_hook(keep(captured_ours, name, True)))
        hooks.append(hf_module.register_forward_hook(keep(captured_hf, name, False)))
    try:
        logits_ours = ours(input_ids)
        # use_cache=False: transformers 5.x fails to build a cache for an all-Mamba model.
        logits_hf = hf_model(input_ids, use_cache=False).logits.float()
    finally:
        for h in hooks:
            h.remove()
    vocab = min(logits_ours.shape[-1], logits_hf.shape[-1])
    captured_ours["logits"] = logits_ours[..., :vocab]
    captured_hf["logits"] = logits_hf[..., :vocab]
    rows = []
    for name, *_rest in stages + [("logits", None, None, "")]:
        kind = _rest[2] if _rest else ""
        a, b = captured_ours[name], captured_hf[name]
        rows.append({"stage": name, "kind": kind,
                     "max_abs_diff": (a - b).abs().max().item(),
                     "max_abs": b.abs().max().item()})
    return rows


def run(ours_path: str, hf_dir: str, *, seq_length: int = 64, batch: int = 2, seed: int = 0,
        tol: float = 1e-4) -> dict:
    from megatron_rlp.inference.load import load_native_model

    ours = load_native_model(ours_path, device="cpu")  # beside transformers' fp32 CPU oracle
    hf_model = load_hf_reference(hf_dir)
    vocab = min(ours.vocab_size, hf_model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, seq_length), generator=torch.Generator().manual_seed(seed))
    rows = compare(ours, hf_model, ids)
    first_bad = next((r["stage"] for r in rows if r["max_abs_diff"] > tol), None)
    print(f"{'stage':<12} {'kind':<4} {'max|ours-hf|':>14} {'max|hf|':>10}")
    for r in rows:
        flag = "  <-- first above tol" if r["stage"] == first_bad else ""
        print(f"{r['stage']:<12} {r['kind']:<4} {r['max_abs_diff']:>14.3e} {r['max_abs']:>10.3e}{flag}")
    result = {"logits_max_abs_diff": rows[-1]["max_abs_diff"], "tol": tol,
              "first_stage_above_tol": first_bad, "ok": rows[-1]["max_abs_diff"] <= tol}
    print(json.dumps(result))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rlp.hf.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", required=True, help="megatron-rlp checkpoint root (or HF dir to import)")
    parser.add_argument("--hf", required=True, help="Hugging Face NemotronH directory")
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed")
    args = parser.parse_args(argv)
    try:
        result = run(args.ours, args.hf, seq_length=args.seq_length, batch=args.batch,
                     seed=args.seed, tol=args.tol)
    except ValueError as error:
        print(f"parity: error: {error}", file=sys.stderr)
        return 2
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
