"""Incremental decoding of the hybrid megatron `MambaModel` with a `HybridCache`.

The model code knows nothing of caches (STYLE item 1), so this module walks its modules from
outside, in the same order as `MambaModel.forward`:

    h = embedding(ids)                                   [s, b, H]
    for layer in decoder.layers:
        M  h = h + mixer(norm(h))           mixer.forward_with_state (prefill) / mixer.step (decode)
        *  h = h + linear_proj(attn(input_layernorm(h)))  q,k,v from megatron's own
                                             get_query_key_value_tensors (fused per-group layout),
                                             causal SDPA over the KV cache (GQA: each KV head serves
                                             heads/groups consecutive query heads, as megatron's
                                             DotProductAttention `repeat_interleave`s)
        -  h = h + mlp(pre_mlp_layernorm(h))
    logits = output_layer(final_norm(h))                 vocab-sharded under TP -> gathered

Under tensor parallelism every projection is megatron's Column/RowParallelLinear, so each rank
works on its own heads / channels and the row-parallel all-reduces keep the residual stream equal
on all ranks; logits are all-gathered over the TP group. Sequence parallelism is not supported here
(decoding one token cannot be split along the sequence).

`prefill` takes rows of equal length; `step` takes one token per row, rows at different lengths.
`step` writes into the cache's KV tensors in place and replaces its Mamba states; callers copy a
cache (`index_rows`, `repeat_rows`) before branching.

Packed documents (`prefill(..., eod=)`, what `--reset-attention-mask` trains): the prefix is cut
after each `<eod>` exactly as the training forward cuts it (`models.packed.PackedDocuments`:
block-diagonal causal attention, Mamba2 states reset per document), the cache keeps only the last
document's Mamba states and where it starts, and `step` continues that document — or, after a
fed `<eod>`, starts a new one. `full_logits(..., eod=)` is the matching uncached reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_rlp.models.hybrid import unwrap_model
from megatron_rlp.models.packed import PackedDocuments

from .cache import HybridCache


def _add(out_with_bias, residual):
    out, bias = out_with_bias
    return residual + (out if bias is None else out + bias)


class CachedDecoder:
    """`prefill(ids [b, s]) -> (logits [b, s or 1, V], cache)`; `step(tokens [b], cache) -> logits
    [b, V]`. Logits are fp32 over the tokenizer's `vocab_size` (padding rows cut)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        self.model = unwrap_model(model)
        if not (self.model.pre_process and self.model.post_process):
            raise ValueError("cached decoding needs the whole model in one process "
                             "(--pipeline-model-parallel-size 1)")
        if self.model.config.sequence_parallel:
            raise ValueError("cached decoding does not support --sequence-parallel; "
                             "drop it for RLP / generation")
        self.vocab_size = vocab_size
        self.layers = list(self.model.decoder.layers)
        self.kinds = []
        for layer in self.layers:
            if isinstance(layer, MambaLayer):
                self.kinds.append("mamba")
            elif isinstance(layer, MLPLayer):  # subclass of TransformerLayer: test it first
                self.kinds.append("mlp")
            elif isinstance(layer, TransformerLayer):
                self.kinds.append("attention")
            else:
                raise TypeError(f"cached decoding does not know layer type {type(layer).__name__}")
        self.dtype = self.model.config.params_dtype

    # ------------------------------------------------------------------ pieces
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embedding(input_ids=ids, position_ids=None)  # [s, b, H]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.decoder.final_norm(h)
        logits, _ = self.model.output_layer(h)                          # [s, b, V/tp]
        logits = gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.vocab_size].float().transpose(0, 1)   # [b, s, V]

    @staticmethod
    def _qkv(attn, x):
        q, k, v = attn.get_query_key_value_tensors(x)                   # [s, b, heads, d]
        return q, k, v

    @staticmethod
    def _attend(attn, q, k, v, mask):
        """q [b, nh, sq, d], k/v [b, g, sk, d], mask bool [b|1, 1, sq, sk] -> [sq, b, nh*d]."""
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        # Plain matmul-softmax in fp32 (megatron's DotProductAttention softmax is fp32 too); on a
        # CPU it is ~20x faster than torch's masked SDPA at decode shapes.
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
        scores = scores * attn.core_attention.softmax_scale
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = torch.matmul(probs, v.float()).to(q.dtype)
        b, nh, sq, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * d)

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, capacity: Optional[int] = None,
                all_logits: bool = False, eod: Optional[int] = None
                ) -> Tuple[torch.Tensor, HybridCache]:
        """Run `ids [b, s]` (equal-length rows) and return the logits of the last position
        ([b, 1, V], or all positions with `all_logits`) and a cache with room for `capacity`
        tokens in total (default s). `eod`: the rows are packed documents, isolated from each
        other as in training with --reset-attention-mask (see the module docstring)."""
        b, s = ids.shape
        capacity = max(capacity or s, s)
        cache = HybridCache(lengths=torch.full((b,), s, dtype=torch.long, device=ids.device))
        h = self._embed(ids)
        seq_idx = None
        if eod is None:
            mask = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()[None, None]
        else:
            documents = PackedDocuments.from_tokens(ids, eod)
            seq_idx, mask = documents.seq_idx, documents.attention_mask()
            cache.eod, cache.doc_start = eod, documents.last_document_start()
            cache.after_eod = ids[:, -1] == eod
        for i, (kind, layer) in enumerate(zip(self.kinds, self.layers)):
            if kind == "mamba":
                out, conv, ssm = layer.mixer.forward_with_state(layer.norm(h.to(self.dtype)),
                                                                seq_idx=seq_idx)
                h = h + out
                cache.mamba[i] = (conv, ssm)
            elif kind == "attention":
                attn = layer.self_attention
                q, k, v = self._qkv(attn, layer.input_layernorm(h))
                q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))    # [b, heads, s, d]
                h = _add(attn.linear_proj(self._attend(attn, q, k, v, mask)), h)
                kc = k.new_zeros(b, k.shape[1], capacity, k.shape[3])
                vc = torch.zeros_like(kc)
                kc[:, :, :s] = k
                vc[:, :, :s] = v
                cache.kv[i] = (kc, vc)
            else:
                h = _add(layer.mlp(layer.pre_mlp_layernorm(h)), h)
        logits = self._logits(h if all_logits else h[-1:])
        return logits, cache

    # ------------------------------------------------------------------ one token
    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """Feed one token per row (`tokens [b]`) at each row's own position; returns the next
        logits [b, V] and advances `cache` (in place)."""
        b = tokens.shape[0]
        pos = cache.lengths                                              # [b] write index
        if b and int(pos.max()) >= cache.capacity:
            raise ValueError(f"KV cache full ({cache.capacity} tokens); prefill with a larger "
                             "capacity")
        rows = torch.arange(b, device=tokens.device)
        first_key = torch.zeros_like(pos)
        new_document = None
        if cache.eod is not None:
            # A row whose last token was <eod> starts a new document with this token.
            new_document = cache.after_eod
            cache.doc_start = torch.where(new_document, pos, cache.doc_start)
            first_key = cache.doc_start
        h = self._embed(tokens[:, None])                                 # [1, b, H]
        for i, (kind, layer) in enumerate(zip(self.kinds, self.layers)):
            if kind == "mamba":
                conv, ssm = cache.mamba[i]
                if new_document is not None:  # fresh states for a new document
                    conv = conv.masked_fill(new_document[:, None, None], 0)
                    ssm = ssm.masked_fill(new_document[:, None, None, None], 0)
                out, conv, ssm = layer.mixer.step(layer.norm(h.to(self.dtype)), conv, ssm)
                h = h + out
                cache.mamba[i] = (conv, ssm)
            elif kind == "attention":
                attn = layer.self_attention
                q, k, v = self._qkv(attn, layer.input_layernorm(h))      # [1, b, heads, d]
                kc, vc = cache.kv[i]
                kc[rows, :, pos] = k[0]
                vc[rows, :, pos] = v[0]
                keys = torch.arange(kc.shape[2], device=tokens.device)
                mask = ((keys[None, :] <= pos[:, None])
                        & (keys[None, :] >= first_key[:, None]))[:, None, None, :]  # [b,1,1,L]
                q = q.permute(1, 2, 0, 3)                                # [b, nh, 1, d]
                h = _add(attn.linear_proj(self._attend(attn, q, kc, vc, mask)), h)
            else:
                h = _add(layer.mlp(layer.pre_mlp_layernorm(h)), h)
        cache.lengths = cache.lengths + 1
        if cache.eod is not None:
            cache.after_eod = tokens == cache.eod
        return self._logits(h)[:, 0]


@torch.no_grad()
def full_logits(model: torch.nn.Module, ids: torch.Tensor, vocab_size: int,
                eod: Optional[int] = None) -> torch.Tensor:
    """The uncached reference: the model's own forward on the whole sequence, [b, s, V] fp32
    (`eod`: packed documents isolated, the training forward of --reset-attention-mask)."""
    documents = None if eod is None else PackedDocuments.from_tokens(ids, eod)
    logits = unwrap_model(model)(ids, None, None, packed_seq_params=documents)
    logits = gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab_size].float()
