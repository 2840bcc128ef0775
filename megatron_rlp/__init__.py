"""megatron-rlp: Megatron-style pretraining for hybrid Mamba-Transformer LMs.

Import is light: megatron-core (≈4 s to import) loads only when a model or trainer is built.
"""
__version__ = "0.1.0"


def load_model(checkpoint_dir: str):
    """A CPU `torch.nn.Module` in eval mode from a checkpoint of any TP/PP layout;
    `model(input_ids)` returns fp32 logits `[batch, seq, vocab]`."""
    from megatron_rlp.inference.load import load_model as _load

    return _load(checkpoint_dir)


__all__ = ["load_model", "__version__"]
