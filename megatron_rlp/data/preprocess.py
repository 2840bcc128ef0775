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
from typing import Iterator, Optional

import numpy as np

from megatron_rlp.data.tokenizer import build_tokenizer

# Per-process state set by init_worker (the pool initializer, or directly when --workers 1).
_STATE: dict = {}


def init_worker(tokenizer_type: str, tokenizer_model: Optional[str], json_keys: list[str],
                 append_eod: bool, dtype_name: str) -> None:
    # Parallelism comes from --workers; a hidden thread pool per worker would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    _STATE.update(tokenizer=tok, keys=json_keys, eod=tok.eod if append_eod else None,
                  dtype=np.dtype(dtype_name))


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
    per_key = []
    for k in keys:
        ids = tok.encode_batch(texts[k])
        if eod is not None:
            for doc_ids in ids:
                doc_ids.append(eod)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                           count=int(lengths.sum()))
        per_key.append((flat, lengths))
    return errors, per_key


def ordered_results(chunks: Iterator, workers: int, initargs: tuple) -> Iterator[tuple]:
    """Encoded chunks in input order; at most 4 chunks per worker in flight (bounded memory)."""
    if workers == 1:
        init_worker(*initargs)
        for chunk in chunks:
            yield encode_chunk(chunk)
        return
    with multiprocessing.get_context("spawn").Pool(workers, init_worker, initargs) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
