"""Parallel tokenisation workers for `tools/preprocess_data.py`.

They live in the package, not in the tool script, so that `spawn`ed worker processes can import
them however the tool was started (as a script, or loaded in-process by a test or another tool).
We spawn rather than fork: forking a process that already runs threads (torch, tokenizers, a
trainer's gloo group) can deadlock a worker on a lock that was held at fork time.
"""
from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
import re
from typing import Iterator, Optional

import numpy as np

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
    """(flat ids of all `texts` with `eod` after each when given, per-document lengths),
    encoding at most BATCH_CHARS characters at a time."""
    lengths = np.zeros(len(texts), dtype=np.int64)
    flats, batch, batch_chars = [], [], 0  # batch: (piece, document index, is its last piece)

    def flush():
        encoded = tok.encode_batch([piece for piece, _, _ in batch])
        for ids, (_, doc, last) in zip(encoded, batch):
            if last and eod is not None:
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


def encode_chunk(chunk: list[tuple[int, bytes]]) -> tuple[list, list]:
    """[(line number, raw line)] → (errors [(lineno, reason)], [(tokens, lengths) per key]).

    The documents of a chunk travel back as one flat array plus their lengths per key: pickling
    thousands of small arrays would cost the parent more than writing them.
    """
    tok, keys, eod, dtype = _STATE["tokenizer"], _STATE["keys"], _STATE["eod"], _STATE["dtype"]
    errors, texts = [], {k: [] for k in keys}
    for lineno, raw in chunk:
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)  # bytes: decoded as UTF-8, errors raise ValueError
        except ValueError as e:
            errors.append((lineno, f"not valid JSON ({e})"))
            continue
        if not isinstance(doc, dict):
            errors.append((lineno, f"expected a JSON object, got {type(doc).__name__}"))
            continue
        bad = [k for k in keys if not isinstance(doc.get(k), str)]
        if bad:
            k = bad[0]
            what = "missing" if k not in doc else f"of type {type(doc[k]).__name__}, not a string"
            errors.append((lineno, f"key {k!r} is {what}"))
            continue
        for k in keys:
            texts[k].append(doc[k])
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
