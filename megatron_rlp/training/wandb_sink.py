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

Bad input is refused at launch (`config.parse_args`, alike on every rank), before any work: the
companion flags without `--wandb-project`, no run name, nowhere to write, wandb not installed,
or a WANDB_MODE that wandb would reject. Not in `RunConfig` itself, which also rebuilds saved
configs (`load_model` unsets --save, and a machine that only loads a checkpoint needs no wandb). A failure of W&B itself later (e.g. `wandb.init` cannot reach the
server) prints one warning and training goes on without W&B: only the logging rank talks to W&B,
and raising there would leave the other ranks waiting in their next collective.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

# The values wandb 0.31's `Settings.mode` accepts (tests/test_wandb_logging.py holds the two
# lists equal); anything else makes `wandb.init` raise on the logging rank only.
WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")
COMPANION_FLAGS = ("wandb_exp_name", "wandb_save_dir", "wandb_entity")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_wandb_flags(training, save: Optional[str]) -> None:
    """Raise ValueError (one line: flag, value, rule, fix) if the `--wandb-*` flags of
    `training` (a TrainingConfig) cannot give a W&B run; `save` is --save."""
    project = training.wandb_project
    if not project:
        for name in COMPANION_FLAGS:
            if getattr(training, name):
                raise ValueError(f"{_flag(name)}={getattr(training, name)!r}: has no effect "
                                 "without --wandb-project; add --wandb-project NAME or drop it")
        return
    where = f"--wandb-project={project!r}"
    if not training.wandb_exp_name:
        raise ValueError(f"{where}: needs --wandb-exp-name (the W&B run name, required as in "
                         "Megatron-LM); add --wandb-exp-name NAME")
    if not training.wandb_save_dir and not save:
        raise ValueError(f"{where}: W&B files go to <save>/wandb but --save is not set; add "
                         "--save DIR or --wandb-save-dir DIR")
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(f"{where}: the wandb package is not installed; pip install "
                         "'megatron-rlp[wandb]' (or pip install wandb), or drop --wandb-project")
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise ValueError(f"WANDB_MODE={mode!r} (environment): not a W&B mode; set one of "
                         f"{', '.join(WANDB_MODES)} (offline: no network) or unset it")


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
