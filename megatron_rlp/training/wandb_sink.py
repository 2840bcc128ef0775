"""Weights & Biases sink for the metrics records: Megatron-LM's `--wandb-*` flags.

    --wandb-project P --wandb-exp-name NAME [--wandb-save-dir DIR] [--wandb-entity TEAM]

As in Megatron-LM (`megatron/training/global_vars.py`, `_set_wandb_writer`): W&B is on when
`--wandb-project` is set, the run name is required, the run's files go under `--wandb-save-dir`
(default `<save>/wandb`), and the run's config is the whole flat run config. Where Megatron-LM
logs a curated set of scalars, here every record that `MetricsLogger` appends to
`<save>/metrics.jsonl` is logged as it is (same keys, strings and nulls included) at
`step=iteration`, by the same rank, so the two never disagree. W&B's own settings come from its
environment variables (`WANDB_MODE=offline` writes the run without a network; `wandb sync`
uploads it later).

One launch is one W&B run: a resumed run starts a new W&B run under the same name, holding the
iterations that launch logs (W&B refuses a step lower than one already logged, and a resume logs
again the iterations after the checkpoint).

Bad input is refused at launch (`config.launch.check_wandb_flags`, alike on every rank), before
any work: the companion flags without `--wandb-project`, no run name, nowhere to write, wandb not
installed, or a WANDB_MODE that wandb would reject. A failure of W&B itself later (e.g.
`wandb.init` cannot reach the server) prints one warning and training goes on without W&B: only
the logging rank talks to W&B, and raising there would leave the other ranks waiting in their
next collective.
"""
from __future__ import annotations

import os
import sys
from typing import Optional


def wandb_dir(training, save: Optional[str]) -> str:
    """The folder given to `wandb.init(dir=...)`; W&B writes `wandb/<run>/` inside it."""
    return training.wandb_save_dir or os.path.join(save, "wandb")


class WandbSink:
    """One open W&B run; `log(record)` per metrics record, then `close()`."""

    def __init__(self, run):
        self._run = run

    @classmethod
    def open(cls, run_config) -> Optional["WandbSink"]:
        """Start the run described by `run_config` (a checked RunConfig), or warn and return
        None if W&B fails."""
        training = run_config.training
        folder = wandb_dir(training, run_config.checkpoint.save)
        try:
            import wandb

            os.makedirs(folder, exist_ok=True)
            run = wandb.init(dir=folder, project=training.wandb_project,
                             name=training.wandb_exp_name, entity=training.wandb_entity,
                             config=run_config.to_flat_dict())
        except Exception as error:  # wandb raises its own errors, pydantic's, OSError, ...
            _warn(f"W&B logging is off for this run: wandb.init failed ({error})")
            return None
        return cls(run)

    def log(self, record: dict) -> bool:
        """Log `record` at step `record['iteration']`; False (after one warning) if W&B failed."""
        try:
            self._run.log(record, step=record["iteration"])
        except Exception as error:
            _warn(f"W&B logging stops: wandb.log failed ({error})")
            return False
        return True

    def close(self) -> None:
        try:
            self._run.finish()
        except Exception as error:
            _warn(f"W&B run did not finish cleanly ({error}); its files may be incomplete")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
