"""Save and resume with megatron-core dist_checkpointing.

Layout under `--save`:
    iter_0000100/       one dist_checkpointing directory: model, optimizer, scheduler, RNG,
                        training state (iteration, consumed samples, phase, ...) and the state of
                        the stage and callbacks (the RLP EMA teacher, ...)
    latest              the newest *complete* iteration, as text

A save goes to `iter_0000100.tmp/`, gets a `manifest.json` (every file's size and SHA-256, see
manifest.py) once every rank has finished writing, is swapped into place (save_dir.py: never
delete-then-rename), and only then is `latest` replaced (write temp file + `os.replace`), so a run
killed at any moment leaves `latest` pointing at a whole checkpoint. A load checks the manifest
before reading anything; every failure to load is one line naming the file, the iteration and
the newest intact earlier iteration (`--ckpt-step N` loads it).
Every read goes through safe_load.py: tensors and byte objects are unpickled by torch's
`weights_only` unpickler, `.metadata` with an allow-list of DCP's metadata classes, so loading never
runs code from a checkpoint (docs/CHECKPOINTS.md, "Trust model").

Model and optimizer tensors are sharded by megatron (`sharded_state_dict`), so a checkpoint saved at
one TP/PP/DP layout loads at another.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from typing import Dict, List, Optional, Protocol

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import random as tp_random
from torch.distributed.checkpoint.api import CheckpointException

from megatron_rlp import device
from megatron_rlp.models.hybrid import unwrap_model
from megatron_rlp.training import manifest, optimizer_formats, safe_load, save_dir
from megatron_rlp.training.dcp_errors import failure_chain
from megatron_rlp.training.save_dir import LATEST_FILE, checkpoint_dir, fallback_hint

FORMAT_VERSION = 1


class CheckpointedComponent(Protocol):
    """An extension's state that rides along in the checkpoint (e.g. the RLP EMA teacher).

    `sharded_state_dict()` returns megatron ShardedTensors (or plain values for common state);
    `load_sharded_state_dict(loaded)` receives the same structure back, filled in."""

    def sharded_state_dict(self) -> dict: ...

    def load_sharded_state_dict(self, state: dict) -> None: ...


def read_latest_iteration(load: str) -> Optional[int]:
    """The iteration named by `<load>/latest`, or None if the directory has no checkpoint."""
    path = os.path.join(load, LATEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text[:40]!r}"
                         + fallback_hint(load, None))
    iteration = int(text)
    ckpt_dir = checkpoint_dir(load, iteration)
    if not os.path.isdir(ckpt_dir):
        aside = (f" (a re-save was interrupted: the previous copy is {ckpt_dir}.old; rename it "
                 "back, or run with --save on this directory, which does)"
                 if os.path.isdir(ckpt_dir + ".old") else "")
        raise ValueError(f"{path} names iteration {iteration} but {ckpt_dir} is missing{aside}"
                         + fallback_hint(load, iteration))
    return iteration


def resolve_iteration(load: str, ckpt_step: Optional[int] = None) -> Optional[int]:
    """The iteration to load: `ckpt_step` (--ckpt-step) if given, else the one `latest` names
    (None: the directory holds no checkpoint)."""
    if ckpt_step is None:
        return read_latest_iteration(load)
    if not os.path.isdir(checkpoint_dir(load, ckpt_step)):
        saved = ", ".join(map(str, save_dir.saved_iterations(load))) or "none"
        raise ValueError(f"--ckpt-step {ckpt_step}: {checkpoint_dir(load, ckpt_step)} does not "
                         f"exist (saved iterations in {load}: {saved})")
    return ckpt_step


def verify_checkpoint(load: str, iteration: int, hashes: bool = True) -> bool:
    """Check `iter_NNNNNNN/` against its manifest before anything reads it: names and sizes, and
    with `hashes` every file's SHA-256 (each rank hashes its share of the files). Every rank
    raises the same one-line ValueError naming the file, the iteration and the newest intact
    earlier one. Returns False, checking nothing, for a checkpoint saved before manifests."""
    ckpt_dir = checkpoint_dir(load, iteration)
    if not manifest.has_manifest(ckpt_dir):
        return False
    problem = ""
    try:
        files = manifest.read_manifest(ckpt_dir)
        problem = manifest.size_problem(ckpt_dir, files) or ""
        if not problem and hashes:
            share = sorted(files)[_rank()::_world_size()]
            problem = manifest.hash_problem(ckpt_dir, files, share) or ""
    except (ValueError, OSError) as error:
        problem = str(error)
    problem = device.first_problem(problem)
    if problem:
        raise ValueError(f"checkpoint {ckpt_dir} is damaged: {problem}"
                         + fallback_hint(load, iteration))
    return True


@contextlib.contextmanager
def load_errors(ckpt_dir: str):
    """Turn any error from megatron's or torch's checkpoint readers into one ValueError line.
    torch's `CheckpointException` is a BaseException, so `except Exception` alone misses it;
    KeyboardInterrupt and SystemExit still pass."""
    try:
        yield
    except (Exception, CheckpointException) as error:
        raise ValueError(load_failure(ckpt_dir, error)) from error


def load_failure(ckpt_dir: str, error: BaseException) -> str:
    """One line: the file when it can be told, the underlying error's first line, and the newest
    intact earlier checkpoint with the flag that loads it."""
    hint = fallback_hint(*save_dir.split_checkpoint_dir(ckpt_dir))
    cause = _os_error_in(error) or _first_failure(error)
    detail = (str(cause).strip().splitlines() or [""])[0]
    if isinstance(cause, ValueError) and ckpt_dir in detail:  # ours: names file and checkpoint
        return detail + hint
    if isinstance(cause, OSError) and cause.strerror:
        detail = cause.strerror
    elif isinstance(cause, EOFError):  # torch's reader says nothing more
        detail = "a file ends early (truncated copy?)"
    elif not isinstance(cause, ValueError):
        detail = f"{type(cause).__name__}: {detail}"
    return f"cannot load checkpoint {ckpt_dir}: {_file_in(ckpt_dir, cause)}{detail}{hint}"


def _first_failure(error: BaseException) -> BaseException:
    """What a rank raised inside torch's CheckpointException (its own text is a traceback)."""
    while isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    return error


def _file_in(ckpt_dir: str, error: BaseException) -> str:
    """"<name>: " for the checkpoint file `error` is about, if it says; else ""."""
    filename = getattr(error, "filename", None)
    if filename:
        return os.path.relpath(os.fsdecode(filename), ckpt_dir) + ": "
    text = str(error).replace(ckpt_dir, "")  # the directory's own name may contain a file name
    names = manifest.list_files(ckpt_dir) + list(save_dir.LEGACY_REQUIRED)
    named = [name for name in names if name in text]
    return max(named, key=len) + ": " if named else ""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def model_sharded_state_dict(model: List[torch.nn.Module]) -> dict:
    if len(model) == 1:
        return {"model": unwrap_model(model[0]).sharded_state_dict()}
    return {f"model{i}": unwrap_model(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def _optimizer_metadata() -> dict:
    # The distributed optimizer's default sharding type fails on save in 0.16.1 (DESIGN.md);
    # "fully_reshardable" also lets a checkpoint move between DP sizes.
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def _rng_state() -> dict:
    # Training draws randomness only from torch (CPU generator, this GPU's generator and megatron's
    # tracker, whose streams are CUDA states on GPU hosts); data order, RLP sampling and NVFP4
    # stochastic rounding are seeded from (seed, position in the run), so these are all a resume
    # needs. States are CPU byte tensors, whatever device they describe.
    state = {
        "torch": torch.get_rng_state(),
        "tracker": tp_random.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _rng_sharded_object(state: Optional[dict]) -> ShardedObject:
    """RNG differs per rank: one object per (pp, tp, dp) rank, loadable only at the same layout."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", state, (pp, tp, dp), offset, replica_id=0)


def _restore_rng(state: dict) -> None:
    """Restore what was saved on a host of the same kind. Crossing CPU <-> GPU keeps the fresh
    streams: a CUDA generator state means nothing to the CPU generator and vice versa."""
    torch.set_rng_state(state["torch"])
    saved_on_gpu = "cuda" in state
    if saved_on_gpu != torch.cuda.is_available():
        return
    if saved_on_gpu:
        torch.cuda.set_rng_state(state["cuda"])
    tp_random.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(save: str, iteration: int, model: List[torch.nn.Module], optimizer,
                    scheduler, training_state: dict,
                    components: Optional[Dict[str, CheckpointedComponent]] = None,
                    keep_last: Optional[int] = None) -> str:
    """Write `iter_NNNNNNN/` atomically and point `latest` at it. Returns the directory.
    `start_save` and `PendingSave.finish` describe the steps; this waits for all of them."""
    pending = start_save(save, iteration, model, optimizer, scheduler, training_state,
                         components, keep_last)
    pending.finish()
    return pending.final_dir


def start_save(save: str, iteration: int, model: List[torch.nn.Module], optimizer, scheduler,
               training_state: dict,
               components: Optional[Dict[str, CheckpointedComponent]] = None,
               keep_last: Optional[int] = None) -> "PendingSave":
    """Begin a save: make `<dir>.tmp/` (rank 0, once it has checked there is room for another
    checkpoint the size of the last), copy this rank's share of the state to host memory, and
    start writing it from a background thread. Training may go on (`--async-save`) as soon as
    this returns: what is written is the copy. Collective: every rank calls it at the same
    iteration. Limit: megatron writes `common.pt` on rank 0 alone, before the collective part of
    its save; if that write fails in a multi-rank run the other ranks are already inside torch's
    collectives, so the room check is what keeps a full disk a one-line error there."""
    final_dir = checkpoint_dir(save, iteration)
    tmp_dir = final_dir + ".tmp"

    def prepare():
        _check_room(save)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)

    _save_step(prepare if _rank() == 0 else None, save, final_dir)

    state = model_sharded_state_dict(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False,
                                                      metadata=_optimizer_metadata())
    state["scheduler"] = scheduler.state_dict()
    state["training"] = dict(training_state, iteration=iteration, format_version=FORMAT_VERSION)
    state["rng_state"] = _rng_sharded_object(_rng_state())
    for name, component in (components or {}).items():
        state[f"ext_{name}"] = component.sharded_state_dict()

    # Written by threads, not forked writers + a spawn Manager that outlive a killed run.
    from megatron_rlp.training.ckpt_writer import BackgroundWrite, InProcessSaveStrategy

    request = []
    _save_step(lambda: request.append(dist_checkpointing.save(
        state, tmp_dir, sharded_strategy=InProcessSaveStrategy(),
        validate_access_integrity=True, async_sharded_save=True)), save, final_dir)
    return PendingSave(save, iteration, BackgroundWrite(request[0]), keep_last)


class PendingSave:
    """A save whose files are being written in the background (see `start_save`)."""

    def __init__(self, save: str, iteration: int, write, keep_last: Optional[int]):
        self.save, self.iteration, self.write, self.keep_last = save, iteration, write, keep_last
        self.final_dir = checkpoint_dir(save, iteration)

    def finish(self) -> None:
        """Wait for this rank's writer, then, each step agreed by every rank before the next:
        megatron's finalisation (the global `.metadata`), hash the files (each rank its share),
        write `manifest.json`, swap the directory into place and replace `latest` (rank 0), and
        drop checkpoints beyond the newest `keep_last`. An OSError in any step (disk full,
        permissions) removes the `.tmp` and raises one ValueError naming the path and the
        intact previous checkpoint; until `latest` moves, the previous checkpoint is the one a
        resume loads, so a run killed during a background write loses only this save."""
        save, final_dir = self.save, self.final_dir
        tmp_dir = final_dir + ".tmp"
        _save_step(self.write.wait, save, final_dir)
        _save_step(self.write.finalize, save, final_dir)
        mine: dict = {}
        _save_step(lambda: mine.update(manifest.describe_files(
            tmp_dir, manifest.list_files(tmp_dir)[_rank()::_world_size()])), save, final_dir)
        files = {name: entry for share in device.all_gather_object(mine)
                 for name, entry in share.items()}

        def publish():
            save_dir.publish(save, self.iteration, files)
            if self.keep_last is not None:
                save_dir.keep_newest(save, self.keep_last)

        _save_step(publish if _rank() == 0 else None, save, final_dir)


def _save_step(step, save: str, final_dir: str) -> None:
    """Run `step` (None: nothing to do on this rank), then agree across ranks; on an OSError
    anywhere, remove the partial save and raise the same one-line ValueError on every rank."""
    problem = ""
    if step is not None:
        try:
            step()
        except (Exception, CheckpointException) as error:  # torch's is a BaseException
            os_error = _os_error_in(error) or _full_disk_error(save, error)
            if os_error is None:
                raise
            problem = _describe_os_error(os_error, save)
    problem = device.first_problem(problem)
    if not problem:
        return
    if _rank() == 0:
        shutil.rmtree(final_dir + ".tmp", ignore_errors=True)
    try:
        previous = read_latest_iteration(save)
    except ValueError:
        previous = None
    kept = (f"the previous checkpoint (iteration {previous}) is intact; resume with --load "
            f"{save} once fixed" if previous is not None
            else "no earlier checkpoint was saved; start again once fixed")
    raise ValueError(f"cannot save checkpoint {final_dir}: {problem}; {kept}")


def _check_room(save: str) -> None:
    """Refuse to start a save that cannot fit (the last checkpoint's size, from its manifest):
    failing here is clean on every rank, failing mid-write may not be (see save_checkpoint)."""
    try:
        previous = read_latest_iteration(save)
    except ValueError:
        return
    needed = save_dir.latest_bytes(save, previous) if previous is not None else None
    free = shutil.disk_usage(save).free
    if needed is not None and free < needed:
        raise OSError(errno.ENOSPC, f"only {free / 2**20:.1f} MiB free, the last checkpoint "
                      f"took {needed / 2**20:.1f} MiB", save)


def _os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError behind `error`: itself, a cause, or a rank's failure inside torch's
    CheckpointException (which wraps whatever a writer raised). DCP sends failures between
    ranks pickled, which drops `__cause__`: megatron's writer then leaves only the text
    "Worker failure: [Errno 28] No space left on device: '<path>'", so that is parsed too."""
    from_text = None
    # `raise ... from None` disowns its context: an OSError there is not what failed.
    for current in failure_chain(error, suppressed_context=False):
        if isinstance(current, OSError):
            return current
        match = _ERRNO_TEXT.search(str(current)) if isinstance(current, RuntimeError) else None
        if match and from_text is None:
            from_text = OSError(int(match.group(1)), match.group(2), match.group(3))
    return from_text


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]*)')?")
_FULL_DISK_BYTES = 64 << 20


def _full_disk_error(save: str, error: BaseException) -> Optional[OSError]:
    """torch.save writes through C++ and reports a full disk without an errno ("[enforce fail
    at inline_container.cc] unexpected pos ..."). A write that failed while the file system has
    (next to) no room left is taken to be that."""
    try:
        free = shutil.disk_usage(save).free
    except OSError:
        return None
    if free >= _FULL_DISK_BYTES:
        return None
    said = (str(_first_failure(error)).strip().splitlines() or [""])[0]
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free / 2**20:.1f} MiB free; "
                   f"the writer said {said[:120]!r})", save)


def _describe_os_error(error: OSError, save: str) -> str:
    where = f"{error.filename}: " if error.filename else ""
    what = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free disk space for {save}"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {save} writable"
    else:
        fix = "fix the cause"
    return f"{where}{what} ({fix})"


def load_checkpoint(load: str, model: List[torch.nn.Module], optimizer=None, scheduler=None,
                    components: Optional[Dict[str, CheckpointedComponent]] = None,
                    load_rng: bool = True, iteration: Optional[int] = None,
                    verify: bool = True, hashes: bool = True) -> dict:
    """Load the checkpoint named by `<load>/latest` (or `iteration`) into the given objects.

    Returns the saved training state (iteration, consumed samples, ...). `optimizer=None` loads
    weights only (fine-tuning or a new stage); RNG is restored only at the layout it was saved at.
    The directory is checked against its manifest first (`verify_checkpoint`; `verify=False` when
    the caller already did); any failure to read it is one ValueError line.
    """
    if iteration is None:
        iteration = read_latest_iteration(load)
        if iteration is None:
            raise ValueError(f"--load {load!r}: no '{LATEST_FILE}' file, so no checkpoint to "
                             "resume; check the path or drop --load to start fresh")
    ckpt_dir = checkpoint_dir(load, iteration)
    if verify:
        verify_checkpoint(load, iteration, hashes=hashes)

    state = model_sharded_state_dict(model)
    saved_tensors = _check_model_shapes(ckpt_dir, state)
    if optimizer is not None:
        _ensure_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=_optimizer_metadata())
    with load_errors(ckpt_dir):
        common = safe_load.load_common_state_dict(ckpt_dir)
    # Saved with --use-distributed-optimizer switched the other way: the same moments in the
    # other optimizer's layout. Ask for them under the checkpoint's names now, rebuild the
    # non-tensor part after loading (optimizer_formats.py).
    switch = (optimizer_formats.plan_switch(optimizer, common, ckpt_dir)
              if optimizer is not None else None)
    if switch is not None:
        switch.adapt_request(state["optimizer"],
                             {k: v for k, v in state.items() if k != "optimizer"}, saved_tensors)
    if optimizer is not None and scheduler is not None:
        state["scheduler"] = common["scheduler"]
    for name, component in (components or {}).items():
        prefix = f"ext_{name}"
        if prefix not in common and not any(key.startswith(prefix) for key in saved_tensors):
            # Resuming without e.g. the EMA teacher would silently restart it from the student.
            raise ValueError(f"{ckpt_dir} has no saved state for '{name}' (keys 'ext_{name}*'); "
                             "it was saved by a different stage or version: start a new stage "
                             "with --finetune instead of resuming")
        state[f"ext_{name}"] = component.sharded_state_dict()
    same_layout = _saved_layout(common) == _current_layout()
    if load_rng and same_layout:
        state["rng_state"] = _rng_sharded_object(None)

    with load_errors(ckpt_dir):  # shapes were checked above: what fails here is the files
        loaded = safe_load.load(state, ckpt_dir)

    for i, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{i}"
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"] if switch is None else
                                  switch.adapt_loaded(loaded["optimizer"], common["optimizer"]))
        _unshare_adam_steps(optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(common["scheduler"])
    for name, component in (components or {}).items():
        component.load_sharded_state_dict(loaded[f"ext_{name}"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return dict(common["training"])


def _check_model_shapes(ckpt_dir: str, state: dict) -> dict:
    """Compare this rank's model tensors with the checkpoint's metadata, then agree across ranks.
    Returns that metadata ({key: ShardedTensor without data}) for further checks.

    megatron reports a mismatch deep in its loader, on some ranks only (a PP stage sees only its
    layers), and the other ranks then wait in a collective until the timeout. Here every rank
    gets the first problem any rank found and raises the same one-line `ValueError`."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    problem = ""
    try:
        saved = safe_load.load_tensors_metadata(ckpt_dir)
    except (Exception, CheckpointException) as error:  # unreadable: same outcome on every rank
        problem = "cannot read: " + load_failure(ckpt_dir, error)
        saved = {}
    for value in nested_values(state):
        if problem:
            break
        if not isinstance(value, ShardedTensor):
            continue
        if value.key not in saved:
            problem = f"{value.key} is missing"
        elif tuple(saved[value.key].global_shape) != tuple(value.global_shape):
            problem = (f"{value.key} has shape {tuple(saved[value.key].global_shape)} there but "
                       f"{tuple(value.global_shape)} in this model")
    first = device.first_problem(problem)
    if first.startswith("cannot read: "):
        raise ValueError(first[len("cannot read: "):])
    if first:
        raise ValueError(f"checkpoint {ckpt_dir} does not fit this model: {first}; it was saved "
                         "from a model of a different shape (layers, widths, pattern, vocab): "
                         "load it with the same model flags")
    return saved


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron's (chained / distributed / fp32) wrappers."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in chained]


def _ensure_adam_state(optimizer) -> None:
    """Give a never-stepped torch Adam/AdamW zero state before building its load state dict.

    Only torch's optimizers (megatron's choice without TE/Apex, on CPU *and* GPU hosts) need
    this: TE's FusedAdam keeps `step` per param group and rejects a per-param `step`, and
    megatron fills its state itself. Without TE/Apex, megatron 0.16.1's
    `DistributedOptimizer.state_dict()` reads `step` from every param's torch state
    (`assert len(steps) == 1` fails on a fresh optimizer: no state at all), and its
    `_init_optimizer_states_with_dummy_values` would take an AdamW step (weight decay moves the
    weights). Zero state is what torch would create; the load overwrites all of it."""
    for inner in _torch_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param,
                                                           memory_format=torch.preserve_format)


def _unshare_adam_steps(optimizer) -> None:
    """megatron 0.16.1's `DistributedOptimizer.load_state_dict` (no TE/Apex) puts *one* `step`
    tensor into every param's state; torch's Adam increments each param's step in place, so the
    shared counter would advance once per param per iteration and bias correction would drift."""
    for inner in _torch_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _current_layout() -> tuple:
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size())


def _saved_layout(common: dict) -> tuple:
    return tuple(common["training"].get("layout", ()))


def training_state_layout() -> dict:
    """Recorded with every save so resume knows whether per-rank RNG can be restored."""
    return {"layout": list(_current_layout())}
