"""Pretraining datasets over Megatron .bin/.idx, built by megatron-core itself.

`build_pretraining_dataset` hands a Megatron-style blend to megatron-core's
`BlendedMegatronDatasetBuilder` with a `GPTDatasetConfig`, so sample order, packing across
document boundaries, multi-epoch shuffling and blending are upstream's, bit for bit:

    data_path = ["prefix"]                       one GPTDataset
    data_path = ["w1", "prefix1", "w2", "prefix2"] a BlendedDataset drawing in proportion to w_i
    data_path = ["prefix1", "prefix2"]           a BlendedDataset weighted by dataset size

The whole blend serves the one split asked for (`blend_per_split`), rather than cutting every
prefix by a "99,1,0" split string: a held-out set is its own prefix (e.g. the embedded
`embedded_valid_text_document`), so train and validation never share documents.

Upstream's order is kept for the first epoch of every source; a run that needs more samples reads
further passes, each a seeded permutation of the first (`PretrainingDataset`), instead of asking
upstream for more epochs, which would reshuffle the samples already read: extending --train-iters
never changes the data of the iterations already run.

Sample i (shapes [seq_length]): tokens int64, labels int64 = tokens shifted left by one (upstream
draws seq_length + 1 tokens), loss_mask float32 (all ones), position_ids int64 0..seq_length-1
(megatron's defaults: --reset-attention-mask, --reset-position-ids and --eod-mask-loss are applied
from the tokens in the trainer's forward step, `document_inputs.py`, so the cached indices never
depend on them), dataset_id int (index into `.prefixes`). Index i is a pure function of (files,
weights, seq_length, seed), whatever number of samples was planned: the trainer resumes by
skipping consumed samples.

Index files (document/sample/shuffle .npy) are cached in `cache_dir`, default `<folder of the
first prefix>/index-cache`, under names hashing the config, the tokenizer and the data files' sizes
and mtimes (data rewritten under the same prefix gets fresh indices). With torch.distributed
initialised, megatron-core builds them on rank 0 first and the other ranks load them after a
barrier: call this on every rank (it is collective). Before that, every file's token ids are
checked against the tokenizer's vocabulary (`token_range.py`: one scan per file, cached there).
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_rlp.data.token_range import check_token_ids_rank_zero_first

SPLITS = ("train", "valid", "test")
_FIX = "build it with tools/preprocess_data.py, or run examples/demo.sh for the embedded default"
_INDEX_HEADER = b"MMIDIDX\x00\x00"


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], Optional[list[float]]]:
    """Split a Megatron `--data-path` list into (prefixes, weights or None), validating its form."""
    items = [data_path] if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise ValueError(f"--data-path is empty; give a prefix or weight/prefix pairs ({_FIX})")

    def as_weight(s: str) -> Optional[float]:
        try:
            return float(s)
        except ValueError:
            return None

    numeric = [as_weight(s) is not None for s in items]
    if len(items) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2]):
        weights = [as_weight(s) for s in items[0::2]]
        prefixes = items[1::2]
        for w, p in zip(weights, prefixes):
            if not math.isfinite(w) or w <= 0:
                raise ValueError(f"--data-path weight {w} for {p!r} must be a finite number > 0 "
                                 f"(leave the entry out to skip a source)")
    elif not any(numeric):
        weights, prefixes = None, items
    else:
        raise ValueError(
            f"--data-path {items} mixes weights and prefixes; give either prefixes only or "
            f"'weight prefix' pairs such as ['0.7', 'a_text_document', '0.3', 'b_text_document']"
        )
    # A prefix names two files; tolerate the common slip of passing one of them.
    prefixes = [p[:-4] if p.endswith((".bin", ".idx")) else p for p in prefixes]
    return prefixes, weights


def check_data_files(prefixes: Sequence[str]) -> None:
    """FileNotFoundError naming each missing .bin/.idx; ValueError for a foreign .idx or no data."""
    missing = [p + ext for p in prefixes for ext in (".bin", ".idx") if not os.path.isfile(p + ext)]
    if missing:
        raise FileNotFoundError(
            f"--data-path: missing {', '.join(missing)}; {_FIX}"
        )
    for p in prefixes:
        with open(p + ".idx", "rb") as f:
            if f.read(len(_INDEX_HEADER)) != _INDEX_HEADER:
                raise ValueError(f"{p}.idx is not a Megatron index file (bad header); rebuild it: "
                                 f"{_FIX}")
        if os.path.getsize(p + ".bin") == 0:
            # megatron-core would loop forever adding epochs of zero tokens to reach num_samples.
            raise ValueError(f"{p}.bin holds no tokens; check the input it was built from")


def ensure_helpers() -> None:
    """Make sure megatron-core's C++ dataset helpers import (sample and blend index builders).

    PyPI wheels of megatron-core ship them compiled (`helpers_cpp*.so`); a source install has
    only helpers.cpp, which upstream builds with `make` (needs a C++ compiler and pybind11).
    """
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
        return
    except ImportError:
        pass
    from megatron.core.datasets.utils import compile_helpers

    try:
        compile_helpers()  # calls sys.exit(1) on failure
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except (SystemExit, ImportError) as e:
        raise RuntimeError(
            "megatron-core's C++ dataset helpers are not built and compiling them failed; install "
            "a C++ compiler, make and pybind11 (pip install pybind11), or reinstall the "
            "megatron-core==0.16.1 wheel from PyPI, which ships them compiled"
        ) from e


@contextlib.contextmanager
def _rank_zero_when_not_distributed():
    """Let megatron-core's BlendedDataset build its cache in a plain, non-distributed process.

    Upstream `BlendedDataset._build_indices` (blended_dataset.py, core_v0.16.1) calls
    `torch.distributed.get_rank()` without first checking `is_initialized()` (GPTDataset does
    check), so a weighted blend with a cache folder fails outside torchrun. While building, and
    only when no process group exists, `get_rank` answers 0 — what a 1-process group would say.
    """
    if torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


class _TokenizerView:
    """What megatron-core's dataset code reads from a tokenizer, and nothing else.

    `pad` is reported as -1 (megatron's "never present" id) when it equals `eod`: upstream would
    otherwise warn and do the same, and must not mask the loss of real <eod> tokens.
    """

    def __init__(self, tokenizer, data_files: list):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        pad = getattr(tokenizer, "pad", None)
        self.pad = -1 if pad is None or pad == self.eod else pad
        ids = getattr(tokenizer, "unique_identifiers", None) or OrderedDict(
            [("class", type(tokenizer).__name__), ("vocab_size", self.vocab_size),
             ("eod", self.eod)]
        )
        # megatron-core names its cached indices by an MD5 of the config, in which the tokenizer
        # is the only free-form field; the data files' sizes and mtimes go here so that data
        # rewritten under the same prefix (e.g. a rebuilt embedded set) never reuses stale indices.
        self.unique_identifiers = OrderedDict(ids, data_files=data_files)


def _fingerprint(prefixes: Sequence[str]) -> list:
    out = []
    for p in prefixes:
        for ext in (".bin", ".idx"):
            st = os.stat(p + ext)
            out.append([os.path.abspath(p + ext), st.st_size, st.st_mtime_ns])
    return out


class PretrainingDataset(torch.utils.data.Dataset):
    """Map-style view over a megatron-core GPTDataset / BlendedDataset; see the module docstring.

    `megatron_dataset` holds one pass (`epoch_size` samples). Sample i reads pass i // epoch_size:
    the first pass in upstream's order, every later pass in a fresh permutation of it seeded by
    (seed, pass). A sample's index therefore never depends on how many samples the run planned.
    """

    def __init__(self, megatron_dataset, prefixes: list[str], weights: Optional[list[float]],
                 num_samples: int, split: str, seed: int = 0):
        self.megatron_dataset = megatron_dataset
        self.prefixes = prefixes
        self.weights = weights
        self.num_samples = num_samples
        self.split = split
        self.seed = seed
        self.epoch_size = len(megatron_dataset)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        # Whole passes, at least num_samples.
        return max(1, math.ceil(self.num_samples / self.epoch_size)) * self.epoch_size

    def pass_order(self, epoch: int) -> Optional[np.ndarray]:
        """Upstream index of each position of pass `epoch` (None: pass 0, upstream's own order)."""
        if epoch == 0:
            return None
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(self.epoch_size)
        return self._orders[epoch]

    def upstream_index(self, idx: int) -> int:
        epoch, position = divmod(idx, self.epoch_size)
        order = self.pass_order(epoch)
        return position if order is None else int(order[position])

    def __getitem__(self, idx: int) -> dict:
        if idx < 0 or idx >= len(self):
            raise IndexError(f"sample {idx} out of range [0, {len(self)})")
        s = self.megatron_dataset[self.upstream_index(idx)]
        return {
            "tokens": s["tokens"].to(torch.int64),
            "labels": s["labels"].to(torch.int64),
            "loss_mask": s["loss_mask"].to(torch.float32),
            "position_ids": s["position_ids"].to(torch.int64),
            "dataset_id": int(s.get("dataset_id", 0)),
        }

    def draws_per_source(self, num_samples: int) -> np.ndarray:
        """How many of the first `num_samples` samples each prefix supplies."""
        index = getattr(self.megatron_dataset, "dataset_index", None)
        if index is None and hasattr(self.megatron_dataset, "path_to_dataset_index"):
            index = np.load(self.megatron_dataset.path_to_dataset_index, mmap_mode="r")
        if index is None:  # one prefix: a plain GPTDataset
            return np.array([num_samples])
        index = np.asarray(index)
        full, rest = divmod(num_samples, self.epoch_size)
        counts = full * np.bincount(index, minlength=len(self.prefixes))
        order = self.pass_order(full)
        tail = index[:rest] if order is None else index[order[:rest]]
        return counts + np.bincount(tail, minlength=len(self.prefixes))


def refuse_object_arrays(cache_dir: str) -> None:
    """Raise if any `.npy` under `cache_dir` holds Python objects (a pickle) rather than numbers.
    Only the header is read; the arrays are not loaded."""
    if not os.path.isdir(cache_dir):
        return
    for root, _, files in os.walk(cache_dir):
        for name in files:
            if not name.endswith(".npy"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    _, _, dtype = read_header(f)
            except (OSError, ValueError) as error:
                raise ValueError(f"dataset index cache {path} is not a numpy array file "
                                 f"({error}); delete it (it is rebuilt)") from None
            if dtype.hasobject:
                raise ValueError(f"dataset index cache {path} holds pickled Python objects, which "
                                 "megatron-rlp never writes and would not load (they can run "
                                 "code); delete the file (it is rebuilt)")


def _samples_per_epoch(prefix: str, seq_length: int) -> int:
    """Samples in one pass over `prefix` (upstream draws seq_length + 1 tokens, overlapping by
    one, so every token but the last is an input)."""
    from megatron_rlp.data.indexed import count_tokens

    return (count_tokens(prefix) - 1) // seq_length


def _single_pass_request(prefixes: list[str], weights: Optional[list[float]], seq_length: int,
                         num_samples: int, surplus: float) -> int:
    """How many samples to ask megatron-core for so that no source is read past its first epoch.

    Upstream shuffles all the epochs a request needs together, so asking for more samples reorders
    the first ones (e.g. extending --train-iters across an epoch boundary). Within one epoch of
    every source its order is a prefix-stable function of the request, and the trainer's own
    passes (`PretrainingDataset`) take over beyond it. A source too small to fill one sample in
    one epoch keeps upstream's multi-epoch plan.
    """
    if weights is None and len(prefixes) > 1:
        return num_samples  # blended by size: upstream builds one epoch of each source already
    epochs = [_samples_per_epoch(p, seq_length) for p in prefixes]
    if min(epochs) < 1:
        return num_samples
    if weights is None:
        return min(num_samples, epochs[0])
    total = sum(weights)
    # Upstream asks source i for ceil(ceil(n * w_i) * (1 + surplus)) samples of a blend of n.
    def fits(n: int) -> bool:
        return all(math.ceil(math.ceil(n * w / total) * (1 + surplus)) <= e
                   for w, e in zip(weights, epochs))

    low, high = 0, num_samples
    while low < high:  # the largest n <= num_samples that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low if low >= 1 else num_samples


def build_pretraining_dataset(data_path: Sequence[str] | str, seq_length: int, num_samples: int,
                              seed: int, tokenizer, split: str = "train",
                              cache_dir: Optional[str] = None) -> PretrainingDataset:
    """Dataset of `num_samples` (or more) packed samples of `seq_length` tokens from `data_path`."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} must be one of {', '.join(SPLITS)}")
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"--seq-length must be a positive int, got {seq_length!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    prefixes, weights = parse_data_path(data_path)
    check_data_files(prefixes)
    if len(prefixes) == 1:
        weights = None  # one source: a plain GPTDataset, no blending index

    ensure_helpers()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
    # Before any index is built: an id >= vocab would otherwise surface as an IndexError mid-run.
    check_token_ids_rank_zero_first(prefixes, tokenizer.vocab_size, cache_dir)
    # megatron reads its index cache with numpy.load(allow_pickle=True): a received run directory
    # could carry a pickle there. Our indices are plain integer arrays; anything else is refused.
    refuse_object_arrays(cache_dir)
    split_index = SPLITS.index(split)
    blend = ([os.path.abspath(p) for p in prefixes], weights)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[blend if i == split_index else None for i in range(len(SPLITS))],
        path_to_cache=os.path.abspath(cache_dir),
        tokenizer=_TokenizerView(tokenizer, _fingerprint(prefixes)),
        # Document masks, positions and the <eod> loss mask: see the module docstring.
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    request = _single_pass_request(prefixes, weights, seq_length, num_samples,
                                   config.mid_level_dataset_surplus)
    sizes = [request if i == split_index else None for i in range(len(SPLITS))]
    with _rank_zero_when_not_distributed():
        built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    dataset = built[split_index]
    if dataset is None or len(dataset) == 0:
        raise ValueError(
            f"{split} data {prefixes} yields no samples of {seq_length} tokens; add data or "
            f"lower --seq-length"
        )
    return PretrainingDataset(dataset, prefixes, weights, num_samples, split, seed)
