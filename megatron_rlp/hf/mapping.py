"""megatron-rlp ⇄ Hugging Face NemotronH: names, layouts and config, as pure functions.

Nothing here reads files or touches process groups; `export.py` and `import_.py` stream tensors
through these functions.

Tensor correspondence (i = global layer index; ours are the dist_checkpointing keys, which are the
full TP=1 tensors whatever TP/PP the checkpoint was saved at: megatron stores the Mamba in_proj and
conv1d per component, so "merge per component" is already done by the checkpoint format):

    ours                                             HF (on-disk names)
    embedding.word_embeddings.weight   [V, H]        backbone.embeddings.weight
    M  decoder.layers.i.norm.weight                  backbone.layers.i.norm.weight
       ...mixer.in_proj.weight.{z,x,B,C,dt}          ...mixer.in_proj.weight      rows z|x|B|C|dt
       ...mixer.conv1d.{weight,bias}.{x,B,C}         ...mixer.conv1d.{weight,bias} channels x|B|C
       ...mixer.{A_log,D,dt_bias,norm.weight,out_proj.weight}   same names
    *  decoder.layers.i.input_layernorm.weight       backbone.layers.i.norm.weight
       ...self_attention.linear_qkv.weight           ...mixer.{q,k,v}_proj.weight (de-interleaved)
       ...self_attention.linear_proj.weight          ...mixer.o_proj.weight
    -  decoder.layers.i.pre_mlp_layernorm.weight     backbone.layers.i.norm.weight
       ...mlp.linear_fc1.weight / linear_fc2.weight  ...mixer.up_proj.weight / down_proj.weight
    decoder.final_norm.weight                        backbone.norm_f.weight
    output_layer.weight                [V, H]        lm_head.weight

megatron's fused `linear_qkv` holds, for each of the G query groups in turn, the rows
[q heads of the group (Q/G · d) | k (d) | v (d)]; HF keeps q, k and v as separate matrices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

# Our pattern symbol ⇄ HF `layers_block_type` entry.
SYMBOL_TO_HF = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
# The gated RMSNorm inside our Mamba2 mixer uses a fixed epsilon (models/mamba2.py NORM_EPS); HF
# uses `layer_norm_epsilon` for every norm, so the two must agree.
MAMBA_GATED_NORM_EPS = 1e-5
# HF clamps dt at `time_step_min` at run time, megatron does not (DESIGN.md); we ship HF's default.
HF_TIME_STEP_MIN = 0.001
SIDECAR_FILE = "megatron_rlp.json"


class ConversionError(ValueError):
    """A tensor or config field that cannot be converted; the message names it."""


# ------------------------------------------------------------------------------------------------
# Dimensions
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """Every size the mapping needs (global, TP=1)."""

    pattern: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    mamba_heads: int
    mamba_head_dim: int
    mamba_groups: int
    mamba_state: int
    conv_kernel: int
    vocab_rows: int  # rows of the embedding / output layer as stored

    @property
    def d_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def gn(self) -> int:
        return self.mamba_groups * self.mamba_state

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.gn


def dims_from_model_config(model_cfg, vocab_rows: int) -> Dims:
    """`model_cfg` is our `ModelConfig` (or anything with its field names)."""
    head_dim = model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads
    return Dims(
        pattern=model_cfg.hybrid_override_pattern, hidden=model_cfg.hidden_size,
        ffn=model_cfg.ffn_hidden_size, heads=model_cfg.num_attention_heads,
        kv_heads=model_cfg.num_query_groups, head_dim=head_dim,
        mamba_heads=model_cfg.mamba_num_heads, mamba_head_dim=model_cfg.mamba_head_dim,
        mamba_groups=model_cfg.mamba_num_groups, mamba_state=model_cfg.mamba_state_dim,
        conv_kernel=model_cfg.mamba_conv_kernel, vocab_rows=vocab_rows)


# ------------------------------------------------------------------------------------------------
# Fused QKV (de)interleave
# ------------------------------------------------------------------------------------------------


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """megatron `linear_qkv.weight` [(Q + 2G)·d, H] → (q [Q·d, H], k [G·d, H], v [G·d, H])."""
    per_group = heads // kv_heads
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(kv_heads, per_group + 2, head_dim, hidden)
    q = grouped[:, :per_group].reshape(heads * head_dim, hidden)
    k = grouped[:, per_group].reshape(kv_heads * head_dim, hidden)
    v = grouped[:, per_group + 1].reshape(kv_heads * head_dim, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    per_group = heads // kv_heads
    hidden = q.shape[-1]
    grouped = torch.cat([q.reshape(kv_heads, per_group, head_dim, hidden),
                         k.reshape(kv_heads, 1, head_dim, hidden),
                         v.reshape(kv_heads, 1, head_dim, hidden)], dim=1)
    return grouped.reshape((heads + 2 * kv_heads) * head_dim, hidden)


# ------------------------------------------------------------------------------------------------
# Tensor groups: one HF tensor (or one fused megatron tensor) and how to convert it
# ------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """`ours` (keys, shapes) ⇄ `hf` (names, shapes); `to_hf(list) -> list`, `to_ours(list) -> list`."""

    ours: List[str]
    our_shapes: List[tuple]
    hf: List[str]
    hf_shapes: List[tuple]
    to_hf: Callable[[List[torch.Tensor]], List[torch.Tensor]]
    to_ours: Callable[[List[torch.Tensor]], List[torch.Tensor]]


def _same(our: str, hf: str, shape: tuple) -> Group:
    return Group([our], [shape], [hf], [shape], lambda t: list(t), lambda t: list(t))


def _concat(ours: List[str], shapes: List[tuple], hf: str) -> Group:
    """Several megatron components stacked along dim 0 into one HF tensor."""
    rows = [s[0] for s in shapes]
    full = (sum(rows),) + tuple(shapes[0][1:])
    return Group(ours, shapes, [hf], [full],
                 lambda t: [torch.cat(t, dim=0)],
                 lambda t: [p.contiguous() for p in torch.split(t[0], rows, dim=0)])


def layer_groups(i: int, symbol: str, d: Dims) -> List[Group]:
    our, hf = f"decoder.layers.{i}.", f"backbone.layers.{i}."
    H = d.hidden
    if symbol == "M":
        m = our + "mixer."
        comps = ["z", "x", "B", "C", "dt"]
        rows = [d.d_inner, d.d_inner, d.gn, d.gn, d.mamba_heads]
        conv_rows = [d.d_inner, d.gn, d.gn]
        return [
            _same(our + "norm.weight", hf + "norm.weight", (H,)),
            _concat([f"{m}in_proj.weight.{c}" for c in comps], [(r, H) for r in rows],
                    hf + "mixer.in_proj.weight"),
            _concat([f"{m}conv1d.weight.{c}" for c in "xBC"],
                    [(r, 1, d.conv_kernel) for r in conv_rows], hf + "mixer.conv1d.weight"),
            _concat([f"{m}conv1d.bias.{c}" for c in "xBC"], [(r,) for r in conv_rows],
                    hf + "mixer.conv1d.bias"),
            _same(m + "dt_bias", hf + "mixer.dt_bias", (d.mamba_heads,)),
            _same(m + "A_log", hf + "mixer.A_log", (d.mamba_heads,)),
            _same(m + "D", hf + "mixer.D", (d.mamba_heads,)),
            _same(m + "norm.weight", hf + "mixer.norm.weight", (d.d_inner,)),
            _same(m + "out_proj.weight", hf + "mixer.out_proj.weight", (H, d.d_inner)),
        ]
    if symbol == "*":
        a = our + "self_attention."
        q_rows, kv_rows = d.heads * d.head_dim, d.kv_heads * d.head_dim
        args = (d.heads, d.kv_heads, d.head_dim)
        return [
            _same(our + "input_layernorm.weight", hf + "norm.weight", (H,)),
            Group([a + "linear_qkv.weight"], [(q_rows + 2 * kv_rows, H)],
                  [hf + f"mixer.{p}_proj.weight" for p in "qkv"],
                  [(q_rows, H), (kv_rows, H), (kv_rows, H)],
                  lambda t: list(split_qkv(t[0], *args)),
                  lambda t: [merge_qkv(*t, *args)]),
            _same(a + "linear_proj.weight", hf + "mixer.o_proj.weight", (H, q_rows)),
        ]
    if symbol == "-":
        return [
            _same(our + "pre_mlp_layernorm.weight", hf + "norm.weight", (H,)),
            _same(our + "mlp.linear_fc1.weight", hf + "mixer.up_proj.weight", (d.ffn, H)),
            _same(our + "mlp.linear_fc2.weight", hf + "mixer.down_proj.weight", (H, d.ffn)),
        ]
    raise ConversionError(f"layer {i}: pattern symbol {symbol!r} has no NemotronH equivalent "
                          f"(supported: {sorted(SYMBOL_TO_HF)})")


def model_units(d: Dims) -> List[List[Group]]:
    """The model as a list of units (embedding, each layer, final norm + head), in file order.
    Export loads one unit at a time, so peak memory is about one layer."""
    units = [[_same("embedding.word_embeddings.weight", "backbone.embeddings.weight",
                    (d.vocab_rows, d.hidden))]]
    units += [layer_groups(i, s, d) for i, s in enumerate(d.pattern)]
    units.append([_same("decoder.final_norm.weight", "backbone.norm_f.weight", (d.hidden,)),
                  _same("output_layer.weight", "lm_head.weight", (d.vocab_rows, d.hidden))])
    return units


def is_model_key(key: str) -> bool:
    """Keys of the model in a dist checkpoint (optimizer, RNG and extension state are not)."""
    return key.startswith(("embedding.", "decoder.", "output_layer.")) and \
        not key.endswith("_extra_state")


def check_keys(found: dict, units: List[List[Group]], side: str,
               explain_shape: Optional[Callable[[str, tuple, tuple], str]] = None) -> None:
    """`found`: name → shape. Raise naming the first unknown, missing or mis-shaped tensor;
    `explain_shape(name, found, expected)` says which config keys the expected shape came from."""
    expected = {}
    for unit in units:
        for g in unit:
            names, shapes = (g.ours, g.our_shapes) if side == "ours" else (g.hf, g.hf_shapes)
            expected.update(zip(names, shapes))
    unknown = sorted(set(found) - set(expected))
    if unknown:
        raise ConversionError(
            f"unknown tensor {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1
                                               else "")
            + f" in the {'checkpoint' if side == 'ours' else 'HF model'}: the NemotronH mapping "
            f"has no place for it (a layer kind, bias or extra head the format lacks?)")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ConversionError(
            f"tensor {missing[0]!r} is missing from the "
            f"{'checkpoint' if side == 'ours' else 'HF model'}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; does the config's pattern/sizes match the weights?")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            why = explain_shape(name, tuple(found[name]), tuple(shape)) if explain_shape else ""
            raise ConversionError(
                f"tensor {name!r} has shape {tuple(found[name])}, but the config implies "
                f"{tuple(shape)}" + (f" ({why})" if why else "")
                + "; the config and the weights disagree")


# ------------------------------------------------------------------------------------------------
# Config translation
# ------------------------------------------------------------------------------------------------


def hf_config(model_cfg, *, vocab_size: int, max_position_embeddings: int, dtype: str,
              eos_token_id: Optional[int], pad_token_id: Optional[int],
              bos_token_id: Optional[int] = None) -> dict:
    """config.json for `NemotronHForCausalLM` from our `ModelConfig`. Every size is explicit (HF's
    defaults are 12B-sized). Raises `ConversionError` for settings HF cannot express."""
    m = model_cfg
    if "M" in m.hybrid_override_pattern and not math.isclose(m.norm_epsilon, MAMBA_GATED_NORM_EPS,
                                                             rel_tol=0, abs_tol=1e-12):
        raise ConversionError(
            f"norm_epsilon={m.norm_epsilon}: HF NemotronH uses one `layer_norm_epsilon` for every "
            f"norm, but our Mamba gated norm always uses {MAMBA_GATED_NORM_EPS}; the exported model "
            f"would compute different numbers. Train with --norm-epsilon {MAMBA_GATED_NORM_EPS}")
    for symbol in m.hybrid_override_pattern:
        if symbol not in SYMBOL_TO_HF:
            raise ConversionError(f"hybrid_override_pattern={m.hybrid_override_pattern!r}: symbol "
                                  f"{symbol!r} has no NemotronH layer kind")
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "layers_block_type": [SYMBOL_TO_HF[s] for s in m.hybrid_override_pattern],
        "num_hidden_layers": m.num_layers,
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": head_dim,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": max_position_embeddings,
        "mamba_num_heads": m.mamba_num_heads,
        "mamba_head_dim": m.mamba_head_dim,
        "n_groups": m.mamba_num_groups,
        "ssm_state_size": m.mamba_state_dim,
        "conv_kernel": m.mamba_conv_kernel,
        "chunk_size": m.mamba_chunk_size,
        "expand": max(1, (m.mamba_num_heads * m.mamba_head_dim) // m.hidden_size),  # unused by HF
        "mamba_hidden_act": "silu",
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "use_bias": False,
        "time_step_min": HF_TIME_STEP_MIN,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "layer_norm_epsilon": m.norm_epsilon,
        "residual_in_fp32": False,
        "hidden_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "rescale_prenorm_residual": True,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
    }


def hf_name_to_canonical(name: str) -> str:
    """transformers may save `model.*` (its in-memory prefix); the format's own is `backbone.*`."""
    return "backbone." + name[len("model."):] if name.startswith("model.") else name


def check_safe_filename(root: str, name: str) -> str:
    """Join `name` (from an untrusted index file) under `root`, refusing anything that escapes."""
    import os

    if not name or os.path.isabs(name) or any(p in ("..", "") for p in name.replace("\\", "/").split("/")):
        raise ConversionError(f"refusing file name {name!r}: it must be a plain relative path "
                              f"inside {root!r}")
    path = os.path.join(root, name)
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        raise ConversionError(f"refusing file {name!r}: it resolves outside {root!r} (symlink?)")
    return path


def shard_plan(sizes: Sequence[tuple], max_shard_bytes: int) -> List[int]:
    """Greedy: `sizes` = [(name, nbytes)] in order → shard index of each entry."""
    out, shard, used = [], 0, 0
    for _, nbytes in sizes:
        if used and used + nbytes > max_shard_bytes:
            shard, used = shard + 1, 0
        out.append(shard)
        used += nbytes
    return out
