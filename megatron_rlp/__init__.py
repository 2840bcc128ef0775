"""megatron-rlp: Megatron-style pretraining for hybrid Mamba-Transformer LMs.

Import is light: megatron-core (≈4 s to import) loads only when a model or trainer is built.
"""
__version__ = "0.1.0"


def load_model(checkpoint_dir: str, device=None, precision: str = "auto"):
    """A `torch.nn.Module` in eval mode from a checkpoint of any TP/PP layout (native or Hugging
    Face), on `device` (default: this process's GPU when CUDA is available, else the CPU);
    `model(input_ids)` returns fp32 logits `[batch, seq, vocab]` on that device. A checkpoint of
    an NVFP4 run computes as it trained unless `precision="fp32"`; `model.precision` says which
    (megatron_rlp/loading.py)."""
    from megatron_rlp.loading import load_model as _load

    return _load(checkpoint_dir, device=device, precision=precision)


__all__ = ["load_model", "__version__"]
