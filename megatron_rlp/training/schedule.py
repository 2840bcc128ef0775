"""The learning-rate schedule a run's flags describe, and what a resume does when they changed.

The schedule is a function of a few flags (`schedule_plan`); megatron's `OptimizerParamScheduler`
is built from that plan (`build_scheduler`). A checkpoint records the flags of the run that saved
it, so a resume compares the two plans before loading anything. As in Megatron-LM, a resume whose
schedule differs stops unless told which one wins:

    --override-opt-param-scheduler         the command line's schedule, continued from the saved
                                           iteration (e.g. a longer cosine after raising
                                           --train-iters)
    --use-checkpoint-opt-param-scheduler   the checkpoint's schedule, whatever the command line says

Without this, raising --train-iters on resume silently re-planned the cosine decay mid-run.
Megatron-LM compares the scheduler's own values (decay *length*, not --train-iters), and so do we:
raising --train-iters with an explicit --lr-decay-iters, or under a constant schedule, changes no
learning rate and needs no flag.
"""
from __future__ import annotations

from typing import List, Optional

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rlp.config import RunConfig


def schedule_plan(flags: dict) -> dict:
    """The learning-rate / weight-decay schedule of a run, from its flat config (`flags`:
    `RunConfig.to_flat_dict()`, or the copy a checkpoint holds). Only values that change a
    learning rate or weight decay are included, so two plans are equal exactly when the
    schedules are."""
    style = flags["lr_decay_style"]
    decay_iters = flags["lr_decay_iters"] or flags["train_iters"]
    plan = {"lr": flags["lr"], "lr_decay_style": style,
            "lr_warmup_iters": flags["lr_warmup_iters"], "weight_decay": flags["weight_decay"]}
    if style != "constant":  # a constant schedule never reads its decay length or end value
        plan["min_lr"] = flags["min_lr"]
        # megatron needs at least one decay step after warmup.
        plan["lr_decay_iters"] = max(decay_iters, flags["lr_warmup_iters"] + 1)
    if style == "WSD":
        plan["lr_wsd_decay_iters"] = flags["lr_wsd_decay_iters"] or max(1, int(0.2 * decay_iters))
        plan["lr_wsd_decay_style"] = flags["lr_wsd_decay_style"]
    return plan


def build_scheduler(plan: dict, optimizer) -> OptimizerParamScheduler:
    """megatron's scheduler for `plan`, stepped once per iteration (Megatron-LM counts samples).
    On load it takes only the step count from a checkpoint: the plan was settled before."""
    decay_iters = plan.get("lr_decay_iters", plan["lr_warmup_iters"] + 1)
    wsd_iters = plan.get("lr_wsd_decay_iters")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=plan["lr"],
        min_lr=plan.get("min_lr", 0.0),
        lr_warmup_steps=plan["lr_warmup_iters"],
        lr_decay_steps=decay_iters,
        lr_decay_style=plan["lr_decay_style"],
        start_wd=plan["weight_decay"],
        end_wd=plan["weight_decay"],
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=wsd_iters,
        lr_wsd_decay_style=plan.get("lr_wsd_decay_style"),
    )


def _describe(key: str, ours: dict, theirs: dict, flags: dict, saved_flags: dict) -> str:
    """'--flag VALUE (checkpoint: VALUE)' for one differing plan entry."""
    if key == "lr_decay_iters" and not flags["lr_decay_iters"] and not saved_flags["lr_decay_iters"]:
        return (f"--train-iters {flags['train_iters']} (checkpoint: {saved_flags['train_iters']}; "
                "it sets the decay length)")
    flag = "--" + key.replace("_", "-")
    return f"{flag} {ours.get(key)} (checkpoint: {theirs.get(key)})"


def schedule_differences(flags: dict, saved_flags: dict) -> List[str]:
    """One description per schedule value that `flags` (this run) and `saved_flags` (the
    checkpoint's run) set differently."""
    ours, theirs = schedule_plan(flags), schedule_plan(saved_flags)
    return [_describe(key, ours, theirs, flags, saved_flags)
            for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]


def resume_schedule(cfg: RunConfig, saved_flags: Optional[dict], ckpt_dir: str,
                    optimizer) -> Optional[OptimizerParamScheduler]:
    """The scheduler a resume from `ckpt_dir` must load into: None to keep the one built from the
    command line; a new one built from the checkpoint's flags under
    --use-checkpoint-opt-param-scheduler. Raises ValueError, naming each difference and both ways
    out, when the schedules differ and no flag says which wins. `saved_flags` None (a checkpoint
    without its config) compares nothing."""
    if saved_flags is None:
        return None
    c = cfg.checkpoint
    differences = schedule_differences(cfg.to_flat_dict(), saved_flags)
    if not differences or c.override_opt_param_scheduler:
        return None
    if c.use_checkpoint_opt_param_scheduler:
        return build_scheduler(schedule_plan(saved_flags), optimizer)
    raise ValueError(
        f"resuming {ckpt_dir} with a different learning-rate schedule: {'; '.join(differences)}; "
        "pass --override-opt-param-scheduler to continue with the command line's schedule from "
        "the saved iteration, or --use-checkpoint-opt-param-scheduler to keep the checkpoint's")
