"""The hybrid model has the Nemotron-H shape the pattern asks for."""
import pytest
import torch

from megatron_rlp.config import config_from_dict
from megatron_rlp.models.norm import RMSNorm


@pytest.fixture(scope="module")
def model():
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import init_distributed

    cfg = config_from_dict(dict(num_layers=4, hybrid_override_pattern="M*-M", hidden_size=32,
                                ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                mamba_num_heads=4, mamba_head_dim=8, mamba_state_dim=8,
                                mamba_num_groups=2, mamba_chunk_size=8, seq_length=16))
    from megatron_rlp.training.distributed import destroy_distributed

    init_distributed(cfg.parallel, seed=3)
    yield build_model(cfg, vocab_size=100)
    destroy_distributed()


def test_layers_follow_the_pattern(model):
    kinds = [type(layer).__name__ for layer in model.decoder.layers]
    assert kinds == ["MambaLayer", "TransformerLayer", "MLPLayer", "MambaLayer"]
    assert type(model.decoder.layers[0].mixer).__name__ == "Mamba2Mixer"


def test_no_biases_untied_output_and_padded_vocab(model):
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if n.endswith(".bias") and "conv1d" not in n]
    assert model.output_layer.weight.data_ptr() != model.embedding.word_embeddings.weight.data_ptr()
    assert model.output_layer.weight.shape[0] == 128  # 100 padded to a multiple of 128


def test_gqa_qkv_width(model):
    attention = model.decoder.layers[1].self_attention
    head_dim = 32 // 4
    assert attention.linear_qkv.weight.shape == ((4 + 2 * 2) * head_dim, 32)


def test_forward_shapes_and_causality(model):
    ids = torch.randint(0, 100, (2, 16))
    logits = model(ids, None, None)
    assert logits.shape == (2, 16, 128)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 100
    # Causal: positions before the change must not move.
    torch.testing.assert_close(model(changed, None, None)[:, :10], logits[:, :10])


def test_rmsnorm_matches_formula():
    class Cfg:
        params_dtype = torch.float32
        sequence_parallel = True

    norm = RMSNorm(Cfg(), 8, eps=1e-5)
    norm.weight.data = torch.arange(1.0, 9.0)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm.weight.sequence_parallel is True  # SP grads get all-reduced over TP
