"""Load a megatron-rlp checkpoint of any TP/PP layout into one process (on its GPU, else the CPU)
for evaluation or generation (`megatron_rlp.load_model` adds HF directories and NVFP4).

dist_checkpointing reshards on load, so we build the model at TP=PP=1 in a world of one and let
megatron gather the shards. The checkpoint's run config (saved by the trainer) gives the shape.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_rlp.config import config_from_dict
from megatron_rlp.device import compute_device, model_device
from megatron_rlp.training import checkpoint as ckpt
from megatron_rlp.training import safe_load


class CausalLM(torch.nn.Module):
    """`model(input_ids [b, s]) -> fp32 logits [b, s, vocab]` over a megatron MambaModel, with the
    padded vocab rows cut off so logits match the tokenizer. Inputs are moved to the model's device;
    logits stay there."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, config,
                 iteration: Optional[int] = None):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.run_config = config
        self.iteration = iteration  # the checkpoint's (None for an HF directory)
        # What the linear layers compute in: "fp32", or "nvfp4" once megatron_rlp.load_model has
        # applied the checkpoint's NVFP4 recipe (its planned linears; everything else fp32).
        self.precision = "fp32"

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, precision={self.precision}"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids.to(model_device(self.model)), None, None)
        return logits[..., : self.vocab_size].float()


def build_single_process_model(cfg, device: Optional[torch.device] = None,
                               init_weights: bool = True):
    """(model, tokenizer) for a TP=PP=1 config in this process, placed on `device` (default: this
    process's accelerator, else the CPU) before any weights are loaded into it. `init_weights=False`
    skips the random init when every tensor is loaded next (a full checkpoint, not an HF import,
    whose padded vocab rows keep their init)."""
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import init_distributed

    init_distributed(cfg.parallel, cfg.training.seed)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    model = build_model(cfg, tokenizer.vocab_size, init_weights=init_weights)
    return model.to(compute_device() if device is None else torch.device(device)), tokenizer


def saved_run_config(checkpoint_root: str, iteration: int | None = None):
    iteration = ckpt.read_latest_iteration(checkpoint_root) if iteration is None else iteration
    if iteration is None:
        raise ValueError(f"{checkpoint_root!r} has no 'latest' file: not a megatron-rlp "
                         "checkpoint directory")
    # The first read of a checkpoint by load_model and --to-hf: check its manifest first.
    ckpt.verify_checkpoint(checkpoint_root, iteration)
    with ckpt.load_errors(ckpt.checkpoint_dir(checkpoint_root, iteration)):
        common = safe_load.load_common_state_dict(ckpt.checkpoint_dir(checkpoint_root, iteration))
    flat = dict(common["training"]["config"])
    return flat, iteration


def single_process_config(flat: dict):
    """The saved config re-targeted at one CPU process (TP=PP=1, fp32, no optimizer sharding)."""
    flat = dict(flat)
    flat.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                num_layers_per_virtual_pipeline_stage=None, sequence_parallel=False,
                use_distributed_optimizer=False, bf16=False, save=None, load=None)
    return config_from_dict(flat)


def load_native_model(checkpoint_root: str, device: Optional[torch.device] = None) -> CausalLM:
    """Eval-mode fp32 `CausalLM` from a megatron-rlp checkpoint root (any TP/PP layout), on
    `device` (default: CUDA when available, else the CPU). `megatron_rlp.load_model` is the
    public entry: it also reads HF directories and applies a checkpoint's NVFP4 recipe."""
    if not os.path.isdir(checkpoint_root):
        raise ValueError(f"checkpoint directory {checkpoint_root!r} does not exist")
    flat, iteration = saved_run_config(checkpoint_root)
    cfg = single_process_config(flat)
    model, tokenizer = build_single_process_model(cfg, device, init_weights=False)
    ckpt.load_checkpoint(checkpoint_root, [model], optimizer=None, load_rng=False,
                         iteration=iteration, verify=False)  # saved_run_config verified it
    return CausalLM(model, tokenizer.vocab_size, cfg, iteration=iteration).eval()
