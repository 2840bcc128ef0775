"""`megatron_rlp.load_model`: a native or Hugging Face checkpoint directory as one eval-mode module.

The choice between the two formats is made here, above both `inference/` (native checkpoints) and
`hf/` (NemotronH directories), so neither package imports the other's loader back.

Precision: a native checkpoint of an `--fp4 nvfp4` run loads with its recipe applied, as training
ran at that iteration (the planned linears quantize to NVFP4, GEMMs emulated unless
TransformerEngine's FP4 path is available); past the recipe's switch to BF16, or with
`precision="fp32"`, every layer computes in fp32. The module says which in `model.precision`
(and in its repr). HF directories always load in fp32: the format has no NVFP4 GEMMs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

PRECISIONS = ("auto", "fp32")


def load_model(checkpoint_dir: str, device: Optional[torch.device] = None,
               precision: str = "auto"):
    """A `CausalLM` in eval mode: `model(input_ids [b, s])` returns fp32 logits `[b, s, vocab]`
    on `device` (default: this process's GPU when CUDA is available, else the CPU).
    `precision`: "auto" (as the checkpoint trained: NVFP4 when its recipe was on) or "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    if not os.path.isdir(checkpoint_dir):
        raise ValueError(f"checkpoint directory {checkpoint_dir!r} does not exist")
    from megatron_rlp.hf.import_ import is_hf_dir, load_hf_model
    from megatron_rlp.inference.load import load_native_model

    if is_hf_dir(checkpoint_dir):  # a Hugging Face NemotronH directory (safetensors only)
        return load_hf_model(checkpoint_dir, device=device)
    model = load_native_model(checkpoint_dir, device=device)
    if precision == "auto" and model.run_config.fp4.enabled:
        _apply_trained_nvfp4(model)
    return model


def _apply_trained_nvfp4(model) -> None:
    """The checkpoint's NVFP4 recipe on `model` as at its saved iteration; "auto" GEMMs, since
    the run's --fp4-gemm te may name hardware this process lacks."""
    from megatron_rlp.quant.integration import apply_nvfp4

    cfg = model.run_config
    cfg = dataclasses.replace(cfg, fp4=dataclasses.replace(cfg.fp4, fp4_gemm="auto"))
    state = apply_nvfp4([model.model], cfg, iteration=model.iteration)
    if state.active:
        model.precision = "nvfp4"
