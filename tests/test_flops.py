"""Model FLOPs of the hybrid stack (hand counts, scaling, the real model's matmuls), the device
peak table, and the TFLOP/s and MFU the metrics logger writes."""
import dataclasses
import json
import os

import pytest
import torch

from megatron_rlp.config import ModelConfig, config_from_dict, load_yaml
from megatron_rlp.training import metrics
from megatron_rlp.training.flops import (
    model_flops_per_sequence,
    peak_flops_for_device_name,
    peak_flops_per_device,
    training_flops_per_iteration,
)
from megatron_rlp.training.metrics import MetricsLogger

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_12B = os.path.join(REPO_ROOT, "examples", "nemotron_h_12b.yaml")


def model_config_from_yaml(path):
    values = load_yaml(path)
    return ModelConfig(**{f.name: values[f.name] for f in dataclasses.fields(ModelConfig)
                          if f.name in values})


# ------------------------------------------------------------------------------------------------
# Hand counts
# ------------------------------------------------------------------------------------------------


def test_nemotron_h_12b_forward_flops_match_a_hand_count():
    m = model_config_from_yaml(CONFIG_12B)
    assert (m.hybrid_override_pattern.count("M"), m.hybrid_override_pattern.count("*"),
            m.hybrid_override_pattern.count("-")) == (28, 6, 28)
    s = 8192
    # Mamba2: d_inner = 128 heads x 80 = 10240; in_proj rows z|x|B|C|dt = 10240+10240+1024+1024+128.
    in_proj = 2 * s * 5120 * 22656
    conv = 2 * s * 12288 * 4                           # x|B|C = 10240 + 2*8*128 channels, 4 taps
    # 64 chunks of 128: C B^T per group (8 x 128 state) and scores X per head (128 x 80),
    # each the causal half of a 128 x 128 block.
    ssd_intra = 64 * (8 * 128 * 128 * 128 + 128 * 80 * 128 * 128)
    # chunk states + state-to-output (2 x 2 s H P N), state passing (2 H P N per chunk).
    ssd_states = 2 * 2 * s * 128 * 80 * 128 + 64 * 2 * 128 * 80 * 128
    out_proj = 2 * s * 10240 * 5120
    # Attention: 40 query heads x 128 = 5120, 8 KV groups x 128 = 1024 each for K and V.
    qkv = 2 * s * 5120 * 5120 + 2 * s * 5120 * 2048
    scores = 2 * s * s * 5120 // 2 + 2 * s * s * 5120 // 2  # QK^T and AV, causal half each
    attn_out = 2 * s * 5120 * 5120
    mlp = 2 * s * 5120 * 20480 + 2 * s * 20480 * 5120
    logits = 2 * s * 5120 * 131072                    # 131072 is already a multiple of 128 x TP 8
    expected = {
        "mamba_in_proj": 28 * in_proj, "mamba_conv": 28 * conv,
        "mamba_ssd_intra_chunk": 28 * ssd_intra, "mamba_ssd_states": 28 * ssd_states,
        "mamba_out_proj": 28 * out_proj,
        "attention_qkv": 6 * qkv, "attention_scores": 6 * scores, "attention_out_proj": 6 * attn_out,
        "mlp": 28 * mlp, "logits": logits,
    }

    got = model_flops_per_sequence(m, s, 131072)

    assert got.components() == expected
    assert got.total == sum(expected.values()) == 196_337_316_397_056
    assert sum(got.shares().values()) == pytest.approx(1.0)


def test_nemotron_h_12b_total_is_within_half_a_percent_of_megatron_lm_hybrid_formula():
    """Megatron-LM's hybrid_flops: same projections, attention 4bshp(h + h g/a + s/2), scan
    approximated as 7 s d_in N, no conv term (written out here from its published convention)."""
    s, h, d_in = 8192, 5120, 10240
    attention = 4 * s * h * 1.0 * (h + h * 8 / 40 + s / 2)
    mlp = 4 * (20480 / h) * s * h ** 2
    mamba = 2 * s * h * (2 * d_in + 2 * 8 * 128 + 128) + 7 * s * d_in * 128 + 2 * s * d_in * h
    megatron = 6 * attention + 28 * mlp + 28 * mamba + 2 * s * h * 131072

    ours = model_flops_per_sequence(model_config_from_yaml(CONFIG_12B), s, 131072).total

    assert abs(ours / megatron - 1) < 5e-3


TINY = dict(num_layers=3, hybrid_override_pattern="M*-", hidden_size=8, ffn_hidden_size=16,
            num_attention_heads=2, num_query_groups=1, kv_channels=3, mamba_num_heads=2,
            mamba_head_dim=4, mamba_state_dim=5, mamba_num_groups=1, mamba_conv_kernel=3,
            mamba_chunk_size=4)


def test_tiny_model_with_a_partial_last_chunk_matches_a_hand_count():
    m = ModelConfig(**TINY)
    s, V = 10, 128  # chunks of 4, 4 and 2 tokens
    expected = {
        "mamba_in_proj": 2 * 10 * 8 * (8 + 8 + 5 + 5 + 2),   # z|x|B|C|dt with d_inner = 2*4
        "mamba_conv": 2 * 10 * (8 + 10) * 3,
        "mamba_ssd_intra_chunk": (1 * 5 + 2 * 4) * (16 + 16 + 4),
        "mamba_ssd_states": 4 * 10 * 2 * 4 * 5 + 2 * 3 * 2 * 4 * 5,
        "mamba_out_proj": 2 * 10 * 8 * 8,
        "attention_qkv": 2 * 10 * 8 * (2 * 3 + 2 * 1 * 3),   # kv_channels=3 overrides hidden/heads
        "attention_scores": 2 * 10 * 10 * 2 * 3,
        "attention_out_proj": 2 * 10 * 6 * 8,
        "mlp": 4 * 10 * 8 * 16,
        "logits": 2 * 10 * 8 * 128,
    }
    assert model_flops_per_sequence(m, s, V).components() == expected


def test_doubling_the_sequence_doubles_linear_terms_and_quadruples_attention_scores():
    m = model_config_from_yaml(CONFIG_12B)
    one = model_flops_per_sequence(m, 4096, 131072).components()
    two = model_flops_per_sequence(m, 8192, 131072).components()
    for name in ("mamba_in_proj", "mamba_conv", "mamba_out_proj", "attention_qkv",
                 "attention_out_proj", "mlp", "logits",
                 # fixed chunk length: twice the chunks, each costing the same
                 "mamba_ssd_intra_chunk", "mamba_ssd_states"):
        assert two[name] == 2 * one[name], name
    assert two["attention_scores"] == 4 * one["attention_scores"]


def test_intra_chunk_cost_grows_with_the_chunk_length_and_the_rest_does_not():
    small = ModelConfig(**{**TINY, "mamba_chunk_size": 4})
    large = ModelConfig(**{**TINY, "mamba_chunk_size": 8})
    a = model_flops_per_sequence(small, 64, 128).components()
    b = model_flops_per_sequence(large, 64, 128).components()
    assert b["mamba_ssd_intra_chunk"] == 2 * a["mamba_ssd_intra_chunk"]
    assert b["mamba_ssd_states"] < a["mamba_ssd_states"]  # fewer chunk boundaries to pass
    for name in ("mamba_in_proj", "mamba_conv", "attention_scores", "mlp", "logits"):
        assert a[name] == b[name]


def test_training_flops_are_three_forwards_of_the_global_batch_with_the_padded_vocab():
    cfg = config_from_dict(dict(TINY, seq_length=10, tensor_model_parallel_size=1,
                                make_vocab_size_divisible_by=128))
    forward = model_flops_per_sequence(cfg.model, 10, 128).total  # 100 -> 128
    assert training_flops_per_iteration(cfg, global_batch=6, vocab_size=100) == 3 * 6 * forward
    # An already padded size (a built model's vocab_size) gives the same count.
    assert training_flops_per_iteration(cfg, global_batch=6, vocab_size=128) == 3 * 6 * forward


def test_non_positive_sequence_or_vocab_is_rejected():
    with pytest.raises(ValueError, match="seq_length=0"):
        model_flops_per_sequence(ModelConfig(**TINY), 0, 128)


# ------------------------------------------------------------------------------------------------
# Against the real model: torch's FLOP counter on each module's matmuls
# ------------------------------------------------------------------------------------------------


def test_counts_match_torch_flop_counter_on_the_built_model():
    """Projections, conv, MLP and logits equal what the built model multiplies; the core attention
    (which computes the full s x s scores) does exactly twice our causal-half count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    cfg = config_from_dict(dict(num_layers=4, hybrid_override_pattern="M*-M", hidden_size=32,
                                ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                mamba_num_heads=4, mamba_head_dim=8, mamba_state_dim=8,
                                mamba_num_groups=2, mamba_chunk_size=8, seq_length=16))
    init_distributed(cfg.parallel, seed=3)
    try:
        model = build_model(cfg, vocab_size=100)
        # torch's math SDPA backend is plain matmuls the counter sees (its fused CPU kernel is not
        # in the counter's table); megatron's own local attention is plain matmuls anyway.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), \
                FlopCounterMode(display=False) as counter:
            model(torch.randint(0, 100, (1, 16)), None, None)
    finally:
        destroy_distributed()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}

    def measured(suffixes):
        return sum(v for k, v in counts.items() if k.endswith(suffixes))

    ours = model_flops_per_sequence(cfg.model, 16, 128).components()
    assert measured(("mixer.in_proj",)) == ours["mamba_in_proj"]
    assert measured(("mixer.out_proj",)) == ours["mamba_out_proj"]
    conv = sum(ops.get(torch.ops.aten.convolution, 0)
               for k, ops in counter.get_flop_counts().items() if k.endswith("mixer"))
    assert conv == ours["mamba_conv"]
    assert measured(("linear_qkv",)) == ours["attention_qkv"]
    assert measured(("linear_proj",)) == ours["attention_out_proj"]
    assert measured(("core_attention",)) == 2 * ours["attention_scores"]
    assert measured(("linear_fc1", "linear_fc2")) == ours["mlp"]
    assert measured(("output_layer",)) == ours["logits"]


# ------------------------------------------------------------------------------------------------
# Peak table
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "bf16", 835.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5),
    ("NVIDIA B200", "bf16", 2250.0),
    ("NVIDIA GB200", "bf16", 2500.0),
    ("NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA L4", "bf16", 121.0),
])
def test_peak_table_finds_datasheet_dense_numbers_by_device_name(name, precision, tflops):
    assert peak_flops_for_device_name(name, precision) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name,precision", [
    ("NVIDIA L40", "bf16"),        # not L4, not L40S
    ("Tesla V100-SXM2-32GB", "bf16"),
    ("NVIDIA B200", "fp32"),       # not on the datasheet
])
def test_unknown_devices_and_precisions_have_no_peak(name, precision):
    assert peak_flops_for_device_name(name, precision) is None


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision='fp8'"):
        peak_flops_for_device_name("NVIDIA H100", "fp8")


def test_cpu_has_no_peak():
    assert peak_flops_per_device("cpu") is None
    if not torch.cuda.is_available():
        assert peak_flops_per_device() is None


# ------------------------------------------------------------------------------------------------
# Metrics logger
# ------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def run_window(tmp_path, monkeypatch, iters=4, seconds=2.0, **kwargs):
    """One log window of `iters` ticks lasting `seconds`; returns (record, progress line)."""
    clock = FakeClock()
    monkeypatch.setattr(metrics, "time", clock)
    logger = MetricsLogger(str(tmp_path), total_iters=100, **kwargs)
    for _ in range(iters):
        logger.tick()
    clock.now += seconds
    logger.log({"iteration": iters, "loss": 1.0}, tokens_in_window=iters * 1000)
    logger.close()
    with open(tmp_path / "metrics.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    return record


def test_metrics_record_tflops_per_device_and_mfu(tmp_path, monkeypatch, capsys):
    # 4 iterations x 8e15 FLOPs in 2 s on 8 devices: 2e15 FLOP/s each; peak 4e15 -> MFU 0.5.
    record = run_window(tmp_path, monkeypatch, flops_per_iteration=8e15, num_devices=8,
                        peak_flops=4e15)
    assert record["tflops_per_device"] == pytest.approx(2000.0)
    assert record["mfu"] == pytest.approx(0.5)
    line = capsys.readouterr().out
    assert "throughput per GPU (TFLOP/s/GPU) 2000.0" in line
    assert "MFU 50.0%" in line


def test_mfu_is_omitted_when_the_peak_is_unknown(tmp_path, monkeypatch, capsys):
    record = run_window(tmp_path, monkeypatch, flops_per_iteration=1e12, num_devices=2)
    assert record["tflops_per_device"] == pytest.approx(1.0)  # 4e12 / 2 s / 2 devices
    assert "mfu" not in record
    assert "MFU" not in capsys.readouterr().out


def test_no_flop_keys_without_flops_per_iteration(tmp_path, monkeypatch):
    record = run_window(tmp_path, monkeypatch, peak_flops=1e15)
    assert "tflops_per_device" not in record and "mfu" not in record
    assert record["tokens_per_s"] == pytest.approx(2000.0)


def test_per_iteration_flops_given_to_tick_replace_the_constant(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics, "time", clock)
    logger = MetricsLogger(str(tmp_path), total_iters=10, flops_per_iteration=1e12)
    logger.tick(flops=3e12)
    logger.tick()
    clock.now += 1.0
    record = logger.log({"iteration": 2}, tokens_in_window=0)
    assert record["tflops_per_device"] == pytest.approx(4.0)
    # The next window starts from zero.
    logger.tick()
    clock.now += 1.0
    assert logger.log({"iteration": 3}, tokens_in_window=0)["tflops_per_device"] == pytest.approx(1.0)
    logger.close()


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_devices=0), "num_devices=0"),
    (dict(peak_flops=0.0), "peak_flops=0.0"),
    (dict(flops_per_iteration=-1.0), "flops_per_iteration=-1.0"),
])
def test_bad_throughput_arguments_are_rejected(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetricsLogger(str(tmp_path), total_iters=10, **kwargs)
