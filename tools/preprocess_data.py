#!/usr/bin/env python
"""Tokenise a JSONL corpus into Megatron `<output-prefix>_<key>_document.{bin,idx}`.

Megatron-LM's flags and output names, read unchanged by megatron-core's `IndexedDataset`:

    python tools/preprocess_data.py --input docs.jsonl[.gz] --output-prefix data/my \\
        --json-keys text --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json \\
        --append-eod --workers 4

One JSON object per line; every key in --json-keys must hold a string (one output per key, all
with the same documents). Blank lines are ignored. A malformed line (bad JSON or UTF-8, not an
object, missing or non-string key) is reported as `FILE:LINE: reason`: with `--on-error fail` (the
default) the run stops with exit code 1 and leaves no output; with `--on-error skip` the line is
dropped, reported, and counted in the summary. Outputs are written under temporary names and
renamed into place only when every one of them is complete.

Parallelism: `--workers N` tokenises chunks of lines in N processes, each single-threaded (the HF
tokenizers thread pool is turned off, so N is the number of cores used); chunks are written back
in input order, so the output is byte-identical for any N; workers die with the tool if it is
killed. Memory: a document over 128 Ki characters is tokenised in pieces cut at whitespace, so a
50 MB line peaks at ~0.7 GB RSS (megatron_rlp/data/preprocess.py says when the ids can differ from
whole-document tokenization). The last stdout line is a JSON summary.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from typing import Iterator, Optional

try:
    import megatron_rlp  # noqa: F401  (installed with pip install -e .)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from megatron_rlp.data.preprocess import ordered_results
from megatron_rlp.data.tokenizer import TOKENIZER_TYPES, build_tokenizer

MAX_REPORTED_SKIPS = 20

def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Tokenise JSONL into Megatron .bin/.idx (one pair per --json-keys key).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="JSONL file, one document per line; .gz ok")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to tokenise; each gives <prefix>_<key>_document.{bin,idx}")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="EmbeddedTokenizer", choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None,
                   help="local HF tokenizer.json for HuggingFaceTokenizer / TokenizerFile")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="path prefix of the outputs; its folder is created if missing")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenising processes")
    g.add_argument("--chunk-lines", type=int, default=1000,
                   help="lines per work unit sent to a worker")
    g.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="what a malformed line does: stop with no output, or skip it")
    return p.parse_args(argv)


class _InputReader:
    """Numbered raw lines of a plain or gzip file (detected by magic bytes), and progress bytes."""

    def __init__(self, path: str):
        self.raw = open(path, "rb")
        gz = self.raw.read(2) == b"\x1f\x8b"
        self.raw.seek(0)
        self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb") if gz else self.raw

    def chunks(self, size: int) -> Iterator[list[tuple[int, bytes]]]:
        chunk = []
        for lineno, line in enumerate(self.stream, start=1):
            chunk.append((lineno, line))
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def position(self) -> int:
        return self.raw.tell()  # compressed bytes for .gz: matches the file size total

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def _remove_empty(folders: list[str]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)  # only succeeds when empty: never removes anything else
        except OSError:
            return


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    args = get_args(argv)
    # ---- validate everything before reading a line or creating a file -------------------------
    if not os.path.isfile(args.input):
        return _fail(f"--input {args.input!r}: no such file")
    if args.workers < 1:
        return _fail(f"--workers must be >= 1, got {args.workers}")
    if args.chunk_lines < 1:
        return _fail(f"--chunk-lines must be >= 1, got {args.chunk_lines}")
    if len(set(args.json_keys)) != len(args.json_keys):
        return _fail(f"--json-keys {args.json_keys} repeats a key")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        if args.append_eod:
            tokenizer.eod  # noqa: B018  raises ValueError naming the fix if there is none
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    folder = os.path.dirname(os.path.abspath(args.output_prefix))
    created = []  # folders this run makes, innermost first: removed again if the run fails
    parent = folder
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return _fail(f"--output-prefix {args.output_prefix!r}: cannot create {folder!r} ({e})")
    if not os.access(folder, os.W_OK):
        return _fail(f"--output-prefix {args.output_prefix!r}: folder {folder!r} is not writable")

    from tqdm import tqdm

    from megatron_rlp.data.indexed import IndexedWriter, optimal_dtype

    dtype = np.dtype(optimal_dtype(tokenizer.vocab_size))
    prefixes = [f"{args.output_prefix}_{k}_document" for k in args.json_keys]
    initargs = (args.tokenizer_type, args.tokenizer_model, args.json_keys, args.append_eod,
                dtype.name)
    writers = [IndexedWriter(p, dtype.type) for p in prefixes]
    reader = _InputReader(args.input)
    skipped, documents, tokens = [], 0, 0
    start = time.perf_counter()
    progress = tqdm(total=os.path.getsize(args.input), unit="B", unit_scale=True,
                    desc="preprocess", disable=None)
    ordered = ordered_results(reader.chunks(args.chunk_lines), args.workers, initargs)
    try:
        for errors, per_key in ordered:
            for lineno, reason in errors:
                where = f"{args.input}:{lineno}: {reason}"
                if args.on_error == "fail":
                    for w in writers:
                        w.discard()
                    _remove_empty(created)
                    return _fail(f"{where}; fix the line or pass --on-error skip "
                                 f"(no output was written)")
                skipped.append(where)
                if len(skipped) <= MAX_REPORTED_SKIPS:
                    progress.write(f"warning: skipped {where}", file=sys.stderr)
            for w, (flat, lengths) in zip(writers, per_key):
                w.add_many(flat, lengths)
            documents += len(per_key[0][1])
            tokens += int(per_key[0][0].size)
            progress.update(reader.position() - progress.n)
        for w in writers:
            w.finalize()
    except BaseException:
        for w in writers:
            w.discard()
        _remove_empty(created)
        raise
    finally:
        ordered.close()  # stops the worker pool now, also on an early return
        progress.close()
        reader.close()
    seconds = time.perf_counter() - start
    if len(skipped) > MAX_REPORTED_SKIPS:
        print(f"warning: {len(skipped) - MAX_REPORTED_SKIPS} more lines skipped", file=sys.stderr)
    print(json.dumps({
        "input": args.input, "outputs": prefixes, "documents": documents,
        "tokens": tokens, "skipped": len(skipped), "workers": args.workers,
        "seconds": round(seconds, 4), "docs_per_s": round(documents / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
