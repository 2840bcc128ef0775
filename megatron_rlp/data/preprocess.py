"""Parallel tokenisation workers for `tools/preprocess_data.py`, and the writer of their output.

They live in the package, not in the tool script, so that `spawn`ed worker processes can import
them however the tool was started (as a script, or loaded in-process by a test or another tool).
We spawn rather than fork: forking a process that already runs threads (torch, tokenizers, a
trainer's gloo group) can deadlock a worker on a lock that was held at fork time.

Empty documents follow Megatron-LM's `tools/preprocess_data.py` (core_v0.16.1, `Encoder.encode`)
exactly: a text that tokenises to no ids gets no sequence and no end-of-document token, but still
an entry in the document index (two equal consecutive `document_indices`), separately for each
key. So every key's output has one document per input document, while the sequence counts of the
keys can differ.
"""
from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np

from megatron_rlp.data.indexed import IndexedWriter
from megatron_rlp.data.tokenizer import build_tokenizer

# Per-process state set by init_worker (the pool initializer, or directly when --workers 1).
_STATE: dict = {}

# Long documents are tokenised in pieces of at most PIECE_CHARS characters. Why: an HF tokenizer
# holds ~250 bytes per input character while it encodes one string (alignments, offsets, token
# strings), so one 50 MB JSONL line took 10 GB RSS; in pieces the encodings alive at once stay
# under ~70 MB whatever the document's length (and encoding is faster). A piece ends just before
# a whitespace character that is followed by a non-whitespace one, which for GPT-2-style regex
# pre-tokenizers (the embedded tokenizer included) is always a pre-token boundary, so the ids
# equal whole-document tokenization. A tokenizer that treats the start of a string specially
# (SentencePiece's Metaspace prefix, a stripping normalizer) may tokenise the characters at each
# seam differently, and a stretch of PIECE_CHARS / 2 characters without such a boundary is cut
# hard. Shorter documents are never cut.
PIECE_CHARS = 1 << 17
# At most this many characters go to one encode_batch call, bounding the encodings alive at once.
BATCH_CHARS = 1 << 18
_SEAM = re.compile(r"\s(?=\S)")


def split_long_text(text: str, limit: Optional[int] = None) -> Iterator[str]:
    """`text` in consecutive pieces of at most `limit` (default PIECE_CHARS) characters."""
    limit = limit or PIECE_CHARS
    start = 0
    while len(text) - start > limit:
        seam = None
        for seam in _SEAM.finditer(text, start + limit // 2, start + limit):
            pass
        end = seam.start() if seam is not None else start + limit
        yield text[start:end]
        start = end
    yield text[start:]


def encode_documents(tok, texts: list[str], eod: Optional[int], dtype) -> tuple:
    """(flat ids of all `texts` with `eod` after each non-empty one when given, per-document
    lengths), encoding at most BATCH_CHARS characters at a time. A text of no ids stays empty,
    without `eod` (Megatron-LM's rule)."""
    lengths = np.zeros(len(texts), dtype=np.int64)
    flats, batch, batch_chars = [], [], 0  # batch: (piece, document index, is its last piece)

    def flush():
        encoded = tok.encode_batch([piece for piece, _, _ in batch])
        for ids, (_, doc, last) in zip(encoded, batch):
            # Earlier pieces of `doc` were counted in `lengths` by earlier flushes.
            if last and eod is not None and lengths[doc] + len(ids) > 0:
                ids.append(eod)
            lengths[doc] += len(ids)
        flats.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype,
                                 count=sum(map(len, encoded))))
        batch.clear()

    for doc, text in enumerate(texts):
        pieces = split_long_text(text)
        piece = next(pieces)
        for following in itertools.chain(pieces, [None]):  # one ahead: is `piece` the last?
            batch.append((piece, doc, following is None))
            batch_chars += len(piece)
            if batch_chars >= BATCH_CHARS:
                flush()
                batch_chars = 0
            piece = following
    if batch:
        flush()
    flat = np.concatenate(flats) if flats else np.empty(0, dtype=dtype)
    return flat, lengths


def init_worker(tokenizer_type: str, tokenizer_model: Optional[str], json_keys: list[str],
                 append_eod: bool, dtype_name: str) -> None:
    # Parallelism comes from --workers; a hidden thread pool per worker would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    _STATE.update(tokenizer=tok, keys=json_keys, eod=tok.eod if append_eod else None,
                  dtype=np.dtype(dtype_name))


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op).

    Why: a pool worker only notices a dead parent when it next reads its task queue, so after a
    SIGKILLed preprocess run it kept tokenising its current chunk (minutes, and GBs of RSS, for
    a giant document) as an orphan. The parent's pid is checked after the call, closing the race
    in which the parent dies before the signal is armed."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # already orphaned


def _init_pool_worker(*initargs) -> None:
    die_with_parent()
    init_worker(*initargs)


@dataclass
class Chunk:
    """A work unit: numbered documents of one input file.

    `items` holds (number, payload): for JSON lines the line number and the raw line (parsed in
    the worker, where the CPU time is), for Parquet rows (`rows=True`) the 0-based row index and
    a tuple with one text (or None for a null) per --json-keys column."""
    source: str
    items: list[tuple[int, Union[bytes, tuple]]]
    rows: bool = False

    def where(self, number: int) -> str:
        return f"{self.source}: row index {number}" if self.rows else f"{self.source}:{number}"


def _texts_of_line(raw: bytes, keys: list[str]) -> Union[list[str], str]:
    """The texts of one JSON line, one per key, or the reason it is malformed."""
    try:
        doc = json.loads(raw)  # bytes: decoded as UTF-8, errors raise ValueError
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(doc, dict):
        return f"expected a JSON object, got {type(doc).__name__}"
    for k in keys:
        if k not in doc:
            return f"key {k!r} is missing"
        if not isinstance(doc[k], str):
            return f"key {k!r} is of type {type(doc[k]).__name__}, not a string"
    return [doc[k] for k in keys]


def _texts_of_row(row: tuple, keys: list[str]) -> Union[list[str], str]:
    """The texts of one Parquet row (column types were checked when the file was opened)."""
    for k, text in zip(keys, row):
        if text is None:
            return f"column {k!r} is null"
    return list(row)


def encode_chunk(chunk: Chunk) -> tuple[list, list]:
    """A chunk → (errors ["FILE:LINE: reason" or "FILE: row index N: reason"],
    [(tokens, lengths) per key]).

    The documents of a chunk travel back as one flat array plus their lengths per key: pickling
    thousands of small arrays would cost the parent more than writing them.
    """
    tok, keys, eod, dtype = _STATE["tokenizer"], _STATE["keys"], _STATE["eod"], _STATE["dtype"]
    errors, texts = [], {k: [] for k in keys}
    for number, payload in chunk.items:
        if chunk.rows:
            found = _texts_of_row(payload, keys)
        elif payload.strip():
            found = _texts_of_line(payload, keys)
        else:
            continue  # a blank line
        if isinstance(found, str):
            errors.append(f"{chunk.where(number)}: {found}")
            continue
        for k, text in zip(keys, found):
            texts[k].append(text)
    per_key = [encode_documents(tok, texts[k], eod, dtype) for k in keys]
    return errors, per_key


def ordered_results(chunks: Iterator, workers: int, initargs: tuple) -> Iterator[tuple]:
    """Encoded chunks in input order; at most 4 chunks per worker in flight (bounded memory)."""
    if workers == 1:
        init_worker(*initargs)
        for chunk in chunks:
            yield encode_chunk(chunk)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_pool_worker, initargs) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class MegatronDocumentWriter(IndexedWriter):
    """`IndexedWriter` that stores a document of zero tokens as Megatron-LM does: an entry in the
    document index with no sequence (IndexedWriter would write a zero-length sequence)."""

    def add_many(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        empty = np.flatnonzero(lengths == 0).tolist()
        if not empty:
            super().add_many(flat, lengths)
            return
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        begin = 0
        for stop in empty + [len(lengths)]:  # runs of non-empty documents between empty ones
            if stop > begin:
                super().add_many(flat[offsets[begin]:offsets[stop]], lengths[begin:stop])
            if stop < len(lengths):
                # megatron-core's builder: no bytes, no sequence length, one document index.
                self._builder.add_document(np.empty(0, dtype=self.dtype), [])
                self.num_docs += 1
            begin = stop + 1
