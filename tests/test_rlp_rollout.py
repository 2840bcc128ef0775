"""Rollout layout on a real hybrid model: rows are prompt | thought | </think> | target, thought
label positions hold exactly the sampled tokens, the cached sampler's log-probs agree with the
training forward's, draws are seeded by (seed, global sample index), and the RLP stage runs end to
end from a pretrained checkpoint through the CLI."""
import os

import pytest
import torch

from conftest import read_metrics, run_cli


@pytest.fixture(scope="module")
def setup():
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.inference.decode import CachedDecoder
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.config import RLPConfig
    from megatron_rlp.training.distributed import init_distributed

    tok = build_tokenizer()
    cfg = config_from_dict(dict(
        num_layers=4, hybrid_override_pattern="M*M-", hidden_size=64, ffn_hidden_size=128,
        num_attention_heads=4, num_query_groups=2, mamba_num_heads=4, mamba_head_dim=16,
        mamba_state_dim=16, mamba_num_groups=2, mamba_chunk_size=16, seq_length=48,
        init_method_std=0.1, seed=3))
    init_distributed(cfg.parallel, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_model(cfg, tok.vocab_size).eval()
    rcfg = RLPConfig(rlp_num_thoughts=3, rlp_thought_length=6, rlp_min_prefix=8,
                     rlp_prompt_template="Q: {context}")
    text = tok.encode("12+7=19. 3*4=12. the cat sat on the mat and 5+5=10; " * 3)
    data = {"tokens": torch.tensor([text[:48], text[10:58]]),
            "labels": torch.tensor([text[1:49], text[11:59]]),
            "loss_mask": torch.ones(2, 48)}
    yield tok, model, CachedDecoder(model, tok.vocab_size), rcfg, data
    torch.set_num_threads(threads)


def _rollout(setup, first_sample=0, **over):
    from megatron_rlp.rlp.rollout import make_rollout, split_template

    tok, model, decoder, rcfg, data = setup
    for k, v in over.items():
        setattr(rcfg, k, v)
    pre, post = split_template(rcfg.rlp_prompt_template, tok)
    return make_rollout(decoder, model, tok, data, rcfg, seed=5, first_sample=first_sample,
                        pre=pre, post=post)


def test_rows_hold_prompt_thought_close_and_target(setup):
    tok = setup[0]
    out = _rollout(setup)
    g = out.num_thoughts
    pre = tok.encode("Q: ")
    assert out.tokens.shape[0] == 2 * g
    for r in range(2 * g):
        row = out.tokens[r].tolist()
        assert row[: len(pre)] == pre
        pos = out.thought_mask[r].nonzero()[:, 0]
        assert len(pos) == int(out.thought_len[r]) and row[int(pos[0])] == tok.think_start
        t = int(out.target_pos[r])
        assert row[t] == tok.think_end and row[t + 1] == int(out.targets[r // g])
        assert int(pos[-1]) + 1 <= t  # thought label positions end before the target
        if bool(out.stopped[r]):
            assert int(pos[-1]) + 1 == t  # the sampled </think> is the last thought token
        # Rows of one context share the prompt up to <think>.
        first = out.tokens[(r // g) * g].tolist()
        assert row[: int(pos[0]) + 1] == first[: int(pos[0]) + 1]
    assert (out.labels[:, :-1] == out.tokens[:, 1:]).all()


def test_sampler_logprobs_match_training_forward(setup):
    from megatron_rlp.rlp.reward import token_logprobs

    tok, model = setup[0], setup[1]
    out = _rollout(setup)
    with torch.no_grad():
        train = token_logprobs(model(out.tokens, None, None), out.labels, tok.vocab_size,
                               setup[3].rlp_temperature) * out.thought_mask
    torch.testing.assert_close(train, out.sampler_logp, atol=1e-4, rtol=1e-4)


def test_teacher_logprob_is_the_no_thought_prediction(setup):
    from megatron_rlp.rlp.reward import token_logprobs

    tok, model = setup[0], setup[1]
    out = _rollout(setup)
    # Context 0 is the row between the template text and <think>.
    pre = len(tok.encode("Q: "))
    row = out.tokens[0].tolist()
    ctx = row[pre: row.index(tok.think_start)]
    with torch.no_grad():
        expected = token_logprobs(model(torch.tensor([ctx]), None, None)[0, -1:],
                                  out.targets[:1], tok.vocab_size)
    torch.testing.assert_close(out.teacher_logp[:1], expected, atol=1e-5, rtol=1e-5)


def test_rollouts_are_seeded_by_global_sample_index(setup):
    a, b, c = _rollout(setup, 4), _rollout(setup, 4), _rollout(setup, 8)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_rpt_reward_and_kl_term_paths_run_on_the_model(setup):
    from megatron_rlp.rlp.reward import token_bytes_table
    from megatron_rlp.rlp.stage import rlp_loss

    tok, model = setup[0], setup[1]
    try:
        out = _rollout(setup, rlp_reward="rpt", rlp_rpt_entropy_filter=0.5, rlp_kl_beta=0.1)
        assert out.ref_logp is not None and (out.ref_logp[out.thought_mask == 0] == 0).all()
        assert all(len(t) == setup[3].rlp_rpt_truth_tokens for t in out.truth)
        logits = model(out.tokens, None, None)
        loss, rewards, gm, sm, _ = rlp_loss(logits, out, setup[3], tok.vocab_size,
                                            token_bytes_table(tok))
        assert set(rewards.tolist()) <= {0.0, 1.0} and torch.isfinite(loss)
        loss.backward()
    finally:
        _rollout(setup, rlp_reward="info_gain", rlp_rpt_entropy_filter=None, rlp_kl_beta=0.0)


def test_rlp_stage_runs_from_pretrained_checkpoint(tiny_flags, tmp_path):
    pre = str(tmp_path / "pre")
    r = run_cli(tiny_flags + ["--train-iters", "2", "--save", pre])
    assert r.returncode == 0, r.stderr[-2000:]
    rlp = str(tmp_path / "rlp")
    r = run_cli(tiny_flags + [
        "--stage", "rlp", "--load", pre, "--save", rlp, "--train-iters", "2",
        "--micro-batch-size", "2", "--rlp-num-thoughts", "2", "--rlp-thought-length", "6",
        "--rlp-prompt-template", "{context}", "--rlp-max-context", "24",
        "--lr", "1e-4", "--min-lr", "1e-4", "--lr-decay-style", "constant",
        "--lr-warmup-iters", "0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "weights for a new stage" in r.stdout
    records = read_metrics(rlp)
    assert [x["iteration"] for x in records] == [1, 2]
    last = records[-1]
    for key in ("reward_mean", "reward_std", "info_gain_positive_frac", "thought_len_mean",
                "clip_frac", "approx_kl", "rollout_tokens_per_s", "equal_reward_groups",
                "ntp_equivalent_tokens", "rollout_share", "reward_share", "update_share"):
        assert key in last, key
    assert last["stage"] == "rlp" and last["ema_updates"] == 2  # once per optimizer step
    assert 1 <= last["thought_len_mean"] <= 6 and last["groups"] == 2
    assert last["ntp_equivalent_tokens"] > records[0]["ntp_equivalent_tokens"] > 0
    assert last["clip_frac"] == 0.0 and last["approx_kl"] < 1e-6
    assert last["grad_norm"] > 0
    # The EMA teacher rides along in the checkpoint.
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    keys = load_tensors_metadata(os.path.join(rlp, "iter_0000002")).keys()
    assert any(k.startswith("ext_ema_teacher.decoder.layers") for k in keys)

    # The RLP checkpoint (its config holds rlp_* keys) generates through the CLI.
    r = run_cli(["--load", rlp, "--prompt", "12+7=", "--max-new-tokens", "5", "--temperature", "0"],
                module="megatron_rlp.generate")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("12+7=")
