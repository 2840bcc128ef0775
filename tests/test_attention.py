"""SDPACoreAttention (torch fused SDPA) is a drop-in for megatron's local DotProductAttention:
same outputs and gradients for MHA and GQA in fp32 and bf16, same per-rank heads under TP, same
(empty) state dict, the same whole-model loss; bad requests fail with one ValueError each."""
import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rlp.models import attention as attention_module
from megatron_rlp.models.attention import SDPACoreAttention, causal_sdpa

SEQ, BATCH, HEAD_DIM = 12, 2, 8
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron's parallel state for one process (DotProductAttention takes its TP group and
    scratch buffer from it)."""
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    init_distributed(config_from_dict({}).parallel, seed=5)
    yield
    destroy_distributed()


def make_config(heads=4, groups=4, dtype=torch.float32, **overrides):
    fields = dict(num_layers=2, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                  num_query_groups=groups, kv_channels=HEAD_DIM, attention_dropout=0.0,
                  hidden_dropout=0.0, masked_softmax_fusion=False, params_dtype=dtype,
                  bf16=dtype == torch.bfloat16, use_cpu_initialization=True)
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_pair(config, layer_number=1, pg_collection=None, softmax_scale=None):
    kwargs = dict(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal,
                  attention_type="self", softmax_scale=softmax_scale, pg_collection=pg_collection)
    return DotProductAttention(**kwargs), SDPACoreAttention(**kwargs)


def qkv(heads, groups, sq=SEQ, sk=SEQ, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, BATCH, heads, HEAD_DIM, generator=g).to(dtype).requires_grad_()
    k = torch.randn(sk, BATCH, groups, HEAD_DIM, generator=g).to(dtype).requires_grad_()
    v = torch.randn(sk, BATCH, groups, HEAD_DIM, generator=g).to(dtype).requires_grad_()
    return q, k, v


def forward_and_grads(module, q, k, v, mask=None, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask, **kwargs)
    # A fixed random cotangent: a plain sum would hide errors that cancel across positions.
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    (out.float() * cotangent.float()).sum().backward()
    return out, (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("native_gqa", [False, True], ids=["expanded_kv", "enable_gqa"])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 2), (4, 1)],
                         ids=["mha", "gqa2", "gqa3", "mqa"])
def test_fp32_output_and_qkv_grads_match_megatron(heads, groups, native_gqa, monkeypatch):
    """Both ways of sharing KV heads (expanding K/V, SDPA's enable_gqa) give megatron's
    head mapping: query head i reads KV head i // (heads / groups)."""
    monkeypatch.setattr(attention_module, "_native_gqa", lambda q: native_gqa)
    reference, candidate = build_pair(make_config(heads, groups))
    q, k, v = qkv(heads, groups)
    expected, expected_grads = forward_and_grads(reference, q, k, v)
    out, grads = forward_and_grads(candidate, q, k, v)
    assert out.shape == (SEQ, BATCH, heads * HEAD_DIM)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gqa_head_mapping_is_consecutive_query_heads_per_group():
    """Pin the mapping itself: zeroing KV group 1 changes exactly query heads 2 and 3 (of 4)."""
    _, module = build_pair(make_config(4, 2))
    q, k, v = (t.detach() for t in qkv(4, 2))
    base = module(q, k, v, None).reshape(SEQ, BATCH, 4, HEAD_DIM)
    v2 = v.clone()
    v2[:, :, 1] = 0
    changed = module(q, k, v2, None).reshape(SEQ, BATCH, 4, HEAD_DIM)
    moved = [(changed[:, :, h] - base[:, :, h]).abs().max().item() > 0 for h in range(4)]
    assert moved == [False, False, True, True]


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_bf16_output_and_grads_match_megatron_within_bf16_tolerance(heads, groups):
    reference, candidate = build_pair(make_config(heads, groups, dtype=torch.bfloat16))
    q, k, v = qkv(heads, groups, dtype=torch.bfloat16)
    expected, expected_grads = forward_and_grads(reference, q, k, v)
    out, grads = forward_and_grads(candidate, q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, **BF16_TOL)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, **BF16_TOL)


@pytest.mark.parametrize("case", ["given_scale", "layer_scaling"])
def test_softmax_scale_follows_megatron(case):
    """An explicit softmax_scale (config.softmax_scale via SelfAttention) is used as is; query-key
    layer scaling divides then multiplies back by the layer number, i.e. changes nothing."""
    if case == "given_scale":
        config, scale, layer = make_config(4, 2), 0.05, 1
    else:
        config, scale, layer = make_config(4, 2, apply_query_key_layer_scaling=True), None, 3
    reference, candidate = build_pair(config, layer_number=layer, softmax_scale=scale)
    assert candidate.softmax_scale == pytest.approx(scale or 1 / math.sqrt(HEAD_DIM))
    q, k, v = qkv(4, 2)
    expected, _ = forward_and_grads(reference, q, k, v)
    out, _ = forward_and_grads(candidate, q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_tensor_parallel_rank_holds_heads_over_tp_and_matches_megatron():
    """With a TP group of 2 each rank holds 4/2 query heads and 2/2 KV heads, as megatron
    computes them; the per-rank computation equals megatron's on the same shard."""
    tp2 = SimpleNamespace(tp=SimpleNamespace(size=lambda: 2, rank=lambda: 0))
    reference, candidate = build_pair(make_config(4, 2), pg_collection=tp2)
    assert (candidate.num_attention_heads_per_partition, candidate.num_query_groups_per_partition,
            candidate.hidden_size_per_partition) == (2, 1, 2 * HEAD_DIM)
    assert candidate.num_attention_heads_per_partition == reference.num_attention_heads_per_partition
    assert candidate.num_query_groups_per_partition == reference.num_query_groups_per_partition
    q, k, v = qkv(2, 1)
    expected, _ = forward_and_grads(reference, q, k, v)
    out, _ = forward_and_grads(candidate, q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_explicit_causal_mask_is_accepted_and_changes_nothing():
    reference, candidate = build_pair(make_config(4, 2))
    q, k, v = (t.detach() for t in qkv(4, 2))
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None].expand(BATCH, 1, -1, -1)
    torch.testing.assert_close(candidate(q, k, v, mask), candidate(q, k, v, None))
    torch.testing.assert_close(candidate(q, k, v, mask), reference(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)


def test_one_query_over_a_kv_cache_attends_to_every_key():
    """A decoding step (sq = 1, megatron passes no_mask) equals the last row of full attention."""
    _, module = build_pair(make_config(4, 2))
    q, k, v = (t.detach() for t in qkv(4, 2))
    full = module(q, k, v, None)
    for mask_type in (None, AttnMaskType.no_mask):
        step = module(q[-1:], k, v, None, attn_mask_type=mask_type)
        torch.testing.assert_close(step, full[-1:], atol=1e-6, rtol=1e-6)


def test_no_parameters_and_same_state_dict_as_dot_product_attention():
    reference, candidate = build_pair(make_config(4, 2))
    assert list(candidate.parameters()) == [] and list(candidate.buffers()) == []
    assert candidate.state_dict().keys() == reference.state_dict().keys() == set()
    metadata = {"dp_cp_group": None}
    assert candidate.sharded_state_dict("x.", metadata=metadata) == {}
    assert reference.sharded_state_dict("x.", metadata=metadata) == {}


def test_causal_sdpa_never_calls_the_math_backend_on_cpu_fp32():
    """The fused CPU kernel accepts our inputs (expanded KV, is_causal): no [s, s] fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(BATCH, 4, SEQ, HEAD_DIM)
    k, v = torch.randn(2, BATCH, 2, SEQ, HEAD_DIM)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if the flash kernel cannot run
        out = causal_sdpa(q, k, v, 0.3, native_gqa=False)
    torch.testing.assert_close(out, causal_sdpa(q, k, v, 0.3, native_gqa=True))


# ---------------------------------------------------------------------- whole model


def _tiny_cfg():
    from megatron_rlp.config import config_from_dict

    return config_from_dict(dict(
        num_layers=4, hybrid_override_pattern="M*-*", hidden_size=32, ffn_hidden_size=64,
        num_attention_heads=4, num_query_groups=2, mamba_num_heads=4, mamba_head_dim=8,
        mamba_state_dim=8, mamba_num_groups=2, mamba_chunk_size=8, seq_length=16,
        init_method_std=0.1, seed=11))


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids, None, None)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiny_model_loss_and_grads_unchanged_from_dot_product_attention():
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.models.spec import hybrid_stack_spec

    cfg = _tiny_cfg()
    new = build_model(cfg, vocab_size=100)
    old_spec = hybrid_stack_spec()
    old_spec.submodules.attention_layer.submodules.self_attention.submodules.core_attention = \
        DotProductAttention
    old = build_model(cfg, vocab_size=100, stack_spec=old_spec)
    for i in (1, 3):  # the two `*` layers of "M*-*"
        assert isinstance(new.decoder.layers[i].self_attention.core_attention, SDPACoreAttention)
        assert isinstance(old.decoder.layers[i].self_attention.core_attention, DotProductAttention)
    # Checkpoint compatible: identical keys (state_dict and the distributed-checkpoint view).
    assert new.state_dict().keys() == old.state_dict().keys()
    assert new.sharded_state_dict().keys() == old.sharded_state_dict().keys()
    old.load_state_dict(new.state_dict())  # same weights whatever the builder drew

    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(2))
    loss_new, grads_new = _loss_and_grads(new, ids)
    loss_old, grads_old = _loss_and_grads(old, ids)
    assert abs(loss_new.item() - loss_old.item()) < 1e-5
    for name, grad in grads_new.items():
        torch.testing.assert_close(grad, grads_old[name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("overrides,kwargs,match", [
    ({"attention_dropout": 0.1}, {}, r"attention_dropout=0\.1.*--attention-dropout 0"),
    ({}, {"attention_dropout": 0.2}, r"attention_dropout=0\.2"),
    ({}, {"attn_mask_type": AttnMaskType.padding}, r"attn_mask_type=AttnMaskType\.padding"),
    ({"window_size": (4, 0)}, {}, r"window_size=\(4, 0\).*sliding-window"),
    ({"softmax_type": "off-by-one"}, {}, r"softmax_type='off-by-one'"),
    ({"qk_clip": True}, {}, r"qk_clip"),
], ids=["config_dropout", "arg_dropout", "padding_mask_type", "window", "softmax_offset", "qk_clip"])
def test_unsupported_configurations_are_rejected(overrides, kwargs, match):
    config = make_config(4, 2, **overrides)
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                attention_type="self")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SDPACoreAttention(**args)


def test_context_parallelism_is_rejected():
    config = make_config(4, 2)
    config.context_parallel_size = 2  # set after construction: TransformerConfig checks CP too
    with pytest.raises(ValueError, match=r"context_parallel_size=2"):
        SDPACoreAttention(config, 1, AttnMaskType.causal, "self")


def _padding_mask():
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None].repeat(BATCH, 1, 1, 1)
    mask[1, :, :, :3] = True  # row 1: the first 3 keys are padding
    return mask


@pytest.mark.parametrize("call,match", [
    (lambda m, q, k, v: m(q, k, v, None, packed_seq_params=object()), r"packed_seq_params"),
    (lambda m, q, k, v: m(q, k, v, None, attention_bias=torch.zeros(1)), r"attention_bias"),
    (lambda m, q, k, v: m(q, k, v, _padding_mask()), r"not the causal mask"),
    (lambda m, q, k, v: m(q, k, v, torch.zeros(1, 1, SEQ, SEQ)), r"dtype torch\.float32"),
    (lambda m, q, k, v: m(q, k, v, torch.zeros(1, 1, SEQ, 3, dtype=torch.bool)), r"broadcast"),
    (lambda m, q, k, v: m(q, k, v, None, attn_mask_type=AttnMaskType.no_mask),
     r"no_mask with 12 queries.*causal attention only"),
    (lambda m, q, k, v: m(q[:5], k, v, None), r"5 queries over 12 keys.*sq == sk"),
    (lambda m, q, k, v: m(q, k[:, :, :1].expand(-1, -1, 4, -1), v, None), r"do not match"),
], ids=["packed", "bias", "padding_mask", "float_mask", "mask_shape", "bidirectional",
        "chunked_prefill", "kv_heads"])
def test_bad_forward_inputs_are_rejected(call, match):
    _, module = build_pair(make_config(4, 2))
    q, k, v = (t.detach() for t in qkv(4, 2))
    with pytest.raises(ValueError, match=match):
        call(module, q, k, v)


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (fused SDPA kernels)")
@pytest.mark.parametrize("heads,groups", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_cuda_bf16_runs_on_fused_kernels_and_matches_megatron(heads, groups):
    """On a GPU, forward and backward run with the math backend disabled (so no [s, s] scores
    are built) and agree with megatron's unfused module within bf16 tolerance."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = make_config(heads, groups, dtype=torch.bfloat16)
    reference, candidate = build_pair(config)
    q, k, v = (t.detach().cuda() for t in qkv(heads, groups, sq=256, sk=256, dtype=torch.bfloat16))
    expected, expected_grads = forward_and_grads(reference, q, k, v)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):
        out, grads = forward_and_grads(candidate, q, k, v)
    torch.testing.assert_close(out, expected, **BF16_TOL)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **BF16_TOL)
