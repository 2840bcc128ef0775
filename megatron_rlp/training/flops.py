"""Model FLOPs of the hybrid Mamba2 / attention / MLP stack, and device peaks for MFU.

Conventions (those of Megatron-LM's `num_floating_point_operations`, `hybrid_flops`):
  * one multiply-add is 2 FLOPs; only matrix products (and the depthwise conv, a multiply-add per
    tap) are counted. Element-wise work (norms, gated RMSNorm, SiLU, softplus, exp of decays,
    decay masks, D skip, softmax, squared ReLU, residual adds) and the embedding lookup are not:
    they cost O(tokens x width) against the matmuls' O(tokens x width^2), i.e. ~1/h as much;
  * a training iteration costs 3x the forward (forward 1x, backward 2x: data and weight
    gradients); activation recomputation is not counted (it is not model work: that is what makes
    this MFU, not hardware FLOPs utilisation);
  * causal attention counts the causal half of the score matrix: QK^T and AV each cost
    2 * s^2 * d / 2, i.e. Megatron-LM's `4 * b * s * h * p * (s / 2)` term. (Older Megatron-LM
    releases counted the full s^2; current ones count half, and so do we.)
  * the logits use the padded vocabulary (the width of the output layer that is really
    multiplied), as Megatron-LM's `args.padded_vocab_size`.

Legend (all per sequence of s tokens): h hidden_size, f ffn_hidden_size; attention: a heads,
q query groups, k = kv_channels (default h / a); Mamba2: H heads, P head dim, d_inner = H * P,
G groups, N state dim, K conv kernel, T chunk length, conv_dim = d_inner + 2 G N; V padded vocab.

Forward FLOPs of one layer ("step n": the steps of `models.ssd.ssd_scan_chunked`):
  Mamba2 (M)
    in_proj        2 s h (2 d_inner + 2 G N + H)          rows z | x | B | C | dt
    conv           2 s conv_dim K                          depthwise, causal, over x | B | C
    ssd_intra      sum over chunks of length t <= T of     (step 1) diagonal blocks, causal half:
                     (G N + H P) t^2                         C B^T per group: 2 G N t^2 / 2,
                                                             scores X per head: 2 H P t^2 / 2
    ssd_states     4 s H P N + 2 c H P N                   (step 2) chunk states sum_s X_s B_s^T,
                                                           (step 4) state-to-output C_l . S_in,
                                                           (step 3) state passing, one multiply-add
                                                           per state element per chunk boundary
                                                           (c = ceil(s / T) chunks)
    out_proj       2 s d_inner h
  Attention (*)
    qkv            2 s h (a k + 2 q k)                     GQA: q key and value heads
    scores         2 s^2 a k                               QK^T + AV, causal half of each
    out_proj       2 s a k h
  MLP (-)          4 s h f                                 up and down, squared ReLU, no gate
  Logits           2 s h V

The SSD count follows the chunked algorithm that runs (mamba_ssm's `mamba_chunk_scan_combined`,
our `ssd.ssd_scan_chunked`); Megatron-LM instead approximates the scan as 7 s d_inner N. For
Nemotron-H 12B at s = 8192 our total is 0.28% below Megatron-LM's. A last partial chunk counts its
real length t, so padding is never counted as model work.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron_rlp.config import ModelConfig, RunConfig

# ------------------------------------------------------------------------------------------------
# Per-layer counts
# ------------------------------------------------------------------------------------------------


def _chunk_lengths(seq_length: int, chunk_size: int) -> list[int]:
    """Lengths of the SSD chunks covering a sequence: full chunks, then the remainder if any."""
    full, rest = divmod(seq_length, chunk_size)
    return [chunk_size] * full + ([rest] if rest else [])


def mamba_layer_flops(m: ModelConfig, seq_length: int) -> dict[str, int]:
    """Forward FLOPs of one Mamba2 layer on one sequence, by part (see the module docstring)."""
    s, h = seq_length, m.hidden_size
    H, P, G, N = m.mamba_num_heads, m.mamba_head_dim, m.mamba_num_groups, m.mamba_state_dim
    d_inner = H * P
    conv_dim = d_inner + 2 * G * N
    chunks = _chunk_lengths(s, m.mamba_chunk_size)
    return {
        "mamba_in_proj": 2 * s * h * (2 * d_inner + 2 * G * N + H),
        "mamba_conv": 2 * s * conv_dim * m.mamba_conv_kernel,
        # Causal half of the t x t blocks: 2 * X * t^2 / 2 = X * t^2 (exact integers).
        "mamba_ssd_intra_chunk": sum((G * N + H * P) * t * t for t in chunks),
        "mamba_ssd_states": 4 * s * H * P * N + 2 * len(chunks) * H * P * N,
        "mamba_out_proj": 2 * s * d_inner * h,
    }


def attention_layer_flops(m: ModelConfig, seq_length: int) -> dict[str, int]:
    """Forward FLOPs of one causal GQA self-attention layer on one sequence, by part."""
    s, h, a, q = seq_length, m.hidden_size, m.num_attention_heads, m.num_query_groups
    k = m.kv_channels or h // a
    return {
        "attention_qkv": 2 * s * h * (a * k + 2 * q * k),
        # QK^T and AV, causal half of each: 2 * (2 * s^2 * a k / 2).
        "attention_scores": 2 * s * s * a * k,
        "attention_out_proj": 2 * s * a * k * h,
    }


def mlp_layer_flops(m: ModelConfig, seq_length: int) -> dict[str, int]:
    """Forward FLOPs of one MLP layer (h -> f -> h, squared ReLU, no gate) on one sequence."""
    return {"mlp": 2 * 2 * seq_length * m.hidden_size * m.ffn_hidden_size}


_LAYER_FLOPS = {"mamba": mamba_layer_flops, "attention": attention_layer_flops,
                "mlp": mlp_layer_flops}


# ------------------------------------------------------------------------------------------------
# Whole model
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of the whole model on one sequence, summed over layers, by component."""

    mamba_in_proj: int = 0
    mamba_conv: int = 0
    mamba_ssd_intra_chunk: int = 0
    mamba_ssd_states: int = 0
    mamba_out_proj: int = 0
    attention_qkv: int = 0
    attention_scores: int = 0
    attention_out_proj: int = 0
    mlp: int = 0
    logits: int = 0

    @property
    def total(self) -> int:
        return sum(self.components().values())

    def components(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def shares(self) -> dict[str, float]:
        """Each component's fraction of the total."""
        total = self.total
        return {name: value / total for name, value in self.components().items()}


def model_flops_per_sequence(model: ModelConfig, seq_length: int,
                             padded_vocab_size: int) -> ForwardFlops:
    """Forward FLOPs of one sequence of `seq_length` tokens through the hybrid stack and the
    output layer of width `padded_vocab_size` (the padded vocabulary, as built)."""
    if seq_length < 1 or padded_vocab_size < 1:
        raise ValueError(f"seq_length={seq_length}, padded_vocab_size={padded_vocab_size}: "
                         "both must be positive")
    totals = dict.fromkeys(ForwardFlops().components(), 0)
    for kind in model.layer_kinds:
        for name, value in _LAYER_FLOPS[kind](model, seq_length).items():
            totals[name] += value
    totals["logits"] = 2 * seq_length * model.hidden_size * padded_vocab_size
    return ForwardFlops(**totals)


def training_flops_per_iteration(cfg: RunConfig, global_batch: int, vocab_size: int) -> int:
    """Model FLOPs of one optimizer step of next-token pretraining: 3 x forward (fwd + bwd) x
    `global_batch` sequences of `cfg.training.seq_length` tokens, all ranks together.

    `vocab_size` is the tokenizer's; it is padded as the model builder pads it (padding is
    idempotent, so an already padded size, e.g. a built model's `vocab_size`, gives the same).
    """
    # Imported here: the hybrid model module pulls in megatron-core, which the FLOP formula and
    # the peak table do not need (benchmarks and GPU hosts without megatron-core use them).
    from megatron_rlp.models.hybrid import padded_vocab_size

    padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by,
                               cfg.parallel.tensor_model_parallel_size)
    forward = model_flops_per_sequence(cfg.model, cfg.training.seq_length, padded).total
    return 3 * forward * global_batch


# ------------------------------------------------------------------------------------------------
# Peak throughput per device
# ------------------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets; where a datasheet quotes
# tensor-core numbers only "with sparsity" we halve them (H100 SXM: 1,979 -> 989). Columns: bf16 tensor core, tf32 tensor
# core, fp32 (CUDA cores). None: not on the datasheet (MFU then goes unreported). Patterns match
# `torch.cuda.get_device_name()` case-insensitively, first match wins (specific before generic).
_PEAK_TFLOPS: list[tuple[str, dict[str, Optional[float]]]] = [
    # GB200 NVL72 datasheet, per Blackwell GPU: BF16 5 PF sparse, TF32 2.5 PF sparse; FP32 80 TF
    # (5,760 TF per 72 GPUs).
    (r"\bGB200\b", {"bf16": 2500.0, "tf32": 1250.0, "fp32": 80.0}),
    # HGX B200 datasheet, per GPU: FP16/BF16 4.5 PF sparse, TF32 2.2 PF sparse.
    (r"\bB200\b", {"bf16": 2250.0, "tf32": 1100.0, "fp32": None}),
    # H200 datasheet: NVL BF16 1,671 TF sparse, TF32 835 TF sparse, FP32 60 TF.
    (r"\bH200 NVL\b", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    # H200 datasheet: SXM BF16 1,979 TF sparse, TF32 989 TF sparse, FP32 67 TF.
    (r"\bH200\b", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    # H100 datasheet: NVL BF16 1,671 TF sparse, TF32 835 TF sparse, FP32 60 TF.
    (r"\bH100 NVL\b", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    # H100 datasheet: PCIe BF16 1,513 TF sparse, TF32 756 TF sparse, FP32 51 TF.
    (r"\bH100 PCIe\b", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    # H100 datasheet: SXM ("NVIDIA H100 80GB HBM3") BF16 1,979 TF sparse, TF32 989 TF sparse,
    # FP32 67 TF.
    (r"\bH100\b", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    # A100 datasheet (SXM and PCIe, 40/80 GB): BF16 312 TF dense, TF32 156 TF dense, FP32 19.5 TF.
    (r"\bA100\b", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    # L40S datasheet: BF16 362.05 TF dense, TF32 183 TF dense, FP32 91.6 TF.
    (r"\bL40S\b", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    # L4 datasheet: BF16 242 TF sparse, TF32 120 TF sparse, FP32 30.3 TF.
    (r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
]

PRECISIONS = ("bf16", "tf32", "fp32")


def peak_flops_for_device_name(name: str, precision: str = "bf16") -> Optional[float]:
    """Dense peak FLOP/s of a GPU named like `torch.cuda.get_device_name()` at `precision`
    ("bf16", "tf32" or "fp32"); None for a device not in the table."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {PRECISIONS}")
    for pattern, peaks in _PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            tflops = peaks[precision]
            return None if tflops is None else tflops * 1e12
    return None


def matmul_precision(bf16: bool) -> str:
    """The precision the training matmuls run at: bf16 with --bf16; else tf32 when torch lets
    fp32 matmuls use tensor cores (`torch.backends.cuda.matmul.allow_tf32`), else fp32."""
    if bf16:
        return "bf16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops_per_device(device: Union[None, str, int, torch.device] = None,
                          precision: str = "bf16") -> Optional[float]:
    """Dense peak FLOP/s of `device` (default: the current CUDA device) at `precision`.

    None on a CPU, without CUDA, or on a GPU the table does not know: MFU is then not reported,
    never guessed.
    """
    if not torch.cuda.is_available():
        return None
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for_device_name(torch.cuda.get_device_name(device), precision)
