"""Checkpoint reads that never run code from the checkpoint.

A dist_checkpointing directory is mostly pickles, and a pickle can name any function to call while
it loads. Upstream (megatron-core 0.16.1 on torch 2.x) reads them like this:

    file            holds                                   read by (upstream)
    metadata.json   backend names                           `json.load`: safe
    common.pt       scheduler, training state, run config   `TorchCommonLoadStrategy.load_common`:
                                                            `torch.load` with torch's default
                                                            (weights_only since torch 2.6, but
                                                            TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
                                                            turns it off)
    .metadata       DCP `Metadata` (dataclasses)            `FileSystemReader.read_metadata`:
                                                            plain `pickle.load`  <- UNSAFE
    __R_N.distcp    tensors, each `torch.save`d             `FileSystemReader.read_data`:
                                                            `torch.load(weights_only=True)`
                    byte objects (ShardedObjects: our       `DefaultLoadPlanner.load_bytes`:
                    `rng_state`, layers' `_extra_state`)    `torch.load(weights_only=False)`
                                                            <- UNSAFE

`safe_checkpoint_reads()` swaps, for the duration of a `with` block, each of those readers for one
that unpickles with an allow-list, and turns a refusal into one `CheckpointReadError` (a
ValueError) naming the file. The `load*` functions below are the drop-in replacements for
`dist_checkpointing.load*` that every megatron-rlp load goes through.

Why patch rather than pass our own reader: megatron's `TorchDistLoadShardedStrategy.load` builds
its `FileSystemReader` and `MCoreLoadPlanner` itself (`strategies/torch.py`), so a custom
StorageReader cannot be handed in without copying that method; and `load_common_state_dict`
takes no strategy at all. The patches are on the torch classes megatron's subclasses inherit
from, so they also cover any other DCP load made inside the block. They target megatron-core
0.16.1 / torch 2.6+; if an upgrade moves a patched symbol (or a megatron subclass starts
overriding it), entering the block raises instead of silently leaving a reader unguarded.

Not patched, because unreachable: `TorchCommonLoadStrategy.load_sharded_objects` (`torch.load` of
per-object `.pt` files) runs only for sharded strategies that cannot store ShardedObjects, and the
only sharded loader megatron registers is torch_dist, which can (an unknown backend named in
metadata.json is refused by megatron). MultiStorageClient (msc://) readers bypass these classes,
so entering the block refuses to run while that megatron feature is enabled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import pickle
import re
import threading
from typing import Optional

import torch
from torch.futures import Future

# Everything `.metadata` may name, found by saving real checkpoints with our trainer (pretrain,
# RLP with its EMA teacher, DP=2 with the distributed optimizer in bf16; torch 2.13) and recording
# every `find_class` call. Each entry is a plain record or a constant: building one calls its
# dataclass/enum constructor or `__setstate__`, none of which touches files or runs code.
METADATA_GLOBALS = {
    # The root object and its parts: which tensors/objects exist, their shapes and chunks.
    ("torch.distributed.checkpoint.metadata", "Metadata"): "the root object",
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"): "keys of `storage_data`",
    ("torch.distributed.checkpoint.metadata", "StorageMeta"): "save id / checkpoint id strings",
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"): "one tensor's metadata",
    ("torch.distributed.checkpoint.metadata", "TensorProperties"): "its dtype and layout",
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"): "one saved chunk's offsets",
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"): "a byte object's entry",
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"):
        "enum TensorProperties pickles its memory format as",
    # Where each item lives: file name, offset, length.
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): "values of `storage_data`",
    # Recent torch (2.13 here) also stores every rank's save plan (`Metadata.all_local_plans`).
    ("torch.distributed.checkpoint.planner", "SavePlan"): "a rank's save plan",
    ("torch.distributed.checkpoint.planner", "WriteItem"): "one planned write",
    ("torch.distributed.checkpoint.planner", "WriteItemType"): "enum: tensor / shard / bytes",
    ("torch.distributed.checkpoint.planner", "TensorWriteData"): "a planned tensor write",
    # Constants inside TensorProperties.
    ("torch", "Size"): "tensor shapes (a tuple subclass)",
    ("torch.serialization", "_get_layout"): "how torch pickles a layout (lookup by name)",
    # ("torch", <dtype name>): any `torch.dtype` constant (float32, bfloat16, ...): see find_class.
}

# Hooks this module installs while a `safe_checkpoint_reads()` block is active:
# (module, class, attribute, the megatron subclasses that must inherit it unchanged).
_PATCH_TARGETS = (
    ("torch.distributed.checkpoint.filesystem", "FileSystemReader", "read_metadata", ()),
    ("torch.distributed.checkpoint.filesystem", "FileSystemReader", "read_data",
     (("megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader",
       "CachedMetadataFileSystemReader"),)),
    ("torch.distributed.checkpoint.default_planner", "DefaultLoadPlanner", "load_bytes",
     (("megatron.core.dist_checkpointing.strategies.torch", "MCoreLoadPlanner"),)),
    ("megatron.core.dist_checkpointing.strategies.common", "TorchCommonLoadStrategy",
     "load_common", ()),
)

# Other upstream names the hooks rely on (checked with the targets).
_ALSO_REQUIRED = (
    ("torch.distributed.checkpoint.filesystem", "FileSystemReader", "_get_metadata_path"),
    ("torch.distributed.checkpoint.default_planner", None, "set_element"),
    ("megatron.core.dist_checkpointing.strategies.common", None, "COMMON_STATE_FNAME"),
)

_REFUSED_HINT = ("which megatron-rlp does not load (only tensors and checkpoint metadata): the "
                 "checkpoint was tampered with or was not written by megatron-rlp")


class CheckpointReadError(ValueError):
    """A checkpoint file megatron-rlp refuses to unpickle (or cannot parse); the message names
    the file. A ValueError, so command-line tools print it as one line."""


# --------------------------------------------------------------------------- unpicklers

class _MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only `METADATA_GLOBALS` and torch dtypes."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS:
            return getattr(importlib.import_module(module), name)
        # `vars(torch)`, not getattr: torch's module __getattr__ imports submodules lazily.
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        raise _refuse(self._path, f"{module}.{name}")

    def persistent_load(self, pid):
        raise _refuse(self._path, "a persistent reference")


def _refuse(path: str, what: str) -> CheckpointReadError:
    """The error for a refused global, recorded so `load` can report it even where torch's
    checkpoint code swallows or re-wraps exceptions (see `_first_refusal`)."""
    kind = what if what.startswith("a ") else f"of type {what}"
    error = CheckpointReadError(f"checkpoint {path} holds a pickled object {kind}, "
                                f"{_REFUSED_HINT}")
    _record(error)
    return error


def _from_unpickling_error(path: str, error: pickle.UnpicklingError) -> CheckpointReadError:
    """Turn torch's multi-paragraph weights_only message into one line naming `path`."""
    text = str(error)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return _refuse(path, match.group(1))
    detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
    detail = next((line.strip() for line in detail if line.strip()), "unreadable pickle")
    result = CheckpointReadError(f"checkpoint {path} holds pickled data megatron-rlp does not "
                                 f"load ({detail[:200]}): the checkpoint is damaged, was tampered "
                                 "with, or was not written by megatron-rlp")
    _record(result)
    return result


def _torch_load_weights_only(source, path: str):
    """`torch.load(source, weights_only=True)` onto the CPU; a refusal names `path`."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _from_unpickling_error(path, error) from None


def read_metadata_file(path: str):
    """Unpickle a DCP `.metadata` file with the allow-list and check that every data file it
    names is a plain file name inside the checkpoint directory."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except CheckpointReadError:
            raise
        except Exception as error:  # truncated or garbled: still one line naming the file
            raise CheckpointReadError(f"checkpoint {path} is not readable DCP metadata "
                                      f"({type(error).__name__}: {error})") from None
    if not isinstance(metadata, Metadata):
        raise _refuse(path, f"{type(metadata).__module__}.{type(metadata).__qualname__}")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise CheckpointReadError(f"checkpoint {path} names data file {name!r}, outside its "
                                      "directory: the checkpoint was tampered with or was not "
                                      "written by megatron-rlp")
    return metadata


# --------------------------------------------------------------------------- the hooks

def _safe_read_metadata(self, *args, **kwargs):
    """Stands in for `FileSystemReader.read_metadata` (plain `pickle.load` upstream)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = os.fspath(self._get_metadata_path(kwargs.get("rank")))
    metadata = read_metadata_file(path)
    # What upstream does after unpickling: tag the metadata with this load's id.
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _safe_load_bytes(self, read_item, value: io.BytesIO) -> None:
    """Stands in for `DefaultLoadPlanner.load_bytes`: the same, with `weights_only=True`.
    An UnpicklingError is named by `_read_data_per_file`, which knows the file."""
    # The very helper upstream's load_bytes uses (default_planner imports it from `_traverse`).
    from torch.distributed.checkpoint.default_planner import set_element

    obj = torch.load(value, map_location="cpu", weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def _make_read_data(original):
    def _read_data_per_file(self, plan, planner):
        """Wraps `FileSystemReader.read_data`: one call per data file, so an unpickling error
        (from a tensor or a byte object) is reported with the file it came from."""
        per_file: dict = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path,
                                []).append(item)
        for relative_path, items in per_file.items():
            path = os.path.join(os.fspath(self.path), relative_path)
            try:
                original(self, dataclasses.replace(plan, items=items), planner).wait()
            except pickle.UnpicklingError as error:
                raise _from_unpickling_error(path, error) from None
        done: Future = Future()
        done.set_result(None)
        return done

    return _read_data_per_file


def _safe_load_common(self, checkpoint_dir):
    """Stands in for `TorchCommonLoadStrategy.load_common`: `weights_only=True` explicitly, so no
    environment variable can turn it off. A missing file keeps megatron's own error."""
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    path = os.path.join(os.fspath(checkpoint_dir), COMMON_STATE_FNAME)
    if not os.path.isfile(path):
        return _ORIGINALS[("TorchCommonLoadStrategy", "load_common")](self, checkpoint_dir)
    return _torch_load_weights_only(path, path)


# --------------------------------------------------------------------------- the scope

_LOCK = threading.RLock()
_DEPTH = 0
_ORIGINALS: dict = {}
_LOCAL = threading.local()


def _record(error: CheckpointReadError) -> None:
    """Note a refusal in this thread's innermost `safe_checkpoint_reads` block."""
    scopes = getattr(_LOCAL, "scopes", None)
    if scopes:
        scopes[-1].append(error)


def _resolve_targets() -> list:
    """[(class, attribute)] to patch, after checking upstream still looks as expected."""
    resolved = []
    for module_name, class_name, attr, heirs in _PATCH_TARGETS:
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if cls is None or attr not in vars(cls):
            raise RuntimeError(f"megatron-rlp safe checkpoint loading: {module_name}.{class_name}"
                               f".{attr} not found; this guard targets megatron-core==0.16.1 on "
                               "torch>=2.6: refusing to load checkpoints unguarded")
        for heir_module, heir_name in heirs:
            heir = getattr(importlib.import_module(heir_module), heir_name)
            if attr in vars(heir):
                raise RuntimeError(f"megatron-rlp safe checkpoint loading: {heir_module}."
                                   f"{heir_name} now overrides {attr}; refusing to load "
                                   "checkpoints unguarded")
        resolved.append((cls, attr))
    for module_name, class_name, attr in _ALSO_REQUIRED:
        owner = importlib.import_module(module_name)
        owner = getattr(owner, class_name, None) if class_name else owner
        if not hasattr(owner, attr):
            raise RuntimeError(f"megatron-rlp safe checkpoint loading: {module_name}."
                               f"{class_name + '.' if class_name else ''}{attr} not found; "
                               "refusing to load checkpoints unguarded")
    return resolved


def _install() -> None:
    from megatron.core.msc_utils import MultiStorageClientFeature

    if MultiStorageClientFeature.is_enabled():
        raise RuntimeError("megatron-rlp loads checkpoints only from local paths: megatron's "
                           "MultiStorageClient feature is enabled, and its readers unpickle "
                           "without an allow-list")
    targets = _resolve_targets()
    for cls, attr in targets:
        _ORIGINALS[(cls.__name__, attr)] = vars(cls)[attr]
    replacements = {
        "read_metadata": _safe_read_metadata,
        "read_data": _make_read_data(_ORIGINALS[("FileSystemReader", "read_data")]),
        "load_bytes": _safe_load_bytes,
        "load_common": _safe_load_common,
    }
    for cls, attr in targets:
        setattr(cls, attr, replacements[attr])


def _uninstall() -> None:
    for cls_module, cls_name, attr, _ in _PATCH_TARGETS:
        cls = getattr(importlib.import_module(cls_module), cls_name)
        setattr(cls, attr, _ORIGINALS.pop((cls_name, attr)))


@contextlib.contextmanager
def safe_checkpoint_reads():
    """Within the block, every checkpoint read through megatron's dist_checkpointing (and torch's
    DCP FileSystemReader) unpickles with an allow-list. Re-entrant and thread-safe: the hooks are
    installed by the outermost block and removed when the last one exits. Yields the list of
    refusals recorded in this block (the first is what `load` reports)."""
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            _install()
        _DEPTH += 1
    if not hasattr(_LOCAL, "scopes"):
        _LOCAL.scopes = []
    scopes = _LOCAL.scopes
    refusals: list = []
    scopes.append(refusals)
    try:
        yield refusals
    finally:
        scopes.pop()
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _uninstall()


def _first_refusal(error: BaseException, recorded: list) -> Optional[CheckpointReadError]:
    """The refusal behind `error`. torch's DCP wraps a rank's exception into a
    `CheckpointException` (a BaseException) holding every rank's failure, and after a failed
    `.metadata` read it retries a per-rank file and raises an AssertionError instead, so look in
    what this rank recorded first, then in the other ranks' failures and the cause chain."""
    from megatron_rlp.training.dcp_errors import failure_chain

    if recorded:
        return recorded[0]
    return next((e for e in failure_chain(error) if isinstance(e, CheckpointReadError)), None)


@contextlib.contextmanager
def _reraising_refusals():
    from torch.distributed.checkpoint.api import CheckpointException

    with safe_checkpoint_reads() as recorded:
        try:
            yield
        except (Exception, CheckpointException) as error:
            refusal = _first_refusal(error, recorded)
            if refusal is None or refusal is error:
                raise
            raise refusal from None


def load_common_state_dict(ckpt_dir: str) -> dict:
    """`dist_checkpointing.load_common_state_dict`, reading `common.pt` with weights_only."""
    from megatron.core import dist_checkpointing

    with _reraising_refusals():
        return dist_checkpointing.load_common_state_dict(ckpt_dir)


def load_tensors_metadata(ckpt_dir: str) -> dict:
    """`dist_checkpointing.load_tensors_metadata`, unpickling `.metadata` with the allow-list."""
    from megatron.core import dist_checkpointing

    with _reraising_refusals():
        return dist_checkpointing.load_tensors_metadata(ckpt_dir)


def load(sharded_state_dict: dict, ckpt_dir: str, **kwargs) -> dict:
    """`dist_checkpointing.load` with every read guarded; a refusal on any rank is raised as
    that rank's one-line `CheckpointReadError`, not torch's multi-rank CheckpointException."""
    from megatron.core import dist_checkpointing

    with _reraising_refusals():
        return dist_checkpointing.load(sharded_state_dict, ckpt_dir, **kwargs)
