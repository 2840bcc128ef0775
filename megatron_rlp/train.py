"""`megatron-rlp-train` / `python -m megatron_rlp.train`: pretraining and RLP stages.

    python -m megatron_rlp.train --config examples/tiny_cpu.yaml --save runs/tiny
    torchrun --nproc-per-node 2 -m megatron_rlp.train --config ... --tensor-model-parallel-size 2

Bad input (unknown flag, inconsistent shapes, missing data, unwritable --save) ends the run before
any work with one line naming the problem and the fix, and exit code 2.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from megatron_rlp.config import RunConfig, parse_args

# --exit-duration-in-mins counts from here (Megatron-LM counts from its initialisation): the
# imports and the model build are part of a job's wall clock too.
PROCESS_START = time.monotonic()


def check_save_dir(save: Optional[str]) -> None:
    """Fail now, not after an hour of training, if checkpoints cannot be written."""
    if not save:
        return
    try:
        os.makedirs(save, exist_ok=True)
        probe = os.path.join(save, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"--save {save!r} is not writable ({error.strerror}); "
                         "choose a directory you can write to") from None


@dataclass
class Run:
    cfg: RunConfig
    tokenizer: object
    model: list
    optimizer: object
    scheduler: object
    trainer: object
    lock: object = None  # the --save directory's RunLock (rank 0), released when the run ends


def build_model_chunks(cfg: RunConfig, vocab_size: int) -> list:
    """This rank's model chunk, on this rank's device: its pipeline stage (interleaved stages are
    rejected earlier), converted by the extensions that change a model (NVFP4)."""
    from megatron.core import parallel_state

    from megatron_rlp.device import compute_device
    from megatron_rlp.extensions import EXTENSIONS
    from megatron_rlp.models.hybrid import build_model

    chunks = [build_model(cfg, vocab_size,
                          pre_process=parallel_state.is_pipeline_first_stage(),
                          post_process=parallel_state.is_pipeline_last_stage())]
    for extension in EXTENSIONS:
        if extension.convert_model is not None:
            extension.convert_model(chunks, cfg)
    # Initialised on the CPU (identical weights for every layout), then placed once, before the
    # DDP wrapper allocates its grad buffers on the current device (Megatron-LM's get_model).
    return [chunk.to(compute_device()) for chunk in chunks]


def build_run(cfg: RunConfig) -> Run:
    """Everything a training process needs, built in dependency order; the --save directory is
    locked for this run from here on (released by `run_training`, or now if building fails)."""
    from megatron_rlp.data.document_inputs import DocumentInputs
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.training.distributed import init_distributed
    from megatron_rlp.device import barrier
    from megatron_rlp.training.run_lock import lock_save_dir

    check_save_dir(cfg.checkpoint.save)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    # --reset-attention-mask & co. need the tokenizer's <eod>: refuse before any work.
    DocumentInputs.from_config(cfg.data, tokenizer)
    init_distributed(cfg.parallel, cfg.training.seed)
    lock = lock_save_dir(cfg.checkpoint.save)
    try:
        if lock is not None:  # rank 0 holds the lock: leftovers are a dead run's, not a live one's
            from megatron_rlp.training.save_dir import recover_interrupted_saves

            for note in recover_interrupted_saves(cfg.checkpoint.save):
                print(f"note: {note}", flush=True)
        # No rank may read --save (e.g. `latest` for --load == --save) while rank 0 repairs it.
        barrier()
        return _assemble_run(cfg, tokenizer, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _assemble_run(cfg: RunConfig, tokenizer, lock) -> Run:
    from megatron_rlp.data.run_data import resolve_data
    from megatron_rlp.data.validation import validation_source
    from megatron_rlp.extensions import EXTENSIONS, stage_builder
    from megatron_rlp.training.optim import build_optimizer, wrap_model
    from megatron_rlp.training.schedule import build_scheduler, schedule_plan
    from megatron_rlp.training.trainer import PretrainStage, Trainer

    data_path, valid_path = resolve_data(cfg)
    model = wrap_model(cfg, build_model_chunks(cfg, tokenizer.vocab_size))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(schedule_plan(cfg.to_flat_dict()), optimizer)

    train_source = _train_source(cfg, tokenizer, data_path)
    valid = validation_source(cfg, tokenizer, valid_path)
    valid_stage = PretrainStage(cfg, valid, tokenizer) if valid is not None else None

    if cfg.training.stage == "pretrain":
        stage = PretrainStage(cfg, train_source, tokenizer)
    else:
        stage = stage_builder(cfg.training.stage)(cfg, model, tokenizer, train_source)
    callbacks = [callback for e in EXTENSIONS if e.callbacks is not None
                 for callback in e.callbacks(cfg, model, tokenizer, train_source)]
    if hasattr(stage, "callbacks"):
        callbacks.extend(stage.callbacks())
    trainer = Trainer(cfg, model, optimizer, scheduler, stage, callbacks, valid_source=valid_stage,
                      started_at=PROCESS_START)
    return Run(cfg, tokenizer, model, optimizer, scheduler, trainer, lock)


def _train_source(cfg: RunConfig, tokenizer, data_path: list):
    """An extension's training source (a --data-phases schedule), else the --data-path blend."""
    from megatron_rlp.data.run_data import build_train_source
    from megatron_rlp.extensions import EXTENSIONS

    for extension in EXTENSIONS:
        source = extension.train_source and extension.train_source(cfg, tokenizer)
        if source is not None:
            return source
    return build_train_source(cfg, tokenizer, data_path)


def load_for_run(run: Run) -> None:
    """Apply --load: resume the same stage, or start a new stage from a checkpoint's weights.
    The checkpoint (`latest`'s, or --ckpt-step's) is checked against its manifest before anything
    in it is read."""
    from megatron_rlp.training import checkpoint as ckpt

    c = run.cfg.checkpoint
    if not c.load:
        return
    if c.finetune:
        refuse_new_run_over_checkpoints(c.save, "--finetune", "drop --finetune and ")
    wanted = c.ckpt_step is not None or os.path.isdir(c.load)
    iteration = ckpt.resolve_iteration(c.load, c.ckpt_step) if wanted else None
    if iteration is None:
        if c.load == c.save:  # Megatron convention: --load == --save auto-resumes if possible
            return
        raise ValueError(f"--load {c.load!r} has no checkpoint ('latest' missing); "
                         "check the path")
    verified = ckpt.verify_checkpoint(c.load, iteration, hashes=not c.no_ckpt_verify)
    ckpt_dir = ckpt.checkpoint_dir(c.load, iteration)
    with ckpt.load_errors(ckpt_dir):
        saved = _saved_training_state(c.load, iteration)
    common_stage = saved.get("stage", "pretrain")
    new_stage = c.finetune or common_stage != run.cfg.training.stage
    if new_stage and not c.finetune:
        refuse_new_run_over_checkpoints(
            c.save, f"--stage {run.cfg.training.stage} from a {common_stage} checkpoint", "")
    if not new_stage and not c.no_load_optim:
        from megatron_rlp.training.schedule import resume_schedule

        scheduler = resume_schedule(run.cfg, saved.get("config"), ckpt_dir, run.optimizer)
        if scheduler is not None:
            run.scheduler = run.trainer.scheduler = scheduler
    run.trainer.resume(c.load, finetune=new_stage, load_optim=not c.no_load_optim,
                       load_rng=not c.no_load_rng, iteration=iteration, verify=False)
    from megatron_rlp.device import is_logging_rank

    if is_logging_rank():
        if not verified:
            print(f"note: {ckpt_dir} has no manifest.json (saved before integrity manifests): "
                  "loaded without verification", flush=True)
        how = "weights for a new stage" if new_stage else f"resuming at {run.trainer.iteration}"
        print(f"loaded {ckpt_dir} ({how})", flush=True)


def refuse_new_run_over_checkpoints(save: Optional[str], what: str, resume_hint: str) -> None:
    """A run that starts at iteration 0 (fine-tuning, a new stage) must not write into a --save
    that holds checkpoints: it would truncate metrics.jsonl, overwrite iter_* and move `latest`
    backwards (seen with --finetune and --load == --save: 12 back to 2). Checked before the
    checkpoint is read or metrics.jsonl is opened."""
    from megatron_rlp.training.checkpoint import LATEST_FILE

    if save and os.path.exists(os.path.join(save, LATEST_FILE)):
        raise ValueError(f"{what} with --save {save!r}, which already holds checkpoints "
                         "('latest'): this run starts at iteration 0 and would overwrite them; "
                         f"choose an empty --save, or to resume that run {resume_hint}pass "
                         f"--load {save}")


def _saved_training_state(load: str, iteration: int) -> dict:
    from megatron_rlp.training import safe_load
    from megatron_rlp.training.checkpoint import checkpoint_dir

    return safe_load.load_common_state_dict(checkpoint_dir(load, iteration))["training"]


def run_training(cfg: RunConfig) -> dict:
    run = build_run(cfg)
    try:
        load_for_run(run)
        summary = run.trainer.train()
    finally:
        if run.lock is not None:
            run.lock.release()
    from megatron_rlp.device import is_logging_rank

    if is_logging_rank():
        first, last = summary["first_loss"], summary["last_loss"]
        where = cfg.checkpoint.save or "(no --save: nothing written)"
        print(f"done: iterations {summary['start_iteration']}->{summary['iteration']} in "
              f"{summary['wall_s']:.1f}s; loss {first if first is None else round(first, 4)} -> "
              f"{last if last is None else round(last, 4)}; outputs in {where}", flush=True)
    return summary


def _quiet_known_import_warnings() -> None:
    """megatron-core warns at import about every missing optional CUDA extension (TE, Apex);
    on a CPU that is expected, and the noise hides the progress lines."""
    import warnings

    for pattern in (".*Transformer Engine and Apex.*", ".*Apex is not installed.*",
                    ".*tp_group is None.*", ".*torch.jit.script_method.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: Optional[list] = None) -> int:
    _quiet_known_import_warnings()
    from megatron_rlp.cli import EXPECTED_ERRORS, run_main

    # FloatingPointError: training stopped on a non-finite gradient norm (nothing was saved).
    return run_main("megatron-rlp-train", lambda: _run(parse_args(argv)),
                    errors=EXPECTED_ERRORS + (FloatingPointError,))


def _run(cfg: RunConfig) -> None:
    if cfg.checkpoint.dry_run:
        from megatron_rlp.dry_run import dry_run
        from megatron_rlp.extensions import EXTENSIONS

        dry_run(cfg)
        for extension in EXTENSIONS:
            text = extension.dry_run_report and extension.dry_run_report(cfg)
            if text:
                print(text, flush=True)
        return
    run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
