"""The RLP training stage: `--stage rlp --load PRETRAINED` (attached by megatron_rlp/extensions.py).

Per optimizer step (one rollout batch, one update):
    micro_batches   for each micro-batch of contexts: rollout (cached decoding, no grad) and the
                    teacher's no-thought log-prob, see rollout.py
    forward_step    the training forward of the policy on all B*G rows -> logits
    loss_func       token log-probs (temperature-scaled) of the thought tokens, the reward from the
                    same forward's (detached, temperature-1) log-prob of x_t, group advantages and
                    the clipped surrogate (objective.py); metrics accumulate for the log window
    callback        after the optimizer step: phi <- tau phi + (1 - tau) theta (ema.py)

Groups never straddle micro-batches or DP ranks (a context and its G thoughts live in one
micro-batch), so advantages need no communication. Pipeline parallelism and sequence parallelism
are refused (cached decoding needs the whole model in one TP group, unsplit along the sequence).
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial

import torch
from megatron.core import parallel_state

from megatron_rlp import device

from megatron_rlp.training.trainer import Callback

from .ema import EMATeacher
from .flops import ntp_equivalent_tokens
from . import objective
from .objective import group_advantages, k3_kl
from .reward import (gathered_logits, info_gain_reward, rpt_reward, token_bytes_table,
                     token_logprobs)
from .rollout import make_rollout, split_template

LOSS_NOTE = "clipped surrogate: 0 by construction at ratio 1, watch reward_mean"

_SUM_KEYS = ("reward_sum", "reward_sq_sum", "rewards", "reward_pos", "equal_reward_groups",
             "groups", "thought_len_sum", "thoughts", "stopped", "clip_tokens", "tokens",
             "sampler_kl_sum", "rollout_tokens", "rollout_s", "reward_s", "context_tokens",
             "row_tokens")


def rollout_rewards(batch, logits: torch.Tensor, rcfg, vocab_size: int, token_bytes=None
                    ) -> torch.Tensor:
    """[N] rewards from the training forward's logits at x_t (detached, temperature 1)."""
    n = logits.shape[0]
    rows = torch.arange(n, device=logits.device)
    at_target = logits[rows, batch.target_pos.to(logits.device)].detach()  # [N, V/tp]
    g = batch.num_thoughts
    if rcfg.rlp_reward == "info_gain":
        targets = batch.targets.to(logits.device).repeat_interleave(g)
        logp = token_logprobs(at_target, targets, vocab_size)
        return info_gain_reward(logp, batch.teacher_logp.to(logits.device).repeat_interleave(g))
    pred = gathered_logits(at_target, vocab_size).argmax(dim=-1).tolist()
    out = [rpt_reward(token_bytes[token], [token_bytes[i] for i in batch.truth[r // g]])
           for r, token in enumerate(pred)]
    return torch.tensor(out, device=logits.device)


def rlp_loss(logits: torch.Tensor, batch, rcfg, vocab_size: int, token_bytes=None):
    """The stage's loss on one micro-batch: logits [N, L, V/tp] of the training forward ->
    (loss, rewards [N], group metrics, surrogate metrics, detached thought log-probs [N, L])."""
    dev = logits.device
    mask = batch.thought_mask.to(dev)
    logp = token_logprobs(logits, batch.labels.to(dev), vocab_size, rcfg.rlp_temperature) * mask
    rewards = rollout_rewards(batch, logits, rcfg, vocab_size, token_bytes)
    adv, gm = group_advantages(rewards.view(-1, batch.num_thoughts))
    ref = batch.ref_logp.to(dev) if batch.ref_logp is not None else None
    # Behaviour log-probs = this training forward's own, detached (one update per rollout), never
    # the cached decoder's sampler log-probs.
    loss, sm = objective.clipped_surrogate(logp, logp.detach(), adv.reshape(-1), mask,
                                           rcfg.rlp_clip_eps_low, rcfg.rlp_clip_eps_high,
                                           rcfg.rlp_kl_beta, ref)
    return loss, rewards, gm, sm, logp.detach()


class RLPStage:
    name = "rlp"

    def __init__(self, cfg, model_chunks, tokenizer, data_source):
        from megatron_rlp.inference.decode import CachedDecoder
        from megatron_rlp.models.hybrid import build_model

        self.cfg, self.rcfg = cfg, cfg.rlp
        self.data_source = data_source
        self.tokenizer = tokenizer
        if cfg.parallel.pipeline_model_parallel_size != 1:
            raise ValueError("--stage rlp needs --pipeline-model-parallel-size 1 (rollouts decode "
                             "with the whole model); use TP/DP instead")
        if cfg.parallel.sequence_parallel:
            raise ValueError("--stage rlp does not support --sequence-parallel; drop the flag")
        if tokenizer.think_start is None or tokenizer.think_end is None:
            raise ValueError("--stage rlp needs <think> and </think> tokens in the tokenizer")
        self.model_chunks = model_chunks
        self.decoder = CachedDecoder(model_chunks[0], tokenizer.vocab_size)
        fp32_cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, bf16=False))
        # The teacher sits beside the student (same device, same TP shard), in fp32; its weights
        # come from the student or a checkpoint, never from an init of its own.
        student_device = device.model_device(model_chunks[0])
        self.teacher = EMATeacher(
            lambda: build_model(fp32_cfg, tokenizer.vocab_size,
                                init_weights=False).to(student_device),
            self.rcfg.rlp_ema_decay)
        self.pre, self.post = split_template(self.rcfg.rlp_prompt_template, tokenizer)
        self.token_bytes = token_bytes_table(tokenizer) if self.rcfg.rlp_reward == "rpt" else None
        self.stats = dict.fromkeys(_SUM_KEYS, 0.0)

    @property
    def device(self):
        return self.decoder.model.embedding.word_embeddings.weight.device

    # ----------------------------------------------------------------- data + rollouts
    def micro_batches(self, consumed_samples: int, num_microbatches: int):
        mbs = self.cfg.training.micro_batch_size
        dp = parallel_state.get_data_parallel_world_size()
        rank = parallel_state.get_data_parallel_rank()
        for j in range(num_microbatches):
            start = consumed_samples + (j * dp + rank) * mbs
            data = self.data_source.batch(start, mbs)
            yield make_rollout(self.decoder, self.teacher.model, self.tokenizer, data, self.rcfg,
                               seed=self.cfg.training.seed, first_sample=start,
                               pre=self.pre, post=self.post)

    # ----------------------------------------------------------------- update
    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch.tokens.to(self.device), None, None)       # [N, L, V/tp]
        return logits, partial(self.loss_func, batch)

    def loss_func(self, batch, logits: torch.Tensor):
        loss, rewards, gm, sm, logp = rlp_loss(logits, batch, self.rcfg, self.tokenizer.vocab_size,
                                               self.token_bytes)
        self._accumulate(batch, rewards, gm, sm, logp, batch.thought_mask.to(logits.device))
        # clone: megatron divides the returned loss in place by the micro-batch count.
        return loss, {"loss": loss.detach().clone()}

    @torch.no_grad()
    def _accumulate(self, batch, rewards, gm, sm, logp, mask):
        s = self.stats
        n_tok = float(mask.sum())
        s["reward_sum"] += float(rewards.sum())
        s["reward_sq_sum"] += float((rewards.float() ** 2).sum())
        s["rewards"] += rewards.numel()
        s["reward_pos"] += float((rewards > 0).sum())
        s["equal_reward_groups"] += gm["equal_reward_groups"]
        s["groups"] += gm["groups"]
        s["thought_len_sum"] += float(batch.thought_len.sum())
        s["thoughts"] += batch.thought_len.numel()
        s["stopped"] += float(batch.stopped.sum())
        s["clip_tokens"] += float(sm["clip_frac"]) * n_tok
        s["tokens"] += n_tok
        s["sampler_kl_sum"] += float(k3_kl(batch.sampler_logp.to(mask.device), logp, mask)) * n_tok
        s["rollout_tokens"] += batch.generated_tokens
        s["rollout_s"] += batch.rollout_s
        s["reward_s"] += batch.reward_s
        s["context_tokens"] += batch.context_tokens
        s["row_tokens"] += float((batch.tokens != self.tokenizer.pad).sum())

    def callbacks(self):
        return [RLPCallback(self)]


class RLPCallback(Callback):
    """EMA teacher init/update, RLP metrics over the log window, teacher in checkpoints."""

    def __init__(self, stage: RLPStage):
        self.stage = stage
        self.window_start = None
        self.iter_start = None
        self.iter_s = 0.0

    def on_train_start(self, trainer) -> None:
        if not self.stage.teacher.initialised:  # a fresh stage: phi starts at the loaded theta
            self.stage.teacher.init_from(trainer.model[0])

    def on_iteration_start(self, trainer, iteration: int) -> None:
        self.iter_start = time.perf_counter()

    def after_optimizer_step(self, trainer, iteration: int) -> None:
        self.stage.teacher.update(trainer.model[0])
        s = self.stage.stats
        step_tokens = device.all_reduce_values(
            [s["row_tokens"] - s.get("_counted_rows", 0.0),
             s["context_tokens"] - s.get("_counted_ctx", 0.0)],
            group=parallel_state.get_data_parallel_group())
        s["_counted_rows"], s["_counted_ctx"] = s["row_tokens"], s["context_tokens"]
        total = trainer.extra_state.get("rlp_ntp_equivalent_tokens", 0)
        trainer.extra_state["rlp_ntp_equivalent_tokens"] = total + ntp_equivalent_tokens(
            int(step_tokens[0]), int(step_tokens[1]))
        # The trainer's tokens/s counts what went through the training forward (all B*G rows),
        # not global batch x --seq-length, which means nothing for this stage.
        self.stage.tokens_last_iteration = int(step_tokens[0])
        if self.iter_start is not None:
            self.iter_s += time.perf_counter() - self.iter_start

    def metrics(self, trainer) -> dict:
        s = self.stage.stats
        v = dict(zip(_SUM_KEYS, device.all_reduce_values(
            [s[k] for k in _SUM_KEYS], group=parallel_state.get_data_parallel_group())))
        dp = parallel_state.get_data_parallel_world_size()
        n = max(v["rewards"], 1)
        mean = v["reward_sum"] / n
        # Time shares are per rank (rollout/reward summed over ranks, so divide by DP).
        iter_s = max(self.iter_s, 1e-9)
        rollout_s, reward_s = v["rollout_s"] / dp, v["reward_s"] / dp
        out = {
            "reward_mean": mean,
            "reward_std": max(v["reward_sq_sum"] / n - mean * mean, 0.0) ** 0.5,
            "info_gain_positive_frac": v["reward_pos"] / n,
            "equal_reward_groups": int(v["equal_reward_groups"]),
            "groups": int(v["groups"]),
            "thought_len_mean": v["thought_len_sum"] / max(v["thoughts"], 1),
            "thought_stopped_frac": v["stopped"] / max(v["thoughts"], 1),
            "clip_frac": v["clip_tokens"] / max(v["tokens"], 1),
            "approx_kl": v["sampler_kl_sum"] / max(v["tokens"], 1),
            "rollout_tokens_per_s": v["rollout_tokens"] / max(v["rollout_s"] / dp, 1e-9),
            "rollout_share": rollout_s / iter_s,
            "reward_share": reward_s / iter_s,
            "update_share": max(iter_s - rollout_s - reward_s, 0.0) / iter_s,
            "ntp_equivalent_tokens": int(trainer.extra_state.get("rlp_ntp_equivalent_tokens", 0)),
            "ema_updates": self.stage.teacher.updates,
            # One update per rollout: ratio 1 and zero-sum advantages per group make the
            # surrogate's value 0 (its gradient is the policy gradient); progress is the reward.
            "loss_note": LOSS_NOTE,
        }
        for k in _SUM_KEYS:
            s[k] = 0.0
        s["_counted_rows"] = s["_counted_ctx"] = 0.0
        self.iter_s = 0.0
        return out

    def checkpoint_components(self) -> dict:
        return {"ema_teacher": self.stage.teacher}


def build_rlp_stage(cfg, model_chunks, tokenizer, train_source):
    return RLPStage(cfg, model_chunks, tokenizer, train_source)
