"""Progress line on stdout, `<save>/metrics.jsonl`, tensorboard events when installed, and the
same records in Weights & Biases with `--wandb-project` (training/wandb_sink.py).

Throughput over a log window of n iterations taking t seconds (wall clock between two `log`
calls, as Megatron-LM's per-interval timer):
    tokens_per_s      = tokens in the window / t
    tflops_per_device = (model FLOPs of the n iterations) / t / num_devices / 1e12
    mfu               = tflops_per_device * 1e12 / peak FLOP/s of one device
Model FLOPs come from `training.flops` (3 x forward, no recomputation), so MFU is Megatron-LM's
"model FLOPs utilisation"; `mfu` is written only when the device's peak is known.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """One record per logged iteration. Only rank 0 writes; other ranks get `enabled=False`.

    The JSONL file is appended and flushed per record, so a killed run keeps what it logged; a
    resumed run first drops records past the checkpoint's iteration (they will be logged again).
    """

    def __init__(self, save_dir: Optional[str], total_iters: int, enabled: bool = True,
                 resume_iteration: int = 0, *, flops_per_iteration: Optional[float] = None,
                 num_devices: int = 1, peak_flops: Optional[float] = None,
                 run_config=None):
        """`flops_per_iteration`: model FLOPs of one iteration over all devices (None: no FLOP
        throughput is reported); `num_devices`: devices sharing that work (the world size);
        `peak_flops`: dense peak FLOP/s of one device (None: no `mfu`); `run_config`: the
        RunConfig, whose `--wandb-*` flags (when set) open a W&B run on this rank if enabled."""
        if flops_per_iteration is not None and not flops_per_iteration >= 0:
            raise ValueError(f"flops_per_iteration={flops_per_iteration!r} must be >= 0 or None")
        if num_devices < 1:
            raise ValueError(f"num_devices={num_devices!r} must be >= 1 (the world size)")
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops={peak_flops!r} must be > 0 FLOP/s or None (unknown)")
        self.enabled = enabled
        self.total_iters = total_iters
        self.flops_per_iteration = flops_per_iteration
        self.num_devices = num_devices
        self.peak_flops = peak_flops
        self.path = os.path.join(save_dir, "metrics.jsonl") if save_dir else None
        self._tb = None
        self._wandb = None
        self._window_start = time.perf_counter()
        self._window_iters = 0
        self._window_flops: Optional[float] = 0.0  # None once an iteration of unknown cost ran
        if enabled and self.path:
            self._truncate_after(resume_iteration)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(save_dir, "tensorboard"))
            except ImportError:
                self._tb = None
        if enabled and run_config is not None and run_config.training.wandb_project:
            from megatron_rlp.training.wandb_sink import WandbSink

            self._wandb = WandbSink.open(run_config)  # None (after a warning) if W&B fails

    def _truncate_after(self, iteration: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a run killed mid-append: the torn record is dropped
                    break
                raise ValueError(f"{self.path} line {number} is not JSON; the metrics log is "
                                 "damaged: move it aside to resume") from None
            if record.get("iteration", 0) <= iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def tick(self, flops: Optional[float] = None) -> None:
        """Count one iteration towards the throughput window. `flops` overrides
        `flops_per_iteration` for this iteration (a stage whose cost varies per step)."""
        self._window_iters += 1
        flops = self.flops_per_iteration if flops is None else flops
        if flops is None or self._window_flops is None:
            self._window_flops = None
        else:
            self._window_flops += flops

    def log(self, record: dict, tokens_in_window: int) -> dict:
        """Add throughput/ETA to `record`, print one progress line, append it to the JSONL."""
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        iters = max(self._window_iters, 1)
        record = dict(record)
        record["tokens_per_s"] = tokens_in_window / elapsed
        record["iter_time_s"] = elapsed / iters
        if self._window_flops is not None and self._window_iters > 0:
            per_device = self._window_flops / elapsed / self.num_devices
            record["tflops_per_device"] = per_device / 1e12
            if self.peak_flops is not None:
                record["mfu"] = per_device / self.peak_flops
        eta = (self.total_iters - record["iteration"]) * record["iter_time_s"]
        self._window_start = time.perf_counter()
        self._window_iters = 0
        self._window_flops = 0.0
        if not self.enabled:
            return record
        parts = [f"iter {record['iteration']:>6d}/{self.total_iters}"]
        for key, fmt in (("phase", "{}"), ("stage", "{}"), ("loss", "{:.4f}"), ("lr", "{:.3e}"),
                         ("grad_norm", "{:.3f}"), ("reward_mean", "{:.4f}"),
                         ("info_gain_positive_frac", "{:.2f}"), ("thought_stopped_frac", "{:.2f}")):
            if record.get(key) is not None:
                # A stage whose loss value needs reading says how (RLP: 0 by construction).
                note = record.get("loss_note") if key == "loss" else None
                note = f" ({note})" if note else ""
                parts.append(f"{key} {fmt.format(record[key])}{note}")
        parts.append(f"tok/s {record['tokens_per_s']:.0f}")
        if "tflops_per_device" in record:  # Megatron-LM's wording
            parts.append(f"throughput per GPU (TFLOP/s/GPU) {record['tflops_per_device']:.1f}")
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        parts.append(f"ETA {_format_eta(eta)}")
        # Evaluation steps end the line: the blended validation loss, then one per source.
        parts += [f"{key} {value:.4f}" for key, value in record.items()
                  if (key == "valid_loss" or key.startswith("valid_loss/")) and value is not None]
        print(" | ".join(parts), flush=True)
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as error:
                # Only this rank writes: raising would leave the others waiting in the next
                # collective. The next save meets the same disk and ends the run on every rank
                # with one line (checkpoint.save_checkpoint); until then, training goes on.
                print(f"warning: cannot append to {self.path} ({error.strerror}); metrics are "
                      "no longer written to it", file=sys.stderr, flush=True)
                self.path = None
        if self._tb is not None:
            try:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "iteration":
                        self._tb.add_scalar(key, value, record["iteration"])
                self._tb.flush()
            except OSError as error:  # as for metrics.jsonl above
                print(f"warning: cannot write tensorboard events ({error.strerror}); "
                      "tensorboard logging stops", file=sys.stderr, flush=True)
                self._tb = None
        if self._wandb is not None and not self._wandb.log(record):
            self._wandb = None
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
