"""RLP objective as pure functions: advantages, equal-reward groups, clipped surrogate, rewards
(information gain on constructed models, RPT prefix rule), EMA update, and the stage loss's
gradient and behaviour-log-prob contracts."""
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_rlp.rlp import objective
from megatron_rlp.rlp.ema import ema_update
from megatron_rlp.rlp.objective import clipped_surrogate, group_advantages, k3_kl
from megatron_rlp.rlp.reward import info_gain_reward, rpt_reward, token_logprobs


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megatron_rlp.config import ParallelConfig
    from megatron_rlp.training.distributed import init_distributed

    init_distributed(ParallelConfig(), 1)  # vocab-parallel cross entropy reads the TP group


def test_advantages_sum_to_zero_and_match_formula():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, -0.5, 0.0, 0.0]])
    adv, m = group_advantages(r)
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    expected = 4 / 3 * (r - r.mean(dim=1, keepdim=True))
    torch.testing.assert_close(adv, expected)
    # G/(G-1) scaling == leave-one-out baseline r_i - mean_{j != i} r_j
    loo = torch.stack([r[:, i] - (r.sum(1) - r[:, i]) / 3 for i in range(4)], dim=1)
    torch.testing.assert_close(adv, loo)
    assert m["reward_mean"] == pytest.approx(float(r.mean()))
    assert m["info_gain_positive_frac"] == pytest.approx(5 / 8)


def test_groups_with_all_equal_rewards_are_counted():
    r = torch.tensor([[0.3, 0.3, 0.3], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-2.0, -2.0, -2.0]])
    adv, m = group_advantages(r)
    assert m["equal_reward_groups"] == 3 and m["groups"] == 4
    assert (adv[[0, 2, 3]] == 0).all() and adv[1].abs().sum() > 0
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_clipped_surrogate_clips_and_normalises_per_thought():
    # Thought 0: 2 tokens, A = +1, ratios e^0.5 (clipped at 1.2) and 1. Thought 1: 1 token, A = -1,
    # ratio e^-0.5 (clipped at 0.8 -> min picks the clipped, more pessimistic term).
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, m = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    l0 = (min(math.exp(0.5), 1.2) + 1.0) / 2
    l1 = -max(math.exp(-0.5), 0.8)  # min(rho*A, clip*A) with A=-1
    assert float(loss) == pytest.approx(-(l0 + l1) / 2, rel=1e-6)
    assert float(m["clip_frac"]) == pytest.approx(2 / 3)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0  # clipped tokens: no gradient
    assert logp.grad[0, 1] == pytest.approx(-0.5 / 2)     # -(1/T_i) A_i / N, ratio 1
    assert (logp.grad[mask == 0] == 0).all()


def test_surrogate_gradient_at_ratio_one_is_policy_gradient():
    logp = torch.randn(4, 5).requires_grad_()
    mask = (torch.rand(4, 5) > 0.3).float()
    mask[:, 0] = 1
    adv = torch.randn(4)
    loss, m = clipped_surrogate(logp, logp.detach(), adv, mask)
    loss.backward()
    expected = -(adv[:, None] * mask / mask.sum(1, keepdim=True)) / 4
    torch.testing.assert_close(logp.grad, expected)
    assert float(m["clip_frac"]) == 0 and float(m["ratio_kl"]) == 0


def test_k3_kl_is_zero_for_equal_and_positive_otherwise():
    p = torch.log(torch.tensor([[0.2, 0.5]]))
    mask = torch.ones(1, 2)
    assert float(k3_kl(p, p, mask)) == 0
    assert float(k3_kl(p, p + 0.1, mask)) > 0


# ------------------------------------------------------------------------ rewards
V, THINK, END, HINT0 = 12, 1, 2, 6  # ids 6..11 are "hint" tokens: hint h means "next is h-6"


class ConstructedLM(torch.nn.Module):
    """A model whose prediction ignores <think>/</think>; inside a thought, a hint token h makes
    the token h - HINT0 certain after </think>; otherwise the next token is uniform over 0..5."""

    def forward(self, ids, *_):
        b, s = ids.shape
        logits = torch.zeros(b, s, V)
        logits[..., HINT0:] = -30.0
        for i in range(b):
            hint = None
            for j in range(s):
                tok = int(ids[i, j])
                if tok >= HINT0:
                    hint = tok - HINT0
                if hint is not None and tok == END:
                    logits[i, j, hint] = 30.0
        return logits


def _reward(model, context, thought, target):
    row = torch.tensor([context + [THINK] + thought + [END, target]])
    logp = token_logprobs(model(row)[0, -2:-1], torch.tensor([target]), V)
    base = token_logprobs(model(torch.tensor([context]))[0, -1:], torch.tensor([target]), V)
    return float(info_gain_reward(logp, base))


def test_reward_positive_when_thought_makes_target_certain():
    model = ConstructedLM()
    r = _reward(model, [3, 4, 5], [HINT0 + 4, 0], target=4)
    assert r == pytest.approx(math.log(6), abs=1e-3)       # from uniform over 6 to certain
    assert _reward(model, [3, 4, 5], [HINT0 + 1], target=4) < -20  # a misleading thought


def test_reward_is_zero_for_empty_thought_when_student_equals_teacher():
    model = ConstructedLM()  # theta == phi: the same model on both sides
    assert _reward(model, [3, 4, 5], [], target=2) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("prediction,truth,expected", [
    (b"ab", [b"a", b"b", b"c"], 1.0),        # ends on the boundary after token 2
    (b"a", [b"a", b"bc"], 1.0),
    (b"ab", [b"a", b"bc"], 0.0),             # a byte-prefix, but inside token "bc"
    (b"abc", [b"a", b"bc"], 1.0),            # one predicted token spanning two true tokens
    (b" the", [b" the", b" cat"], 1.0),
    (b" th", [b" the", b" cat"], 0.0),
    (b"x", [b"a", b"b"], 0.0),
    (b"", [b"a"], 0.0),
    (b"abcd", [b"a", b"bc"], 0.0),           # longer than the known truth
    (b"ac", [b"a", b"c"[:0] + b"b"], 0.0),   # same length as a boundary, different bytes
])
def test_rpt_reward_hand_cases(prediction, truth, expected):
    assert rpt_reward(prediction, truth) == expected


def test_token_bytes_table_maps_byte_level_symbols_back():
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.rlp.reward import token_bytes_table

    tok = build_tokenizer()
    table = token_bytes_table(tok)
    ids = tok.encode(" hello 12+7")
    assert b"".join(table[i] for i in ids) == b" hello 12+7"
    assert table[tok.think_end] == b"</think>"


# ------------------------------------------------------------------------ EMA
def test_ema_update_formula_and_direction():
    phi = [torch.tensor([0.0, 10.0])]
    theta = [torch.tensor([1.0, 0.0])]
    ema_update(phi, theta, 0.9)
    torch.testing.assert_close(phi[0], torch.tensor([0.1, 9.0]))   # 0.9*phi + 0.1*theta
    torch.testing.assert_close(theta[0], torch.tensor([1.0, 0.0]))  # the student never moves
    gap = (phi[0] - theta[0]).abs()
    ema_update(phi, theta, 0.9)
    torch.testing.assert_close((phi[0] - theta[0]).abs(), 0.9 * gap)  # slowly toward theta


# ------------------------------------------------------------------------ stage loss contracts
def _fake_batch(n_ctx=2, g=3, L=7, vocab=V):
    torch.manual_seed(0)
    mask = torch.zeros(n_ctx * g, L)
    mask[:, 2:4] = 1.0           # thought label positions
    mask[0, 4] = 1.0             # a longer thought
    target_pos = torch.full((n_ctx * g,), 5)
    tokens = torch.randint(0, 6, (n_ctx * g, L))
    return SimpleNamespace(
        tokens=tokens, labels=torch.cat([tokens[:, 1:], tokens[:, :1]], 1), thought_mask=mask,
        target_pos=target_pos, targets=tokens[::g, 6].clone(), num_thoughts=g,
        teacher_logp=torch.full((n_ctx,), -math.log(6)), ref_logp=None, truth=[],
        sampler_logp=torch.zeros(n_ctx * g, L))


def _rcfg(**kw):
    from megatron_rlp.config import RLPConfig

    return RLPConfig(**kw)


def test_loss_gradient_touches_only_thought_token_logits():
    from megatron_rlp.rlp.stage import rlp_loss

    batch = _fake_batch()
    logits = torch.randn(6, 7, V, requires_grad=True)
    loss, rewards, *_ = rlp_loss(logits, batch, _rcfg(), V)
    loss.backward()
    per_position = logits.grad.abs().sum(-1)                # [N, L]
    assert (per_position[batch.thought_mask == 0] == 0).all()   # prompt and target: none
    assert (per_position[batch.thought_mask == 1] > 0).all()
    assert rewards.requires_grad is False


def test_behaviour_logprobs_come_from_the_training_forward(monkeypatch):
    """The ratio's denominator is the training forward's log-prob (detached), whatever the cached
    decoder reported: perturbing the sampler's log-probs changes neither loss nor gradient."""
    from megatron_rlp.rlp import stage

    seen = {}
    real = objective.clipped_surrogate

    def spy(logp, old_logp, *args, **kwargs):
        seen.update(logp=logp, old=old_logp)
        return real(logp, old_logp, *args, **kwargs)

    monkeypatch.setattr(objective, "clipped_surrogate", spy)
    results = []
    for shift in (0.0, 0.3):
        batch = _fake_batch()
        batch.sampler_logp = batch.sampler_logp + shift
        logits = torch.randn(6, 7, V, generator=torch.Generator().manual_seed(1)).requires_grad_()
        loss, _, _, sm, _ = stage.rlp_loss(logits, batch, _rcfg(), V)
        loss.backward()
        results.append((float(loss), logits.grad.clone(), float(sm["clip_frac"])))
        assert seen["logp"].requires_grad and not seen["old"].requires_grad
        assert torch.equal(seen["old"], seen["logp"].detach())
        expected = token_logprobs(logits.detach(), batch.labels, V, 0.7) * batch.thought_mask
        torch.testing.assert_close(seen["old"], expected)
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == 0.0
