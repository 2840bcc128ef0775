"""Causal core attention on torch's fused `scaled_dot_product_attention` kernels.

A drop-in for megatron-core 0.16.1's local `DotProductAttention` (same constructor, same forward,
same — empty — state dict). megatron's local module builds the whole score matrix: a [b*np, sq, sk]
`baddbmm` then an fp32 softmax over [b, np, sq, sk], so its memory grows with s² and it never uses
flash attention. Here the whole core is one `F.scaled_dot_product_attention(is_causal=True)` call,
which on a GPU dispatches to the flash / memory-efficient / cuDNN kernels (O(s) memory, no
[s, s] tensor) and on a CPU to torch's own fused kernel. Without TransformerEngine this is the
only fused attention megatron's spec can get.

Shape legend (per tensor-parallel rank):
    sq / sk   query / key positions          b   micro-batch
    np        query heads on this rank       ng  KV heads (query groups) on this rank
    hn        head dim (config.kv_channels)

    query [sq, b, np, hn], key/value [sk, b, ng, hn]  ->  context [sq, b, np * hn]

GQA: query head i reads KV head i // (np / ng), i.e. each KV group serves np / ng *consecutive*
query heads — megatron's `key.repeat_interleave(np // ng, dim=2)` and SDPA's `enable_gqa` agree.

What is supported, and why the rest is refused (one ValueError each, before any work):
  - causal self-attention (sq == sk), and one query over a KV cache (sq == 1: every cached key is
    in the past, so no mask; megatron's static inference passes `no_mask` for that step);
  - packed documents (`--reset-attention-mask`): `packed_seq_params` a `packed.PackedDocuments`,
    whose block-diagonal causal mask goes to SDPA as a boolean `attn_mask` (one fused call for
    the whole batch, never a loop over documents; on a GPU the memory-efficient kernel takes it,
    flash takes no mask). Without documents the call stays on the `is_causal` fast path;
  - an explicit `attention_mask` only if it *is* the causal mask (True = masked, megatron's
    convention): anything else (padding, document masks) would be silently ignored by a kernel
    that only knows `is_causal`;
  - dropout 0 (flash kernels take a dropout probability but would draw their own random numbers,
    outside megatron's RNG tracker, so TP ranks and resumed runs would not reproduce);
  - no THD packed sequences (megatron's own `packed_seq_params`), attention bias, sliding
    windows, softmax offsets, QK-clip logit tracking or context parallelism — megatron's local
    module refuses most of these too (asserts); TE's attention is the place for them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from .packed import PackedDocuments

# `enable_gqa` arrived in torch 2.5; setup.py allows 2.4, where KV heads are always expanded.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)

# Mask types that mean "causal" for the shapes we accept (sq == sk, or sq == 1 over a KV cache).
_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.causal_bottom_right)


def _native_gqa(q: Tensor) -> bool:
    """Let SDPA share KV heads itself (no expanded copy of K/V) where the kernel that will run
    supports it: flash attention, i.e. CUDA with fp16/bf16. Elsewhere (fp32 on a GPU, any CPU) the
    kernels that would run do not all accept grouped heads, and SDPA would fall back to its math
    path, which builds the [s, s] scores; expanding K/V first keeps the fused kernels eligible."""
    return _SDPA_HAS_GQA and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def causal_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool = True,
                native_gqa: Optional[bool] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
    """q [b, np, sq, hn], k/v [b, ng, sk, hn] -> [b, np, sq, hn], softmax(q k^T * scale) v.

    `is_causal` masks key j > query i (top-left aligned; callers pass it only when sq == sk).
    `attn_mask` (bool [b|1, 1, sq, sk], True = attend; then `is_causal` must be False) is used
    instead, for document masks.
    `native_gqa` None = decide by device and dtype (see `_native_gqa`; never with a mask: the
    kernel that takes masks, memory-efficient attention, has no grouped heads, and SDPA would fall
    back to its math path); True/False force it (tests check both give megatron's head mapping)."""
    rep = q.shape[1] // k.shape[1]
    if native_gqa is None:
        native_gqa = _native_gqa(q) and attn_mask is None
    kwargs = {}
    if rep > 1:
        if native_gqa:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    if attn_mask is not None:
        kwargs["attn_mask"] = attn_mask
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, **kwargs)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}: {numerator} is not divisible by {denominator}; each tensor-"
                         f"parallel rank must hold whole heads — choose sizes that divide evenly")
    return numerator // denominator


class SDPACoreAttention(MegatronModule):
    """Core attention with megatron `DotProductAttention`'s interface, computed by torch SDPA.

    Built by megatron's `SelfAttention` as ``core_attention(config=, layer_number=,
    attn_mask_type=, attention_type=, cp_comm_type=, softmax_scale=config.softmax_scale,
    pg_collection=)``. Has no parameters or buffers, exactly like `DotProductAttention` with the
    default "vanilla" softmax, so checkpoints are interchangeable.

    ``softmax_scale`` is the scale actually applied to q·k: the given one or 1/sqrt(hn). megatron
    divides its attribute by ``layer_number`` under ``apply_query_key_layer_scaling`` and multiplies
    the scores back inside its fp32 softmax (an fp16 overflow guard); the product is the same
    scale, and SDPA kernels accumulate in fp32 anyway, so only the product is kept.
    """

    # Takes `packed.PackedDocuments` (block-diagonal causal mask); `--reset-attention-mask`
    # refuses core attentions without this (`packed.refuse_attention_without_block_mask`).
    accepts_packed_documents = True

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type  # unused, as in megatron
        self._refuse_unsupported(config, layer_number, attn_mask_type, attention_dropout)

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp

        # Per-rank sizes exactly as megatron's DotProductAttention derives them. (SelfAttention
        # hands in a config with num_query_groups raised to the TP size when there are fewer KV
        # heads than ranks; that copy arrives here unchanged.)
        world_size = self.tp_group.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = _divide(
            projection_size, world_size, "kv_channels * num_attention_heads over TP")
        self.hidden_size_per_attention_head = _divide(
            projection_size, config.num_attention_heads, "kv_channels * num_attention_heads")
        self.num_attention_heads_per_partition = _divide(
            config.num_attention_heads, world_size, "num_attention_heads over TP")
        self.num_query_groups_per_partition = _divide(
            config.num_query_groups, world_size, "num_query_groups over TP")
        _divide(self.num_attention_heads_per_partition, self.num_query_groups_per_partition,
                "query heads per KV group (num_attention_heads / num_query_groups)")

        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head)
                              if softmax_scale is None else softmax_scale)

    @staticmethod
    def _refuse_unsupported(config, layer_number, attn_mask_type, attention_dropout):
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention_dropout={dropout}: SDPACoreAttention supports dropout 0 only (fused "
                f"kernels would draw dropout masks outside megatron's RNG tracker); set "
                f"--attention-dropout 0")
        if attn_mask_type not in _CAUSAL_TYPES:
            raise ValueError(
                f"attn_mask_type={attn_mask_type}: SDPACoreAttention computes causal attention "
                f"only; use megatron's DotProductAttention or TE attention for other masks")
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size}: SDPACoreAttention does not "
                f"split sequences across ranks; use context_parallel_size=1 (or TE attention)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"softmax_type={config.softmax_type!r}: SDPA has no softmax offset; use "
                f"softmax_type='vanilla'")
        if is_layer_window_attention(getattr(config, "window_size", None),
                                     getattr(config, "window_attn_skip_freq", None),
                                     layer_number):
            raise ValueError(
                f"window_size={config.window_size}: sliding-window attention is not supported by "
                f"SDPACoreAttention; unset window_size")
        if getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit", False):
            raise ValueError(
                "qk_clip / log_max_attention_logit need the per-head max attention logit, which "
                "fused kernels do not expose; turn both off")

    # ------------------------------------------------------------------------------------------

    def _is_causal(self, attn_mask_type: Optional[AttnMaskType], sq: int, sk: int) -> bool:
        """SDPA's `is_causal` for these shapes, or ValueError if the request is not causal."""
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if sq == 1:
            # One new query over a KV cache: all sk keys precede it (megatron passes no_mask here).
            if mask_type not in _CAUSAL_TYPES + (AttnMaskType.no_mask,):
                raise ValueError(f"attn_mask_type={mask_type}: only causal attention is supported")
            return False
        if mask_type not in _CAUSAL_TYPES:
            raise ValueError(
                f"attn_mask_type={mask_type} with {sq} queries: SDPACoreAttention computes causal "
                f"attention only (no bidirectional / padding masks)")
        if sq != sk:
            raise ValueError(
                f"{sq} queries over {sk} keys: causal attention needs sq == sk (or sq == 1 for a "
                f"decoding step); chunked prefill over a KV cache is not supported")
        return True

    @staticmethod
    def _check_mask(attention_mask: Tensor, b: int, np_: int, sq: int, sk: int) -> None:
        """Accept an explicit mask only if it equals the causal mask (True = masked out).
        Comparing costs one bool pass over the mask and a host sync; pass None to skip it."""
        if attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask has dtype {attention_mask.dtype}; only a boolean "
                             f"causal mask (True = masked) or None is accepted")
        try:
            torch.broadcast_shapes(attention_mask.shape, (b, np_, sq, sk))
        except RuntimeError:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not "
                             f"broadcast to [b, np, sq, sk] = {[b, np_, sq, sk]}") from None
        ones = torch.ones(sq, sk, dtype=torch.bool, device=attention_mask.device)
        causal = torch.triu(ones, diagonal=sk - sq + 1)  # key j > query i (bottom-right aligned)
        if bool((attention_mask != causal).any()):
            raise ValueError(
                "attention_mask is not the causal mask: SDPACoreAttention takes document masks "
                "as packed_seq_params=PackedDocuments (--reset-attention-mask), no padding "
                "masks; pass None")

    @staticmethod
    def _document_mask(documents: PackedDocuments, b: int, sq: int, sk: int) -> Tensor:
        """The block-diagonal causal mask [b, 1, s, s] (True = attend) of `documents`."""
        ids = documents.seq_idx
        if sq != sk or ids is None or tuple(ids.shape) != (b, sq):
            shape = None if ids is None else tuple(ids.shape)
            raise ValueError(
                f"PackedDocuments.seq_idx {shape} does not cover {sq} queries x {sk} keys of "
                f"batch {b}: document masks need the whole sequence (sq == sk) and seq_idx "
                f"[b, s] = [{b}, {sq}]")
        return documents.attention_mask()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn].
        `packed_seq_params` a `PackedDocuments`: attention stays inside each document."""
        if packed_seq_params is not None and not isinstance(packed_seq_params, PackedDocuments):
            raise ValueError("packed_seq_params: SDPACoreAttention takes PackedDocuments "
                             "(--reset-attention-mask), not THD packed sequences; use TE "
                             "attention, or unpacked batches")
        if attention_bias is not None:
            raise ValueError("attention_bias: SDPACoreAttention does not support an attention "
                             "bias; use TE attention")
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        expected_kv = (sk, b, self.num_query_groups_per_partition, hn)
        if (np_, hn) != (self.num_attention_heads_per_partition,
                         self.hidden_size_per_attention_head) \
                or tuple(key.shape) != expected_kv or tuple(value.shape) != expected_kv:
            raise ValueError(
                f"query {tuple(query.shape)} / key {tuple(key.shape)} / value "
                f"{tuple(value.shape)} do not match this rank's heads: expected query "
                f"[sq, b, {self.num_attention_heads_per_partition}, "
                f"{self.hidden_size_per_attention_head}] and key/value [sk, b, "
                f"{self.num_query_groups_per_partition}, {self.hidden_size_per_attention_head}]")
        is_causal = self._is_causal(attn_mask_type, sq, sk)
        if attention_mask is not None:
            self._check_mask(attention_mask, b, np_, sq, sk)
        documents = None
        if packed_seq_params is not None:
            documents = self._document_mask(packed_seq_params, b, sq, sk)
            is_causal = False  # the document mask is causal itself

        # [s, b, heads, hn] -> [b, heads, s, hn]: views (hn stays the unit-stride dim the
        # kernels need), no copies.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = causal_sdpa(q, k, v, self.softmax_scale, is_causal=is_causal,
                              attn_mask=documents)
        # [b, np, sq, hn] -> [sq, b, np * hn], megatron's output layout.
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
