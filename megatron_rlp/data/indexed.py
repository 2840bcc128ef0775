"""Write Megatron `<prefix>.bin/.idx` with megatron-core's own IndexedDatasetBuilder.

Using upstream's writer (not a copy of the format) means megatron-core's `IndexedDataset` reads the
files unchanged, whatever version of the format it expects. One sequence per document, as Megatron's
`tools/preprocess_data.py` writes without `--split-sentences`.

Atomicity: the builder writes `<prefix>.bin.tmp-<pid>` / `.idx.tmp-<pid>`; only when both are
complete is any old `.idx` removed, then `.bin` and `.idx` are renamed into place, index last.
A reader therefore sees either the old pair, no `.idx` (a clear "missing file" error), or the new
pair — never a new index over an old data file. A failure removes the temp files.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np


def optimal_dtype(vocab_size: int) -> type:
    """uint16 while every id fits (half the disk and page cache), else int32 — Megatron's rule."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def import_indexed_dataset():
    """megatron.core.datasets.indexed_dataset, importing megatron-core quietly.

    megatron-core's package __init__ warns three times that TransformerEngine/Apex are missing;
    that is expected on CPU and says nothing about the data path, so it is silenced here only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class IndexedWriter:
    """Streaming form of `write_indexed_dataset`: `add(tokens)` per document, then `finalize()`.

    Use as a context manager: leaving the block by an exception discards everything written.
    """

    def __init__(self, prefix: str, dtype=np.int32):
        self.prefix = prefix
        self.dtype = np.dtype(dtype).type
        folder = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"output folder {folder!r} does not exist (prefix {prefix!r})")
        self._tmp_bin = f"{prefix}.bin.tmp-{os.getpid()}"
        self._tmp_idx = f"{prefix}.idx.tmp-{os.getpid()}"
        self._builder = import_indexed_dataset().IndexedDatasetBuilder(self._tmp_bin,
                                                                       dtype=self.dtype)
        self.num_docs = 0
        self.num_tokens = 0
        self._done = False
        self._max = np.iinfo(self.dtype).max

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() > self._max):
            raise ValueError(f"token ids must lie in [0, {self._max}] for dtype "
                             f"{np.dtype(self.dtype).name}; got [{arr.min()}, {arr.max()}]")
        arr = arr.astype(self.dtype, copy=False)
        # add_document(tensor, lengths): writes the bytes, then one sequence of len(arr) tokens.
        self._builder.add_document(arr, [int(arr.size)])
        self.num_docs += 1
        self.num_tokens += int(arr.size)

    def add_many(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Add len(lengths) documents stored back to back in `flat` (one range check for all)."""
        flat = np.asarray(flat)
        if flat.size and (flat.min() < 0 or flat.max() > self._max):
            raise ValueError(f"token ids must lie in [0, {self._max}] for dtype "
                             f"{np.dtype(self.dtype).name}; got [{flat.min()}, {flat.max()}]")
        flat = flat.astype(self.dtype, copy=False)
        start = 0
        for n in np.asarray(lengths).tolist():
            self._builder.add_document(flat[start:start + n], [n])
            start += n
        if start != flat.size:
            raise ValueError(f"lengths sum to {start} but {flat.size} tokens were given")
        self.num_docs += len(lengths)
        self.num_tokens += int(flat.size)

    def finalize(self) -> str:
        self._builder.finalize(self._tmp_idx)
        bin_path, idx_path = f"{self.prefix}.bin", f"{self.prefix}.idx"
        if os.path.exists(idx_path):
            os.unlink(idx_path)
        os.replace(self._tmp_bin, bin_path)
        os.replace(self._tmp_idx, idx_path)
        self._done = True
        return self.prefix

    def discard(self) -> None:
        if not self._done:
            try:
                self._builder.data_file.close()
            except Exception:
                pass
            for p in (self._tmp_bin, self._tmp_idx):
                if os.path.exists(p):
                    os.unlink(p)
            self._done = True

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()


def write_indexed_dataset(prefix: str, documents_token_lists: Iterable[Sequence[int]],
                          dtype: Optional[type] = None) -> str:
    """Write documents (each a sequence of token ids) to `<prefix>.bin/.idx`; returns `prefix`.

    `dtype=None` picks uint16 when the largest id fits, else int32 (this materialises the
    documents once to find the largest id). Files appear only when complete.
    """
    if dtype is None:
        docs = [np.asarray(d) for d in documents_token_lists]
        top = max((int(d.max()) for d in docs if d.size), default=0)
        dtype = optimal_dtype(top + 1)
        documents_token_lists = docs
    with IndexedWriter(prefix, dtype) as writer:
        for doc in documents_token_lists:
            writer.add(doc)
        return writer.finalize()


def read_indexed_dataset(prefix: str):
    """Open `<prefix>.bin/.idx` with megatron-core's `IndexedDataset` (for tools and tests).

    Keep the returned object alive while using arrays it returned: they view its memory map,
    which its `__del__` closes (a read after that is a segmentation fault, not an exception).
    """
    return import_indexed_dataset().IndexedDataset(prefix, multimodal=False, mmap=True)


def count_tokens(prefix: str) -> int:
    """Tokens in `<prefix>.bin`, from its index (no token is read)."""
    dataset = read_indexed_dataset(prefix)  # keep it alive: its arrays view a closing mmap
    return int(np.asarray(dataset.sequence_lengths, dtype=np.int64).sum())
