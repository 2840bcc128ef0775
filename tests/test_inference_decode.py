"""Cached decoding (KV cache + Mamba conv/SSM state) reproduces the full recompute, token for token
and logit for logit, on a hybrid pattern with all three layer kinds; sampling rules hold."""
import pytest
import torch

from megatron_rlp.inference.cache import HybridCache
from megatron_rlp.inference.decode import CachedDecoder, full_logits
from megatron_rlp.inference.generate import generate, generate_uncached
from megatron_rlp.inference.sampling import sample_next

VOCAB = 200


@pytest.fixture(scope="module")
def model():
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    cfg = config_from_dict(dict(
        num_layers=5, hybrid_override_pattern="M*-M*", hidden_size=64, ffn_hidden_size=128,
        num_attention_heads=4, num_query_groups=2, mamba_num_heads=4, mamba_head_dim=16,
        mamba_state_dim=16, mamba_num_groups=2, mamba_chunk_size=8, seq_length=64,
        init_method_std=0.15, seed=7))
    init_distributed(cfg.parallel, cfg.training.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CPU
    try:
        yield build_model(cfg, VOCAB).eval()
    finally:
        torch.set_num_threads(threads)
        destroy_distributed()  # later in-process tests may start their own process group


PROMPTS = [[5, 17, 33, 2, 99, 150, 7, 8, 9, 10, 11],  # lengths straddle the scan chunk (8)
           [42, 43],
           [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


def test_cached_greedy_matches_full_recompute_tokens_and_logits(model):
    decoder = CachedDecoder(model, VOCAB)
    assert decoder.kinds == ["mamba", "attention", "mlp", "mamba", "attention"]
    cached = generate(decoder, PROMPTS, max_new_tokens=24, temperature=0.0, keep_logits=True)
    recomputed = generate_uncached(model, VOCAB, PROMPTS, max_new_tokens=24, temperature=0.0,
                                   keep_logits=True)
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert len(set(cached.tokens[0].tolist())) > 3  # not a degenerate repeat of one token
    for a, b in zip(cached.step_logits, recomputed.step_logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_prefill_all_logits_equal_model_forward(model):
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    logits, cache = CachedDecoder(model, VOCAB).prefill(ids, all_logits=True)
    torch.testing.assert_close(logits, full_logits(model, ids, VOCAB), atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [11, 11] and cache.capacity == 11


def test_prefix_state_copied_to_samples_matches_separate_prefill(model):
    """Rows r*G..r*G+G-1 continue prompt r from one prefill; decoding the same token on each copy
    gives the same logits as a fresh prefill of prompt + token."""
    decoder = CachedDecoder(model, VOCAB)
    caches = [decoder.prefill(torch.tensor([p]), capacity=len(p) + 2)[1] for p in PROMPTS]
    cache = HybridCache.concat(caches).repeat_rows(3)
    tokens = torch.tensor([61] * 9)
    logits = decoder.step(tokens, cache)
    for r in range(9):
        expected = full_logits(model, torch.tensor([PROMPTS[r // 3] + [61]]), VOCAB)[0, -1]
        torch.testing.assert_close(logits[r], expected, atol=2e-5, rtol=1e-5)


def test_rows_stop_independently_and_sampling_is_seeded(model):
    decoder = CachedDecoder(model, VOCAB)
    kwargs = dict(max_new_tokens=16, num_samples=4, temperature=1.0, stop_ids=list(range(0, 200, 3)))
    a = generate(decoder, PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs)
    b = generate(decoder, PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs)
    c = generate(decoder, PROMPTS, generator=torch.Generator().manual_seed(4), **kwargs)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert a.stopped.any() and len(set(a.lengths.tolist())) > 1
    for row in range(12):
        n = int(a.lengths[row])
        assert bool(a.stopped[row]) == (a.tokens[row, n - 1].item() % 3 == 0)
        assert (a.tokens[row, n:] == 0).all() and (a.logprobs[row, n:] == 0).all()
    # The same seed through the uncached path samples the same tokens (same logits to fp32 noise).
    u = generate_uncached(model, VOCAB, PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a.tokens, u.tokens)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    tok, lp = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(tok.tolist()) == {0, 1}
    torch.testing.assert_close(lp[tok == 1], torch.full_like(lp[tok == 1], float(torch.log(torch.tensor(0.3)))))
    tok, _ = sample_next(logits, 1.0, top_p=0.8, generator=g)
    assert set(tok.tolist()) == {0, 1}            # 0.5 + 0.3 reaches 0.8: token 2 is cut
    tok, _ = sample_next(logits, 1.0, top_p=0.81, generator=g)
    assert set(tok.tolist()) == {0, 1, 2}
    tok, _ = sample_next(logits, 0.0)
    assert (tok == 0).all()
    frac = (sample_next(logits, 1.0, generator=g)[0] == 0).float().mean()
    assert abs(float(frac) - 0.5) < 0.05
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)


def test_bf16_model_keeps_fp32_ssm_state_in_the_cache(model):
    """Torch path, bf16 weights and activations: the SSM state in the cache is fp32 after prefill
    and after every step (a step handed a bf16 state returns fp32 too: the recurrence is never
    rounded to bf16), the conv state holds raw bf16 inputs, and cached decoding tracks the full
    forward to bf16 precision. (`model` only provides the process group.)"""
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.models.hybrid import build_model

    cfg = config_from_dict(dict(
        num_layers=5, hybrid_override_pattern="M*-M*", hidden_size=64, ffn_hidden_size=128,
        num_attention_heads=4, num_query_groups=2, mamba_num_heads=4, mamba_head_dim=16,
        mamba_state_dim=16, mamba_num_groups=2, mamba_chunk_size=8, seq_length=64,
        init_method_std=0.15, seed=7, bf16=True))
    bf16_model = build_model(cfg, VOCAB).eval()
    assert next(bf16_model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([PROMPTS[0] + [61, 7, 99, 3, 150, 42]])
    decoder = CachedDecoder(bf16_model, VOCAB)
    prompt = len(PROMPTS[0])
    logits, cache = decoder.prefill(ids[:, :prompt], capacity=ids.shape[1])
    full = full_logits(bf16_model, ids, VOCAB)
    scale = full.abs().max()
    assert sorted(cache.mamba) == [0, 3]
    for t in range(prompt, ids.shape[1] + 1):
        for conv, ssm in cache.mamba.values():
            assert ssm.dtype == torch.float32 and conv.dtype == torch.bfloat16
        got = logits[:, -1]
        assert (got - full[:, t - 1]).abs().max() < 3e-2 * scale  # bf16: ~2^-8 per op
        if t < ids.shape[1]:
            logits = decoder.step(ids[:, t], cache)[:, None]

    mixer = bf16_model.decoder.layers[0].mixer
    conv, ssm = cache.mamba[0]
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    _, _, from_bf16 = mixer.step(x, conv, ssm.to(torch.bfloat16))
    assert from_bf16.dtype == torch.float32
