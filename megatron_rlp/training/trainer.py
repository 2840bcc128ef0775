"""The training loop: megatron schedules for forward/backward, megatron optimizer, our bookkeeping.

    for iteration in range(start, train_iters):
        callbacks.on_iteration_start          (e.g. NVFP4 → BF16 switch, data phase switch)
        stage.forward_backward                (megatron's schedule: no-pipelining / 1F1B)
        optimizer.step; scheduler.step
        callbacks.after_optimizer_step        (e.g. RLP's EMA teacher update)
        log / evaluate / save / SIGTERM check

What is computed per micro-batch is the stage's business (`PretrainStage` here: next-token loss;
the RLP stage supplies its own). Resume is exact: the data position is the consumed-sample count,
the schedule and optimizer come from the checkpoint, RNG is restored.
"""
from __future__ import annotations

import math
import os
import signal
import time
from functools import partial
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rlp import device
from megatron_rlp.device import is_logging_rank
from megatron_rlp.config import RunConfig
from megatron_rlp.data.document_inputs import DocumentInputs
from megatron_rlp.training import checkpoint as ckpt
from megatron_rlp.training.metrics import MetricsLogger


class Callback:
    """Hooks a feature can attach to the loop; every method is optional."""

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_iteration_start(self, trainer: "Trainer", iteration: int) -> None: ...

    def after_optimizer_step(self, trainer: "Trainer", iteration: int) -> None: ...

    def metrics(self, trainer: "Trainer") -> dict:
        return {}

    def checkpoint_components(self) -> dict:
        return {}


class PretrainStage:
    """Next-token prediction. Micro-batches come from a `data_source` with `batch(start, count)`
    returning stacked `tokens`, `labels`, `loss_mask` for global sample indices
    [start, start+count), and `phase(consumed)` naming the data phase."""

    name = "pretrain"

    def __init__(self, cfg: RunConfig, data_source, tokenizer=None):
        self.cfg = cfg
        self.data_source = data_source
        self.tokenizer = tokenizer  # its <eod> for --reset-attention-mask & co.
        self.documents = DocumentInputs.from_config(getattr(cfg, "data", None), tokenizer)

    def micro_batches(self, consumed_samples: int, num_microbatches: int) -> Iterator[dict]:
        """This DP rank's micro-batches of the global batch starting at `consumed_samples`:
        micro-batch j of rank r holds samples base + (j * DP + r) * MBS + [0, MBS)."""
        mbs = self.cfg.training.micro_batch_size
        dp = parallel_state.get_data_parallel_world_size()
        rank = parallel_state.get_data_parallel_rank()
        for j in range(num_microbatches):
            yield self.data_source.batch(consumed_samples + (j * dp + rank) * mbs, mbs)

    def forward_step(self, data_iterator, model):
        # Batches are built on the host; the schedule hands the model whatever we pass it.
        batch = device.to_device(next(data_iterator), device.model_device(model))
        position_ids, documents, loss_mask = self.documents.apply(batch["tokens"],
                                                                  batch["loss_mask"])
        output = model(batch["tokens"], position_ids, None, labels=batch["labels"],
                       packed_seq_params=documents)
        return output, partial(self.loss_func, loss_mask)

    @staticmethod
    def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
        loss_mask = loss_mask.float()
        loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
        # clone: megatron's schedule divides the returned loss by the micro-batch count *in
        # place*, and a plain detach() shares its storage.
        return loss, {"loss": loss.detach().clone()}


class LossSpikeGuard:
    """`--loss-spike-factor F`: stop when an iteration's loss exceeds F x the mean of the last
    `window` losses (at least `min_history` of them), before anything is saved, so the newest
    checkpoint predates the spike. Only the last pipeline stage sees the loss, so every rank
    agrees on the verdict (one tiny collective per iteration, only when the guard is on).
    The window starts empty after a resume."""

    def __init__(self, factor: Optional[float], window: int = 20, min_history: int = 5):
        self.factor, self.window, self.min_history = factor, window, min_history
        self.history: List[float] = []

    def spiked(self, loss: Optional[float]) -> Optional[float]:
        """The running mean `loss` exceeded (None: no spike), agreed over all ranks."""
        if self.factor is None:
            return None
        mean = sum(self.history) / len(self.history) if self.history else None
        spike = (loss is not None and mean is not None and len(self.history) >= self.min_history
                 and loss > self.factor * mean)
        if loss is not None:
            self.history = (self.history + [loss])[-self.window:]
        if device.any_rank(spike):
            return mean if mean is not None else float("nan")
        return None


class Trainer:
    def __init__(self, cfg: RunConfig, model: List[torch.nn.Module], optimizer, scheduler,
                 stage, callbacks: Optional[List[Callback]] = None, valid_source=None,
                 started_at: Optional[float] = None):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stage = stage
        self.callbacks = callbacks or []
        self.valid_source = valid_source
        self.iteration = 0
        self.consumed_samples = 0
        self.extra_state: dict = {}
        self._stop_requested = False
        # time.monotonic() when the process started: --exit-duration-in-mins counts from there.
        self.started_at = time.monotonic() if started_at is None else started_at
        self.pending_save: Optional[ckpt.PendingSave] = None  # --async-save in flight
        self.spike_guard = LossSpikeGuard(cfg.training.loss_spike_factor)
        dp = parallel_state.get_data_parallel_world_size()
        t = cfg.training
        self.global_batch_size = t.global_batch(dp)
        self.num_microbatches = self.global_batch_size // (t.micro_batch_size * dp)

    # ---------------------------------------------------------------- checkpointing
    def components(self) -> Dict[str, ckpt.CheckpointedComponent]:
        out = {}
        for callback in self.callbacks:
            out.update(callback.checkpoint_components())
        return out

    def training_state(self) -> dict:
        # The run config rides along so `load_model` / converters can rebuild the model.
        return {"consumed_samples": self.consumed_samples, "stage": self.stage.name,
                "config": self.cfg.to_flat_dict(), **ckpt.training_state_layout(),
                **self.extra_state}

    def save(self, blocking: bool = True) -> None:
        """Checkpoint this iteration. With --async-save and `blocking=False` the files are
        written in the background and published by a later `finish_pending_save`; one save is in
        flight at most (a new one first completes the previous)."""
        c = self.cfg.checkpoint
        self.finish_pending_save()
        self.pending_save = ckpt.start_save(
            c.save, self.iteration, self.model, self.optimizer, self.scheduler,
            self.training_state(), self.components(), keep_last=c.keep_last_n_checkpoints)
        if blocking or not c.async_save:
            self.finish_pending_save()

    def finish_pending_save(self) -> None:
        """Publish the save in flight, waiting for its writers. Collective: all ranks call it at
        the same iteration."""
        pending = self.pending_save
        if pending is None:
            return
        self.pending_save = None
        pending.finish()
        if is_logging_rank():
            print(f"saved checkpoint {pending.final_dir}", flush=True)

    def resume(self, load: str, *, finetune: bool = False, load_optim: bool = True,
               load_rng: bool = True, iteration: Optional[int] = None,
               verify: bool = True) -> None:
        """Resume a run (`finetune=False`: iteration, data position, optimizer, schedule) or start
        a new stage from its weights (`finetune=True`: weights only, iteration 0). `iteration`
        None loads `latest`; `verify=False` when the caller has checked the manifest."""
        keep_optimizer = load_optim and not finetune
        state = ckpt.load_checkpoint(
            load, self.model,
            optimizer=self.optimizer if keep_optimizer else None,
            scheduler=self.scheduler if keep_optimizer else None,
            components=self.components() if not finetune else {},
            load_rng=load_rng and not finetune, iteration=iteration, verify=verify)
        if finetune:
            return
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state["consumed_samples"])
        self.extra_state = {k: v for k, v in state.items()
                            if k not in ("iteration", "consumed_samples", "format_version",
                                         "layout", "stage", "config")}

    # ---------------------------------------------------------------- one step
    def _forward_backward(self, forward_only: bool = False, source_stage=None,
                          consumed: Optional[int] = None, num_microbatches: Optional[int] = None):
        stage = source_stage or self.stage
        num_microbatches = num_microbatches or self.num_microbatches
        consumed = self.consumed_samples if consumed is None else consumed
        (chunk,) = self.model  # one chunk per rank: interleaved pipeline stages are rejected
        forward_backward = get_forward_backward_func()
        return forward_backward(
            forward_step_func=stage.forward_step,
            data_iterator=stage.micro_batches(consumed, num_microbatches),
            model=chunk,
            num_microbatches=num_microbatches,
            seq_length=self.cfg.training.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self) -> dict:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._forward_backward()
        update_ok, grad_norm, _ = self.optimizer.step()
        # fp32/bf16 optimizers never skip a step, so a NaN/inf gradient would silently poison the
        # weights. The norm is global (same value on every rank), so all ranks stop together;
        # nothing is saved after this point, so `latest` still names the last good checkpoint.
        if not update_ok or (grad_norm is not None and not math.isfinite(float(grad_norm))):
            raise FloatingPointError(
                f"iteration {self.iteration + 1}: non-finite gradient norm ({grad_norm}); the "
                "last checkpoint is intact: resume from it with a lower --lr or check the data")
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += self.global_batch_size
        for callback in self.callbacks:
            callback.after_optimizer_step(self, self.iteration)
        record = _reduce_loss_dicts(outputs)
        record["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        return record

    @torch.no_grad()
    def evaluate(self, source, num_microbatches: Optional[int] = None) -> Optional[float]:
        """Mean next-token loss on `source` (a PretrainStage over validation data)."""
        for chunk in self.model:
            chunk.eval()
        n = num_microbatches or self.cfg.training.eval_iters
        outputs = self._forward_backward(forward_only=True, source_stage=source, consumed=0,
                                         num_microbatches=n)
        for chunk in self.model:
            chunk.train()
        return _reduce_loss_dicts(outputs).get("loss")

    def validation_losses(self) -> dict:
        """`valid_loss` on the validation blend and `valid_loss/<name>` on each source of it
        (the data source's `sources`, megatron_rlp/data/validation.py), --eval-iters
        micro-batches each, always from sample 0: a resumed run reports the same numbers."""
        blended = self.evaluate(self.valid_source)
        losses = {"valid_loss": blended}
        split = getattr(self.valid_source, "data_source", None)
        for name, source in getattr(split, "sources", {}).items():
            # A one-source split is its own source: the same samples, evaluated once.
            losses[f"valid_loss/{name}"] = blended if source is split else self.evaluate(
                PretrainStage(self.cfg, source, self.valid_source.tokenizer))
        return losses

    # ---------------------------------------------------------------- the loop
    def _install_sigterm_handler(self) -> None:
        if not self.cfg.training.exit_signal_handler:
            return

        def request_stop(signum, frame):
            self._stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)

    def _end_of_iteration(self) -> Tuple[Optional[str], bool]:
        """(why the run saves and exits after this iteration, None if it goes on; whether every
        rank has finished writing the save in flight), the same on every rank, from one small
        all-reduce: SLURM signals ranks at different times, clocks and background writers are
        read at different moments, and a rank that acts alone would hang the others in the next
        collective."""
        t = self.cfg.training
        minutes = (time.monotonic() - self.started_at) / 60
        out_of_time = t.exit_duration_in_mins is not None and minutes >= t.exit_duration_in_mins
        writing = self.pending_save is not None and not self.pending_save.write.done()
        signalled, timed_out, anyone_writing = device.all_reduce_values(
            [self._stop_requested, out_of_time, writing], "max")
        reason = None
        if t.exit_interval and self.iteration % t.exit_interval == 0:
            reason = f"--exit-interval {t.exit_interval} reached"
        elif signalled:
            reason = "SIGTERM received"
        elif timed_out:
            reason = f"--exit-duration-in-mins {t.exit_duration_in_mins:g} reached"
        return reason, not anyone_writing

    def train(self) -> dict:
        t, c = self.cfg.training, self.cfg.checkpoint
        # run_config: hook for the W&B sink (--wandb-*), opened by the logger on this rank only.
        logger = MetricsLogger(c.save, t.train_iters, enabled=is_logging_rank(),
                               resume_iteration=self.iteration, run_config=self.cfg,
                               **self._throughput_accounting())
        self._install_sigterm_handler()
        for callback in self.callbacks:
            callback.on_train_start(self)
        for chunk in self.model:
            chunk.train()
        tokens_in_window = 0
        summary = {"first_loss": None, "last_loss": None, "start_iteration": self.iteration}
        exit_reason = None
        start = time.perf_counter()
        while self.iteration < t.train_iters:
            for callback in self.callbacks:
                callback.on_iteration_start(self, self.iteration)
            record = self.train_step()
            self._check_loss_spike(record.get("loss"))
            logger.tick()
            # A stage may count its own tokens (RLP: rows through the training forward).
            tokens_in_window += (getattr(self.stage, "tokens_last_iteration", None)
                                 or self.global_batch_size * t.seq_length)
            if summary["first_loss"] is None:
                summary["first_loss"] = record.get("loss")
            summary["last_loss"] = record.get("loss")
            if self.iteration % t.log_interval == 0 or self.iteration == t.train_iters:
                record.update(iteration=self.iteration, stage=self.stage.name,
                              lr=self.optimizer.param_groups[0]["lr"],
                              phase=self._phase(), consumed_samples=self.consumed_samples)
                for callback in self.callbacks:
                    record.update(callback.metrics(self))
                if t.eval_interval and self.valid_source is not None \
                        and self.iteration % t.eval_interval == 0:
                    record.update(self.validation_losses())
                logger.log(record, tokens_in_window)
                tokens_in_window = 0
            exit_reason, save_written = self._end_of_iteration()
            last = exit_reason is not None or self.iteration == t.train_iters
            if c.save and (last or (c.save_interval and self.iteration % c.save_interval == 0)):
                self.save(blocking=last)
            elif save_written:
                self.finish_pending_save()
            if exit_reason is not None:
                if is_logging_rank():
                    saved = f"saved iteration {self.iteration}" if c.save else "no --save"
                    print(f"exit: {exit_reason}; {saved}, exiting", flush=True)
                break
        self.finish_pending_save()
        logger.close()
        summary.update(iteration=self.iteration, wall_s=time.perf_counter() - start,
                       exit_reason=exit_reason if self.iteration < t.train_iters else None)
        return summary

    def _check_loss_spike(self, loss: Optional[float]) -> None:
        mean = self.spike_guard.spiked(loss)
        if mean is None:
            return
        save = self.cfg.checkpoint.save
        newest = ckpt.read_latest_iteration(save) if save and os.path.isdir(save) else None
        kept = (f"the newest checkpoint (iteration {newest}) predates it" if newest is not None
                else "no checkpoint was written")
        shown = "on the last pipeline stage" if loss is None else f"{loss:.4g}"
        raise FloatingPointError(
            f"iteration {self.iteration}: loss {shown} exceeds --loss-spike-factor "
            f"{self.cfg.training.loss_spike_factor} x the recent mean {mean:.4g}; stopped without "
            f"saving, {kept}: resume from it with a lower --lr, or raise the factor")

    def _throughput_accounting(self) -> dict:
        """What the logger needs for TFLOP/s per device and MFU (Megatron-LM's throughput line).
        The FLOP formula is next-token pretraining's; other stages report tokens/s only."""
        if self.stage.name != PretrainStage.name:
            return {}
        from megatron.core.utils import get_attr_wrapped_model

        from megatron_rlp.training.flops import (matmul_precision, peak_flops_per_device,
                                                 training_flops_per_iteration)

        vocab = get_attr_wrapped_model(self.model[0], "vocab_size")  # already padded
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {"flops_per_iteration": training_flops_per_iteration(
                    self.cfg, self.global_batch_size, vocab),
                "num_devices": world,
                "peak_flops": peak_flops_per_device(
                    precision=matmul_precision(self.cfg.training.bf16))}

    def _phase(self) -> Optional[str]:
        source = getattr(self.stage, "data_source", None)
        phase = getattr(source, "phase", None)
        return phase(self.consumed_samples) if callable(phase) else None


def _reduce_loss_dicts(outputs: list) -> dict:
    """Average each metric over micro-batches (last PP stage), then over the DP group."""
    if not outputs:
        return {}
    keys = outputs[0].keys()
    means = torch.stack([torch.stack([o[k].float() for o in outputs]).mean() for k in keys])
    dp_group = parallel_state.get_data_parallel_group()
    means = device.all_reduce(means, "sum", dp_group) / parallel_state.get_data_parallel_world_size()
    return dict(zip(keys, device.host_list(means)))
