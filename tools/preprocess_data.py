#!/usr/bin/env python
"""Tokenise JSONL or Parquet into Megatron `<output-prefix>_<key>_document.{bin,idx}`.

Megatron-LM's flags and output names, read unchanged by megatron-core's `IndexedDataset`:

    python tools/preprocess_data.py --input docs.jsonl[.gz] --output-prefix data/my \\
        --json-keys text --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json \\
        --append-eod --workers 4
    python tools/preprocess_data.py --input data/ --output-prefix data/my ...   # *.parquet under it

`--input` is a JSONL file (one JSON object per line, plain or gzip), a `.parquet` file, or a
folder of `.parquet` files (megatron_rlp/data/preprocess_inputs.py). Every key in --json-keys
must hold a string: a JSON key, or a Parquet string column (one output per key, all with the same
documents). Blank lines are ignored. A text that tokenises to nothing is an empty document, as in
Megatron-LM: no sequence and no end-of-document token, but an entry in the document index.

Errors: an unreadable input (no such file, a file that is not Parquet, a missing or non-string
column, a damaged Parquet page) ends the run with one line naming the file and exit code 2, and
leaves no output. A malformed document (bad JSON or UTF-8, not an object, missing or non-string
key, a null Parquet value) is reported as `FILE:LINE: reason` or `FILE: row index N: reason`:
with `--on-error fail` (the default) the run stops with exit code 2 and leaves no output; with
`--on-error skip` the document is dropped, reported, and counted in the summary. Outputs are
written under temporary names and renamed into place only when every one of them is complete.

Parallelism: `--workers N` tokenises chunks of documents in N processes, each single-threaded (the
HF tokenizers thread pool is turned off, so N is the number of cores used); chunks are written
back in input order, so the output is byte-identical for any N; workers die with the tool if it is
killed. Memory: a document over 128 Ki characters is tokenised in pieces cut at whitespace, so a
50 MB line peaks at ~0.7 GB RSS (megatron_rlp/data/preprocess.py says when the ids can differ from
whole-document tokenization); Parquet is read one record batch at a time. The last stdout line is
a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

try:
    import megatron_rlp  # noqa: F401  (installed with pip install -e .)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from megatron_rlp.data.preprocess import MegatronDocumentWriter, ordered_results
from megatron_rlp.data.preprocess_inputs import BadInput, open_input
from megatron_rlp.data.tokenizer import TOKENIZER_TYPES, build_tokenizer

MAX_REPORTED_SKIPS = 20


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Tokenise JSONL or Parquet into Megatron .bin/.idx (one pair per "
        "--json-keys key).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True,
                   help="JSONL file (one document per line; .gz ok), .parquet file, or a folder "
                   "of .parquet files")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON keys or Parquet columns to tokenise; each gives "
                   "<prefix>_<key>_document.{bin,idx}")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="EmbeddedTokenizer", choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None,
                   help="local HF tokenizer.json for HuggingFaceTokenizer / TokenizerFile")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every non-empty document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="path prefix of the outputs; its folder is created if missing")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenising processes")
    g.add_argument("--chunk-lines", type=int, default=1000,
                   help="lines (JSONL) or rows (Parquet) per work unit sent to a worker")
    g.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="what a malformed document does: stop with no output, or skip it")
    return p.parse_args(argv)


def _remove_empty(folders: list[str]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)  # only succeeds when empty: never removes anything else
        except OSError:
            return


def _fail(message: str) -> int:
    """The tool's one error line; exit status 2, as for every command-line error here."""
    print(f"preprocess_data: error: {message}", file=sys.stderr)
    return 2


def _make_output_folder(prefix: str) -> list[str]:
    """Create the folder of `prefix`; returns the folders created, innermost first (removed again
    if the run fails). Raises BadInput when it cannot be created or written."""
    folder = os.path.dirname(os.path.abspath(prefix))
    created, parent = [], folder
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--output-prefix {prefix!r}: cannot create {folder!r} ({e})") from None
    if not os.access(folder, os.W_OK):
        raise BadInput(f"--output-prefix {prefix!r}: folder {folder!r} is not writable")
    return created


def main(argv: Optional[list[str]] = None) -> int:
    args = get_args(argv)
    # ---- validate everything before tokenising a document or creating a file ------------------
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
    try:
        reader = open_input(args.input, args.json_keys)  # Parquet footers and columns checked
    except BadInput as e:
        return _fail(str(e))
    try:
        created = _make_output_folder(args.output_prefix)
    except BadInput as e:
        reader.close()
        return _fail(str(e))

    from tqdm import tqdm

    from megatron_rlp.data.indexed import optimal_dtype

    dtype = np.dtype(optimal_dtype(tokenizer.vocab_size))
    prefixes = [f"{args.output_prefix}_{k}_document" for k in args.json_keys]
    initargs = (args.tokenizer_type, args.tokenizer_model, args.json_keys, args.append_eod,
                dtype.name)
    writers = [MegatronDocumentWriter(p, dtype.type) for p in prefixes]
    skipped, documents, tokens = [], 0, 0
    empty = dict.fromkeys(args.json_keys, 0)
    start = time.perf_counter()
    progress = tqdm(total=reader.total, unit=reader.unit, unit_scale=True, desc="preprocess",
                    disable=None)
    ordered = ordered_results(reader.chunks(args.chunk_lines), args.workers, initargs)

    def discard_outputs() -> None:
        for w in writers:
            w.discard()
        _remove_empty(created)

    def abandon(message: str) -> int:
        discard_outputs()
        return _fail(message)

    try:
        for errors, per_key in ordered:
            for where in errors:
                if args.on_error == "fail":
                    return abandon(f"{where}; fix it or pass --on-error skip "
                                   "(no output was written)")
                skipped.append(where)
                if len(skipped) <= MAX_REPORTED_SKIPS:
                    progress.write(f"warning: skipped {where}", file=sys.stderr)
            for key, w, (flat, lengths) in zip(args.json_keys, writers, per_key):
                w.add_many(flat, lengths)
                empty[key] += int(np.count_nonzero(lengths == 0))
            documents += len(per_key[0][1])
            tokens += int(per_key[0][0].size)
            progress.update(reader.position() - progress.n)
        for w in writers:
            w.finalize()
    except BadInput as e:  # damage found while streaming a Parquet file
        return abandon(f"{e} (no output was written)")
    except BaseException:
        discard_outputs()
        raise
    finally:
        ordered.close()  # stops the worker pool now, also on an early return
        progress.close()
        reader.close()
    seconds = time.perf_counter() - start
    if len(skipped) > MAX_REPORTED_SKIPS:
        print(f"warning: {len(skipped) - MAX_REPORTED_SKIPS} more documents skipped",
              file=sys.stderr)
    print(json.dumps({
        "input": args.input, "outputs": prefixes, "documents": documents,
        "empty_documents": empty, "tokens": tokens, "skipped": len(skipped),
        "workers": args.workers, "seconds": round(seconds, 4),
        "docs_per_s": round(documents / seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
