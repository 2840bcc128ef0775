"""Config tree: Megatron flag names, YAML + flag precedence, and one clear error per bad input."""
import pytest

from megatron_rlp.config import ModelConfig, RunConfig, config_from_dict, parse_args

BAD_MODEL_INPUTS = [
    ({"hybrid_override_pattern": "M*X-", "num_layers": 4}, "unknown layer symbol"),
    ({"hybrid_override_pattern": "M*M-", "num_layers": 6}, "has 4 layers but --num-layers is 6"),
    ({"num_attention_heads": 6, "num_query_groups": 4}, "must divide --num-attention-heads=6"),
    ({"mamba_num_heads": 6, "mamba_num_groups": 4}, "must divide --mamba-num-heads=6"),
    ({"mamba_chunk_size": 48}, "must be a power of two"),
    ({"hidden_size": 0}, "--hidden-size=0: must be positive"),
]


@pytest.mark.parametrize("overrides,message", BAD_MODEL_INPUTS)
def test_bad_model_config_is_rejected_with_named_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("+", r"\+")):
        ModelConfig(**overrides)


def test_tensor_parallel_must_divide_mamba_heads_and_groups():
    with pytest.raises(ValueError, match="mamba-num-groups=2: must be divisible by "
                                         "--tensor-model-parallel-size=4"):
        config_from_dict({"tensor_model_parallel_size": 4, "mamba_num_heads": 8,
                          "num_query_groups": 4})


def test_pipeline_stages_must_cover_all_layers():
    with pytest.raises(ValueError, match="must divide --num-layers=6"):
        config_from_dict({"pipeline_model_parallel_size": 4})


def test_unknown_yaml_key_is_rejected():
    with pytest.raises(ValueError, match="unknown config key 'hiden_size'"):
        config_from_dict({"hiden_size": 8})


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("hidden_size: 96\nlr: 0.01\ntrain_iters: 7\n")
    cfg = parse_args(["--config", str(path), "--lr", "0.02"])
    assert cfg.model.hidden_size == 96
    assert cfg.optimizer.lr == 0.02
    assert cfg.training.train_iters == 7
    assert cfg.training.micro_batch_size == RunConfig().training.micro_batch_size


def test_megatron_flag_names_parse_into_sections():
    cfg = parse_args(["--num-layers", "2", "--hybrid-override-pattern", "M-", "--bf16",
                      "--data-path", "0.3", "a", "0.7", "b", "--lr-decay-style", "WSD"])
    assert cfg.model.layer_kinds == ["mamba", "mlp"]
    assert cfg.training.bf16 is True
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]
    assert cfg.optimizer.lr_decay_style == "WSD"


def test_unknown_flag_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--hidden-sise", "8"])
    assert exit_info.value.code != 0
    assert "unrecognized arguments: --hidden-sise" in capsys.readouterr().err


def test_global_batch_defaults_to_one_micro_batch_per_rank_and_must_split_evenly():
    cfg = config_from_dict({"micro_batch_size": 4})
    assert cfg.training.global_batch(2) == 8
    assert config_from_dict({"micro_batch_size": 4, "global_batch_size": 24}).training \
        .global_batch(3) == 24
    with pytest.raises(ValueError, match="--global-batch-size=20 is not a multiple of "
                                         "--micro-batch-size x data-parallel size = 4 x 2"):
        config_from_dict({"micro_batch_size": 4, "global_batch_size": 20}).training.global_batch(2)


def test_negative_megatron_switches_parse_true_from_the_command_line():
    from megatron_rlp.config import parse_args

    cfg = parse_args(["--no-load-optim", "--no-load-rng"])
    assert cfg.checkpoint.no_load_optim is True and cfg.checkpoint.no_load_rng is True
    default = parse_args([])
    assert default.checkpoint.no_load_optim is False and default.checkpoint.no_load_rng is False


def test_overlap_grad_reduce_is_auto_unless_given():
    from megatron_rlp.config import parse_args

    assert parse_args([]).parallel.overlap_grad_reduce is None  # on with CUDA, off on CPU
    assert parse_args(["--overlap-grad-reduce"]).parallel.overlap_grad_reduce is True
    assert parse_args(["--no-overlap-grad-reduce"]).parallel.overlap_grad_reduce is False
