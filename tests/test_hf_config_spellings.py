"""Every config.json spelling transformers' NemotronHConfig reads imports with transformers' logits.

tests/hf_configs/ holds tiny config.json files in the spellings found on the hub:
- v1_hub_keys.json: the remote-code key set of Nemotron-H-4B/8B/47B (`attention_head_dim`, no
  `head_dim`, `hybrid_override_pattern`, `auto_map`), with hidden / heads = 16 != head size 128
  as in Nemotron-H-4B (3072 / 32 = 96);
- nano_v2_head_dim.json: Nemotron-Nano-v2's `head_dim` (32, hidden / heads = 16), one KV head;
- mamba_aliases.json: only `mamba_*` spellings, non-default (n_groups 4, conv 3, chunk 32, ...);
- legacy_layer_kinds.json: `layers_block_type` with the legacy kinds `mamba` / `attention`;
- moe_layout.json: `E` layers in `hybrid_override_pattern` (transformers reads it; we refuse).
For each, transformers builds a random model from that very dict and saves it; the
file is then put back verbatim as config.json (save_pretrained would rewrite it in transformers'
own spelling), our importer reads the directory, and logits are compared with transformers
loading the same directory. Dict-level tests pin the alias table and defaults to the installed
transformers, and the refusals (disagreeing spellings, MoE layers, weights that disagree with a
key) to one line naming the keys.
"""
import inspect
import json
import math
import os
import re
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")  # dev extra; an import error elsewhere fails
from transformers import NemotronHConfig, NemotronHForCausalLM  # noqa: E402

from megatron_rlp.hf import config_keys, mapping  # noqa: E402
from megatron_rlp.hf.import_ import import_from_hf  # noqa: E402
from megatron_rlp.hf.parity import compare, load_hf_reference  # noqa: E402

CORPUS = os.path.join(os.path.dirname(__file__), "hf_configs")
TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "megatron_rlp", "data", "assets",
                         "tokenizer.json")
TOL = 1e-4
SEQ = 40  # longer than every corpus chunk size (16, 32) and not a multiple of it


def _raw(name):
    with open(os.path.join(CORPUS, name)) as f:
        return json.load(f)


@torch.no_grad()
def make_hf_dir(root, name, seed=0, **edits):
    """A directory transformers loads: weights from transformers' own model built from the corpus
    file `name`; config.json is that file verbatim (plus `edits`, applied after the weights)."""
    raw = _raw(name)
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig.from_dict(dict(raw)))
    g = torch.Generator().manual_seed(seed + 1)
    for pname, p in model.named_parameters():
        # transformers' init (std 0.02, rescaled out-projections) leaves each mixer's output ~1e-3
        # of the residual, below the tolerance; unit-gain matrices make every layer count, and norm
        # weights, D and dt_bias away from init make a swapped tensor move the logits.
        if p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        elif pname.endswith(("norm.weight", "norm_f.weight", ".D")):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif pname.endswith("dt_bias"):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    out = os.path.join(str(root), name.rsplit(".", 1)[0])
    model.save_pretrained(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**raw, **edits}, f)
    shutil.copy(TOKENIZER, os.path.join(out, "tokenizer.json"))
    return out


def _head_size(m):
    return m.kv_channels or m.hidden_size // m.num_attention_heads


# ------------------------------------------------------------------------------------------------
# The corpus: import, read like transformers, same logits
# ------------------------------------------------------------------------------------------------

PARITY_FILES = ["v1_hub_keys.json", "nano_v2_head_dim.json", "mamba_aliases.json",
                "legacy_layer_kinds.json"]


@pytest.mark.parametrize("name", PARITY_FILES)
def test_corpus_config_imports_with_transformers_logits(tmp_path, name):
    from megatron_rlp import load_model

    hf_dir = make_hf_dir(tmp_path, name, seed=PARITY_FILES.index(name))
    ours = load_model(hf_dir, device="cpu")
    # Our reading of the file equals transformers' reading of it, field by field.
    theirs = NemotronHConfig.from_dict(_raw(name))
    m = ours.run_config.model
    assert m.hybrid_override_pattern == theirs.hybrid_override_pattern
    assert _head_size(m) == theirs.head_dim
    assert (m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (
        theirs.hidden_size, theirs.intermediate_size, theirs.num_attention_heads,
        theirs.num_key_value_heads)
    assert (m.mamba_num_heads, m.mamba_head_dim, m.mamba_state_dim, m.mamba_num_groups,
            m.mamba_conv_kernel, m.mamba_chunk_size) == (
        theirs.mamba_num_heads, theirs.mamba_head_dim, theirs.ssm_state_size, theirs.n_groups,
        theirs.conv_kernel, theirs.chunk_size)
    ids = torch.randint(0, 1024, (2, SEQ), generator=torch.Generator().manual_seed(0))
    rows = compare(ours, load_hf_reference(hf_dir), ids)
    print(f"\n{name}: logits max abs diff {rows[-1]['max_abs_diff']:.3e}")
    assert rows[-1]["max_abs_diff"] <= TOL, rows
    assert rows[-1]["max_abs"] > 0.1  # not two near-zero tensors


def test_corpus_files_keep_the_spellings_they_exist_to_test():
    """A corpus edit must not quietly turn a spelling test into a defaults test."""
    v1 = _raw("v1_hub_keys.json")
    assert "head_dim" not in v1
    assert v1["attention_head_dim"] * v1["num_attention_heads"] != v1["hidden_size"]
    nano = _raw("nano_v2_head_dim.json")
    assert nano["head_dim"] * nano["num_attention_heads"] != nano["hidden_size"]
    aliases = _raw("mamba_aliases.json")
    for alias, canonical in [("mamba_n_groups", "n_groups"), ("mamba_d_conv", "conv_kernel"),
                             ("mamba_chunk_size", "chunk_size")]:
        assert canonical not in aliases
        assert aliases[alias] != config_keys.TRANSFORMERS_DEFAULTS[canonical], alias
    assert {"mamba", "attention"} <= set(_raw("legacy_layer_kinds.json")["layers_block_type"])


def test_moe_layout_is_refused_naming_its_layers_and_key(tmp_path):
    hf_dir = make_hf_dir(tmp_path, "moe_layout.json")
    transformers.AutoModelForCausalLM.from_pretrained(hf_dir)  # a file transformers reads
    save = tmp_path / "out"
    with pytest.raises(mapping.ConversionError) as error:
        import_from_hf(hf_dir, str(save), verbose=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("config.json hybrid_override_pattern[1]='E': layer(s) 1, 3 "
                              "(of 4, from hybrid_override_pattern) are MoE"), message
    assert not save.exists()


def test_weights_disagreeing_with_a_key_name_the_key(tmp_path):
    # transformers made 128-wide heads (its default: it does not read attention_head_dim); the
    # file then claims 64 in the v1 spelling. The message must point at that key.
    hf_dir = make_hf_dir(tmp_path, "v1_hub_keys.json", attention_head_dim=64)
    with pytest.raises(mapping.ConversionError) as error:
        import_from_hf(hf_dir, str(tmp_path / "out"), verbose=False)
    message = str(error.value)
    assert "\n" not in message
    assert "'backbone.layers.3.mixer.q_proj.weight' has shape (512, 64), but the config implies " \
           "(256, 64)" in message, message
    assert "dim 0 = 256 from num_attention_heads=4, head_dim=64 (from attention_head_dim=64)" \
        in message, message


# ------------------------------------------------------------------------------------------------
# The spelling table against the installed transformers
# ------------------------------------------------------------------------------------------------

# A non-default value per setting, to see which spelling transformers keeps.
NON_DEFAULT = {"n_groups": 4, "conv_kernel": 3, "chunk_size": 32, "expand": 3,
               "use_conv_bias": False, "time_step_min": 0.002, "time_step_max": 0.2,
               "time_step_floor": 2e-4, "time_step_limit": [0.0, 5.0]}
ALIASED = {name: spellings for name, spellings in config_keys.SPELLINGS.items()
           if name != "head_dim"}  # head_dim's second spelling is ours (see test below)


def test_spelling_table_is_every_alias_transformers_pops():
    source = inspect.getsource(NemotronHConfig.__post_init__)
    popped = set(re.findall(r'kwargs\.pop\("(\w+)"\)', source))
    ours = {spellings[0] for spellings in ALIASED.values()}
    assert popped == ours | {"hybrid_override_pattern", "mtp_hybrid_override_pattern"}
    assert NemotronHConfig.attribute_map["layer_types"] == "layers_block_type"


@pytest.mark.parametrize("name", sorted(ALIASED))
def test_alias_sets_the_setting_and_wins_in_transformers(name):
    alias, canonical = ALIASED[name]
    assert canonical == name
    value = NON_DEFAULT[name]
    alone = NemotronHConfig.from_dict({"hybrid_override_pattern": "M", alias: value})
    assert _listed(getattr(alone, name)) == _listed(value)
    both = NemotronHConfig.from_dict({"hybrid_override_pattern": "M", alias: value,
                                      canonical: config_keys.TRANSFORMERS_DEFAULTS[name]})
    assert _listed(getattr(both, name)) == _listed(value)  # the first spelling wins
    keys = config_keys.NemotronHConfigKeys({"hybrid_override_pattern": "M", alias: value})
    assert _listed(keys.value(name)) == _listed(value)
    assert keys.describe(name) == f"{name}={value!r} (from {alias}={value!r})"


def _listed(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def test_defaults_are_transformers_defaults():
    default = NemotronHConfig()
    for name, value in config_keys.TRANSFORMERS_DEFAULTS.items():
        assert _listed(getattr(default, name)) == _listed(value), name


def test_attention_head_dim_is_read_although_transformers_keeps_its_default():
    # If transformers starts reading attention_head_dim, the docstring of config_keys is stale.
    assert NemotronHConfig.from_dict({"hybrid_override_pattern": "*",
                                      "attention_head_dim": 64}).head_dim == 128
    keys = config_keys.NemotronHConfigKeys({"hybrid_override_pattern": "*",
                                            "attention_head_dim": 64})
    assert keys.value("head_dim") == 64
    none = config_keys.NemotronHConfigKeys({"hybrid_override_pattern": "*"})
    assert none.value("head_dim") == 128  # transformers' default, not hidden / heads
    assert "transformers' default" in none.describe("head_dim")


@pytest.mark.parametrize("raw,pattern", [
    ({"layer_types": ["mamba", "attention"], "hybrid_override_pattern": "M*"}, "M*"),
    ({"layers_block_type": ["linear_attention", "mlp"], "layer_types": ["mamba", "mlp"]}, "M-"),
    ({"hybrid_override_pattern": "M*", "n_groups": 4, "mamba_n_groups": 4,
      "num_hidden_layers": 2}, "M*"),
    ({"hybrid_override_pattern": "*-", "time_step_limit": (0.0, math.inf),
      "mamba_dt_limit": [0.0, math.inf]}, "*-"),
])
def test_agreeing_spellings_are_accepted(raw, pattern):
    keys = config_keys.NemotronHConfigKeys(raw)
    assert keys.pattern == pattern
    assert NemotronHConfig.from_dict(dict(raw)).hybrid_override_pattern == pattern


@pytest.mark.parametrize("change,parts", [
    ({"mamba_n_groups": 4, "n_groups": 2}, ["mamba_n_groups=4", "n_groups=2"]),
    ({"mamba_d_conv": 3, "conv_kernel": 4}, ["mamba_d_conv=3", "conv_kernel=4"]),
    ({"mamba_chunk_size": 32, "chunk_size": 64}, ["mamba_chunk_size=32", "chunk_size=64"]),
    ({"mamba_conv_bias": True, "use_conv_bias": 1}, ["mamba_conv_bias=True", "use_conv_bias=1"]),
    ({"head_dim": 64, "attention_head_dim": 128}, ["head_dim=64", "attention_head_dim=128"]),
    ({"layers_block_type": ["mamba", "mlp"]},
     ["layers_block_type and hybrid_override_pattern", "layer 1: 'mlp' vs '*'"]),
    ({"layer_types": ["mamba", "attention", "mlp"]},
     ["layer_types and hybrid_override_pattern", "3 vs 2 layers"]),
    ({"num_hidden_layers": 3}, ["num_hidden_layers=3", "hybrid_override_pattern has 2 layers"]),
])
def test_disagreeing_spellings_are_refused_in_one_line(change, parts):
    raw = {"model_type": "nemotron_h", "hybrid_override_pattern": "M*", **change}
    with pytest.raises(mapping.ConversionError) as error:
        config_keys.model_config_from_hf(raw)
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


@pytest.mark.parametrize("change,part", [
    ({"mamba_conv_bias": False}, "use_conv_bias=False (from mamba_conv_bias=False)"),
    ({"mamba_chunk_size": 48}, "chunk_size=48 (from mamba_chunk_size=48): our SSD scan"),
    ({"layers_block_type": ["mamba", "sliding_attention"]},
     "layers_block_type[1]='sliding_attention': not a NemotronH layer kind"),
    ({"hybrid_override_pattern": "M*X"}, "hybrid_override_pattern[2]='X'"),
    ({"num_key_value_heads": None}, "num_key_value_heads=None: must be a positive integer"),
])
def test_values_our_model_cannot_take_are_refused_naming_the_key_used(change, part):
    raw = {"model_type": "nemotron_h", "hybrid_override_pattern": "M*", **change}
    with pytest.raises(mapping.ConversionError) as error:
        config_keys.model_config_from_hf(raw)
    assert part in str(error.value)
