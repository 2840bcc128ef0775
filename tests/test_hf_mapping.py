"""Pure pieces of the HF NemotronH conversion: qkv layout, config translation, file safety,
the streaming safetensors writer. No megatron, no model."""
import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_rlp.config import ModelConfig
from megatron_rlp.hf import config_keys, mapping
from megatron_rlp.hf.export import parse_size
from megatron_rlp.hf.safetensors_stream import StreamingSafetensorsWriter


def test_qkv_split_reads_megatron_per_group_interleave():
    heads, groups, d, hidden = 4, 2, 3, 5
    # Row r of the fused weight is filled with r, so each output names the rows it took.
    fused = torch.arange((heads + 2 * groups) * d, dtype=torch.float32)[:, None].repeat(1, hidden)
    q, k, v = mapping.split_qkv(fused, heads, groups, d)
    per_group = (heads // groups + 2) * d  # rows of one group: q q k v (each d rows)
    expect_q = [g * per_group + r for g in range(groups) for r in range(2 * d)]
    expect_k = [g * per_group + 2 * d + r for g in range(groups) for r in range(d)]
    expect_v = [g * per_group + 3 * d + r for g in range(groups) for r in range(d)]
    assert q[:, 0].tolist() == expect_q
    assert k[:, 0].tolist() == expect_k
    assert v[:, 0].tolist() == expect_v
    assert torch.equal(mapping.merge_qkv(q, k, v, heads, groups, d), fused)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 1)])
def test_qkv_merge_inverts_split(heads, groups):
    fused = torch.randn((heads + 2 * groups) * 8, 16)
    assert torch.equal(mapping.merge_qkv(*mapping.split_qkv(fused, heads, groups, 8), heads, groups, 8),
                       fused)


def test_hf_config_round_trips_through_model_config():
    m = ModelConfig(num_layers=4, hybrid_override_pattern="M*M-", hidden_size=64,
                    ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=32,
                    mamba_num_heads=8, mamba_head_dim=16, mamba_state_dim=8, mamba_num_groups=4,
                    mamba_chunk_size=16)
    hf = mapping.hf_config(m, vocab_size=512, max_position_embeddings=64, dtype="float32",
                           eos_token_id=0, pad_token_id=1)
    assert hf["layers_block_type"] == ["linear_attention", "full_attention", "linear_attention", "mlp"]
    assert hf["time_step_min"] > 0  # HF's default ships; parity loads override it
    json.dumps(hf, allow_nan=False)  # valid JSON: no Infinity
    back = config_keys.model_config_from_hf(hf)
    for key, value in back.items():
        assert getattr(m, key) == value, key


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"layers_block_type": ["linear_attention", "moe"]}, r"layers_block_type\[1\]='moe'"),
    ({"mlp_hidden_act": "silu"}, "mlp_hidden_act='silu'"),
    ({"use_bias": True}, "use_bias=True"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"num_nextn_predict_layers": 1}, "num_nextn_predict_layers=1"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
    ({"n_groups": 3}, "n_groups=3"),
])
def test_hf_config_our_model_cannot_express_is_rejected(change, message):
    hf = {"model_type": "nemotron_h", "layers_block_type": ["linear_attention", "mlp"],
          "hidden_size": 64, "mamba_num_heads": 8, "n_groups": 2, **change}
    with pytest.raises(mapping.ConversionError, match=message):
        config_keys.model_config_from_hf(hf)


def test_export_refuses_norm_eps_hf_cannot_express_with_mamba_layers():
    m = ModelConfig(num_layers=2, hybrid_override_pattern="M-", norm_epsilon=1e-6)
    with pytest.raises(mapping.ConversionError, match="norm_epsilon=1e-06"):
        mapping.hf_config(m, vocab_size=128, max_position_embeddings=8, dtype="float32",
                          eos_token_id=0, pad_token_id=0)


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/../../b", "", "a//b"])
def test_paths_escaping_the_directory_are_refused(tmp_path, name):
    with pytest.raises(mapping.ConversionError, match="refusing"):
        mapping.check_safe_filename(str(tmp_path), name)


def test_symlink_escaping_the_directory_is_refused(tmp_path):
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(mapping.ConversionError, match="outside"):
        mapping.check_safe_filename(str(tmp_path / "inside"), "link.safetensors")


def test_check_keys_names_unknown_missing_and_misshaped_tensors():
    d = mapping.Dims("-", 8, 16, 2, 2, 4, 2, 4, 1, 4, 4, 32)
    units = mapping.model_units(d)
    good = {n: s for u in units for g in u for n, s in zip(g.hf, g.hf_shapes)}
    mapping.check_keys(good, units, "hf")
    with pytest.raises(mapping.ConversionError, match="unknown tensor 'backbone.layers.0.mixer.gate'"):
        mapping.check_keys({**good, "backbone.layers.0.mixer.gate": (1,)}, units, "hf")
    missing = dict(good)
    del missing["lm_head.weight"]
    with pytest.raises(mapping.ConversionError, match="'lm_head.weight' is missing"):
        mapping.check_keys(missing, units, "hf")
    with pytest.raises(mapping.ConversionError, match=r"'backbone.layers.0.mixer.up_proj.weight' has shape \(15, 8\)"):
        mapping.check_keys({**good, "backbone.layers.0.mixer.up_proj.weight": (15, 8)}, units, "hf")


def test_mamba_in_proj_is_concatenated_per_component_in_z_x_b_c_dt_order():
    d = mapping.Dims("M", 4, 8, 2, 2, 2, 2, 2, 1, 3, 4, 16)
    g = mapping.layer_groups(0, "M", d)[1]
    assert [n.rsplit(".", 1)[1] for n in g.ours] == ["z", "x", "B", "C", "dt"]
    parts = [torch.full(s, float(i)) for i, s in enumerate(g.our_shapes)]
    (fused,) = g.to_hf(parts)
    assert fused[:, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 3 + [3] * 3 + [4] * 2
    assert all(torch.equal(a, b) for a, b in zip(g.to_ours([fused]), parts))


def test_streaming_writer_output_is_read_back_by_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.zeros(0, 4)}
    path = str(tmp_path / "x.safetensors")
    w = StreamingSafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(path)
    assert set(back) == set(tensors)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_streaming_writer_rejects_a_tensor_that_does_not_match_its_header(tmp_path):
    w = StreamingSafetensorsWriter(str(tmp_path / "x.safetensors"), [("a", torch.float32, (2,))])
    with pytest.raises(ValueError, match="expected a torch.float32 \\(2,\\)"):
        w.write("a", torch.zeros(3))


@pytest.mark.parametrize("text,value", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30),
                                        ("1234", 1234), (77, 77)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_shard_plan_starts_a_new_shard_when_the_next_tensor_would_overflow():
    assert mapping.shard_plan([("a", 6), ("b", 5), ("c", 4), ("d", 20), ("e", 1)], 10) == [0, 1, 1, 2, 3]
