"""Read an HF NemotronH config.json as transformers 5.x does, keeping the key each value came from.

NVIDIA's hub files were written for the remote-code `configuration_nemotron_h.py` and spell several
settings differently from transformers' built-in `NemotronHConfig`, which accepts both spellings.
The aliases and their precedence are transformers 5.24's (`models/nemotron_h/
configuration_nemotron_h.py`: `NemotronHConfig.__post_init__` pops `mamba_n_groups`, `mamba_d_conv`,
... over the canonical field; `attribute_map` makes `layer_types` a name of `layers_block_type`;
`hybrid_override_pattern` is used only when no layer list is given; `configuration_utils.
remap_legacy_layer_types` turns the legacy kinds `mamba`/`attention` into `linear_attention`/
`full_attention`). tests/test_hf_config_spellings.py holds this table and the defaults against the
installed transformers, so an alias added there fails a test instead of being ignored here.

Departures from transformers, each so that the import computes what the file means:
- `attention_head_dim` (the remote-code name of `head_dim`, in Nemotron-H-4B/8B/47B/56B files) is
  read as `head_dim` when `head_dim` is absent. transformers 5.24 ignores it and keeps its default
  128, the value those releases hold, so both read them alike; a file whose weights disagree with
  its attention_head_dim is refused naming that key.
- Two spellings of one setting with different values are refused (transformers silently takes the
  first of SPELLINGS[name]); so is a `num_hidden_layers` that disagrees with the layer list
  (transformers warns and uses the list).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .mapping import MAMBA_GATED_NORM_EPS, ConversionError

# setting → the config.json keys that spell it, in transformers' precedence (first present wins).
SPELLINGS: Dict[str, Tuple[str, ...]] = {
    "n_groups": ("mamba_n_groups", "n_groups"),
    "conv_kernel": ("mamba_d_conv", "conv_kernel"),
    "chunk_size": ("mamba_chunk_size", "chunk_size"),
    "expand": ("mamba_expand", "expand"),
    "use_conv_bias": ("mamba_conv_bias", "use_conv_bias"),
    "time_step_min": ("mamba_dt_min", "time_step_min"),
    "time_step_max": ("mamba_dt_max", "time_step_max"),
    "time_step_floor": ("mamba_dt_init_floor", "time_step_floor"),
    "time_step_limit": ("mamba_dt_limit", "time_step_limit"),
    "head_dim": ("head_dim", "attention_head_dim"),  # attention_head_dim: ours, see the docstring
}
# The layer list: `layer_types` is set after `layers_block_type` (attribute_map), so it wins.
LAYER_SPELLINGS = ("layer_types", "layers_block_type", "hybrid_override_pattern")
KIND_TO_SYMBOL = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E",
                  "mamba": "M", "attention": "*"}  # the last two: legacy kinds transformers remaps
PATTERN_SYMBOLS = "M*-E"  # NemotronHConfig._pattern_to_list

# NemotronHConfig's field defaults (transformers 5.24) for every setting the import reads: a key
# the file leaves out means this value to transformers (they are 12B-sized, not ours).
TRANSFORMERS_DEFAULTS: Dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 21504, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "mamba_num_heads": 128, "mamba_head_dim": 64,
    "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4, "chunk_size": 128, "expand": 2,
    "use_conv_bias": True, "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
    "time_step_limit": (0.0, math.inf), "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
    "mlp_hidden_act": "relu2", "mamba_hidden_act": "silu", "use_bias": False, "mlp_bias": False,
    "attention_bias": False, "mamba_proj_bias": False, "num_nextn_predict_layers": 0,
    "sliding_window": None, "tie_word_embeddings": False,
}

# Which settings size each axis of an HF tensor, by the end of its name (longest match wins);
# None: the axis is taken from the weights themselves (the vocabulary rows).
_MAMBA_CONV = ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size")
_ATTN_Q = ("num_attention_heads", "head_dim")
_ATTN_KV = ("num_key_value_heads", "head_dim")
_AXES = {
    "embeddings.weight": (None, ("hidden_size",)),
    "lm_head.weight": (None, ("hidden_size",)),
    "norm.weight": (("hidden_size",),),
    "norm_f.weight": (("hidden_size",),),
    "mixer.in_proj.weight": (_MAMBA_CONV, ("hidden_size",)),
    "mixer.conv1d.weight": (_MAMBA_CONV, (), ("conv_kernel",)),
    "mixer.conv1d.bias": (_MAMBA_CONV,),
    "mixer.dt_bias": (("mamba_num_heads",),),
    "mixer.A_log": (("mamba_num_heads",),),
    "mixer.D": (("mamba_num_heads",),),
    "mixer.norm.weight": (("mamba_num_heads", "mamba_head_dim"),),
    "mixer.out_proj.weight": (("hidden_size",), ("mamba_num_heads", "mamba_head_dim")),
    "mixer.q_proj.weight": (_ATTN_Q, ("hidden_size",)),
    "mixer.k_proj.weight": (_ATTN_KV, ("hidden_size",)),
    "mixer.v_proj.weight": (_ATTN_KV, ("hidden_size",)),
    "mixer.o_proj.weight": (("hidden_size",), _ATTN_Q),
    "mixer.up_proj.weight": (("intermediate_size",), ("hidden_size",)),
    "mixer.down_proj.weight": (("hidden_size",), ("intermediate_size",)),
}


def _same(a, b) -> bool:
    """Two spellings hold one value: a list equals a tuple (`[0.0, Infinity]`); `true` isn't `1`."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    as_tuple = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
    return as_tuple(a) == as_tuple(b)


@dataclass(frozen=True)
class Setting:
    name: str
    value: Any
    key: Optional[str]  # the config.json key it was read from; None: transformers' default

    def __str__(self) -> str:
        text = f"{self.name}={self.value!r}"
        if self.key is None:
            keys = " or ".join(SPELLINGS.get(self.name, (self.name,)))
            return f"{text} (transformers' default; the file has no {keys} key)"
        return text if self.key == self.name else f"{text} (from {self.key}={self.value!r})"


class NemotronHConfigKeys:
    """A config.json dict resolved once: `value(name)`, `describe(name)` (value and source key),
    and `pattern` (our layer symbols). Raises `ConversionError` on spellings that disagree, MoE
    layers, or a layer list it cannot read."""

    def __init__(self, raw: dict):
        self.raw = raw
        self.settings = {name: self._resolve(name) for name in TRANSFORMERS_DEFAULTS}
        self.pattern = self._read_layers()

    def value(self, name: str):
        return self.settings[name].value

    def describe(self, name: str) -> str:
        return str(self.settings[name])

    def _resolve(self, name: str) -> Setting:
        present = [k for k in SPELLINGS.get(name, (name,)) if k in self.raw]
        for other in present[1:]:
            if not _same(self.raw[present[0]], self.raw[other]):
                raise ConversionError(
                    f"config.json {present[0]}={self.raw[present[0]]!r} and {other}="
                    f"{self.raw[other]!r} disagree: both spell {name} (transformers would use "
                    f"{present[0]}); remove one or make them equal")
        if not present:
            return Setting(name, TRANSFORMERS_DEFAULTS[name], None)
        return Setting(name, self.raw[present[0]], present[0])

    def _read_layers(self) -> str:
        given = [k for k in LAYER_SPELLINGS if self.raw.get(k) is not None]
        if not given:
            raise ConversionError(
                "config.json has no layers_block_type (or layer_types / hybrid_override_pattern); "
                "transformers would fall back to a 4-layer MoE layout: add the model's layer list")
        readings = [(key, self._symbols(key)) for key in given]
        key, symbols = readings[0]
        for other, theirs in readings[1:]:
            if theirs != symbols:
                where = next((i for i, (a, b) in enumerate(zip(symbols, theirs)) if a != b), None)
                detail = (f"{len(symbols)} vs {len(theirs)} layers" if where is None else
                          f"layer {where}: {self.raw[key][where]!r} vs "
                          f"{self.raw[other][where]!r}")
                raise ConversionError(f"config.json {key} and {other} disagree ({detail}); "
                                      f"transformers uses {key}: remove one or make them equal")
        layers = self.raw.get("num_hidden_layers")
        if layers is not None and layers != len(symbols):
            raise ConversionError(
                f"config.json num_hidden_layers={layers!r} but {key} has {len(symbols)} layers "
                f"(transformers uses {key}'s length): make them agree")
        moe = [i for i, s in enumerate(symbols) if s == "E"]
        if moe:
            raise ConversionError(
                f"config.json {key}[{moe[0]}]={self.raw[key][moe[0]]!r}: layer(s) "
                f"{', '.join(map(str, moe))} (of {len(symbols)}, from {key}) are MoE, which "
                "megatron-rlp does not implement; only Mamba (M), attention (*) and MLP (-) "
                "layers import")
        return "".join(symbols)

    def _symbols(self, key: str) -> list:
        entries = self.raw[key]
        if key == "hybrid_override_pattern":
            if not isinstance(entries, str):
                raise ConversionError(f"config.json {key}={entries!r}: must be a string of "
                                      f"{PATTERN_SYMBOLS!r} characters")
            table = {c: c for c in PATTERN_SYMBOLS}
        else:
            if not isinstance(entries, list):
                raise ConversionError(f"config.json {key}={entries!r}: must be a list of layer "
                                      f"kinds ({sorted(KIND_TO_SYMBOL)})")
            table = KIND_TO_SYMBOL
        out = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, str) or entry not in table:
                raise ConversionError(
                    f"config.json {key}[{i}]={entry!r}: not a NemotronH layer kind (one of "
                    f"{sorted(table)}; megatron-rlp imports the Mamba, attention and MLP kinds)")
            out.append(table[entry])
        return out

    def explain_shape(self, tensor: str, found: tuple, expected: tuple) -> str:
        """Which settings (and keys) the disagreeing axes of `expected` came from."""
        suffix = max((s for s in _AXES if tensor == s or tensor.endswith("." + s)),
                     key=len, default=None)
        if suffix is None:
            return ""
        axes = _AXES[suffix]
        parts = []
        for axis, names in enumerate(axes):
            got = found[axis] if axis < len(found) else None
            want = expected[axis] if axis < len(expected) else None
            if names and (got != want or len(found) != len(expected)):
                parts.append(f"dim {axis} = {want} from " +
                             ", ".join(self.describe(n) for n in names))
        return "; ".join(parts)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def model_config_from_hf(hf: dict) -> dict:
    """Flat megatron-rlp model fields from an HF NemotronH config.json dict, in any spelling
    transformers reads. Raises `ConversionError` naming the first key our model cannot represent."""
    if hf.get("model_type") != "nemotron_h":
        raise ConversionError(f"config.json model_type={hf.get('model_type')!r}: only "
                              "'nemotron_h' can be imported")
    keys = NemotronHConfigKeys(hf)
    value = keys.value

    def need(name, ok, why):
        if not ok:
            raise ConversionError(f"config.json {keys.describe(name)}: {why}")

    sizes = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
             "conv_kernel", "chunk_size")
    for name in sizes:
        need(name, _is_int(value(name)) and value(name) > 0, "must be a positive integer")
    need("mlp_hidden_act", value("mlp_hidden_act") == "relu2", "our MLP is squared ReLU only")
    need("mamba_hidden_act", value("mamba_hidden_act") == "silu", "our Mamba2 mixer uses SiLU only")
    for name in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias"):
        need(name, not value(name), "our linears have no bias")
    need("use_conv_bias", value("use_conv_bias") is True, "our Mamba2 conv always has a bias")
    need("num_nextn_predict_layers", not value("num_nextn_predict_layers"),
         "multi-token-prediction layers are not supported")
    need("sliding_window", value("sliding_window") is None, "sliding-window attention is not "
         "supported")
    for name in ("layer_norm_epsilon", "initializer_range"):
        need(name, isinstance(value(name), (int, float)) and not isinstance(value(name), bool),
             "must be a number")
    eps = float(value("layer_norm_epsilon"))
    need("layer_norm_epsilon", "M" not in keys.pattern or math.isclose(eps, MAMBA_GATED_NORM_EPS),
         f"our Mamba gated norm uses eps {MAMBA_GATED_NORM_EPS}")
    need("num_key_value_heads", value("num_attention_heads") % value("num_key_value_heads") == 0,
         f"must divide {keys.describe('num_attention_heads')}")
    need("n_groups", value("mamba_num_heads") % value("n_groups") == 0,
         f"must divide {keys.describe('mamba_num_heads')}")
    chunk = value("chunk_size")
    need("chunk_size", chunk & (chunk - 1) == 0, "our SSD scan needs a power-of-two chunk")
    heads, hidden, head_dim = value("num_attention_heads"), value("hidden_size"), value("head_dim")
    return {
        "num_layers": len(keys.pattern),
        "hybrid_override_pattern": keys.pattern,
        "hidden_size": hidden,
        "ffn_hidden_size": value("intermediate_size"),
        "num_attention_heads": heads,
        "num_query_groups": value("num_key_value_heads"),
        # kv_channels unset means hidden/heads to us; any other head size is explicit.
        "kv_channels": None if head_dim * heads == hidden else head_dim,
        "mamba_num_heads": value("mamba_num_heads"),
        "mamba_head_dim": value("mamba_head_dim"),
        "mamba_state_dim": value("ssm_state_size"),
        "mamba_num_groups": value("n_groups"),
        "mamba_conv_kernel": value("conv_kernel"),
        "mamba_chunk_size": chunk,
        "norm_epsilon": eps,
        "init_method_std": float(value("initializer_range")),
    }
