"""Progress line on stdout, `<save>/metrics.jsonl`, and tensorboard events when installed."""
from __future__ import annotations

import json
import math
import os
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
                 resume_iteration: int = 0):
        self.enabled = enabled
        self.total_iters = total_iters
        self.path = os.path.join(save_dir, "metrics.jsonl") if save_dir else None
        self._tb = None
        self._window_start = time.perf_counter()
        self._window_iters = 0
        if not enabled or not self.path:
            return
        self._truncate_after(resume_iteration)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(save_dir, "tensorboard"))
        except ImportError:
            self._tb = None

    def _truncate_after(self, iteration: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip()
                    and json.loads(line).get("iteration", 0) <= iteration]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def tick(self) -> None:
        """Count one iteration towards the throughput window."""
        self._window_iters += 1

    def log(self, record: dict, tokens_in_window: int) -> dict:
        """Add throughput/ETA to `record`, print one progress line, append it to the JSONL."""
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        iters = max(self._window_iters, 1)
        record = dict(record)
        record["tokens_per_s"] = tokens_in_window / elapsed
        record["iter_time_s"] = elapsed / iters
        eta = (self.total_iters - record["iteration"]) * record["iter_time_s"]
        self._window_start = time.perf_counter()
        self._window_iters = 0
        if not self.enabled:
            return record
        parts = [f"iter {record['iteration']:>6d}/{self.total_iters}"]
        for key, fmt in (("phase", "{}"), ("stage", "{}"), ("loss", "{:.4f}"), ("lr", "{:.3e}"),
                         ("grad_norm", "{:.3f}"), ("reward_mean", "{:.4f}")):
            if record.get(key) is not None:
                parts.append(f"{key} {fmt.format(record[key])}")
        parts.append(f"tok/s {record['tokens_per_s']:.0f}")
        parts.append(f"ETA {_format_eta(eta)}")
        print(" | ".join(parts), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self._tb.add_scalar(key, value, record["iteration"])
            self._tb.flush()
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
