"""Checks of a launch's environment, run once per process before any work (alike on every rank).

Not in `RunConfig` itself, which also rebuilds saved configs: `load_model` unsets --save, and a
machine that only loads a checkpoint needs no wandb.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

from .fields import flag

# The values wandb 0.31's `Settings.mode` accepts (tests/test_wandb_logging.py holds the two
# lists equal); anything else makes `wandb.init` raise on the logging rank only.
WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")
COMPANION_FLAGS = ("wandb_exp_name", "wandb_save_dir", "wandb_entity")


def check_wandb_flags(training, save: Optional[str]) -> None:
    """Raise ValueError (one line: flag, value, rule, fix) if the `--wandb-*` flags of
    `training` (a TrainingConfig) cannot give a W&B run; `save` is --save."""
    project = training.wandb_project
    if not project:
        for name in COMPANION_FLAGS:
            if getattr(training, name):
                raise ValueError(f"{flag(name)}={getattr(training, name)!r}: has no effect "
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
