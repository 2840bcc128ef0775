"""The embedded default dataset: generated corpus → embedded tokenizer → Megatron .bin/.idx.

    <out_dir>/embedded.jsonl                          training documents (text, source, quality)
    <out_dir>/embedded_valid.jsonl                    held-out documents
    <out_dir>/embedded_text_document.{bin,idx}        training tokens, <eod> after each document
    <out_dir>/embedded_valid_text_document.{bin,idx}  held-out tokens
    <out_dir>/manifest.json                           what was built (written last)

File names follow tools/preprocess_data.py (`<prefix>_<key>_document`), so the JSONL files can be
re-tokenised or split into quality tiers by the data tools and land next to these.

Half of the worked arithmetic and algebra documents are thinking-style (THINK_SHARE, see
corpus.py): a model pretrained here has seen `<think> ... </think>` spans whose working helps the
next tokens, so an RLP stage from it samples thoughts in a format it knows and can close.

The last `max(1, num_docs // 50)` documents are held out. Calling again with the same arguments,
corpus version and tokenizer is a no-op (the manifest matches and every file has its recorded
size); anything else rebuilds. A file lock serialises concurrent callers (e.g. every rank of a
torchrun), so the second one finds the first one's result.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass

from megatron_rlp.data.corpus import CORPUS_VERSION, generate_corpus, write_jsonl

DEFAULT_NUM_DOCS = 8000  # ≈ 1.0M tokens: 200 iterations of 8 × 128 see ~0.2 epochs
DEFAULT_SEED = 1234
THINK_SHARE = 0.5  # share of worked arithmetic/algebra documents written with thoughts


@dataclass(frozen=True)
class EmbeddedPaths:
    out_dir: str

    @property
    def train_prefix(self) -> str:
        return os.path.join(self.out_dir, "embedded_text_document")

    @property
    def valid_prefix(self) -> str:
        return os.path.join(self.out_dir, "embedded_valid_text_document")

    @property
    def train_jsonl(self) -> str:
        return os.path.join(self.out_dir, "embedded.jsonl")

    @property
    def valid_jsonl(self) -> str:
        return os.path.join(self.out_dir, "embedded_valid.jsonl")

    @property
    def manifest(self) -> str:
        return os.path.join(self.out_dir, "manifest.json")

    def data_files(self) -> list[str]:
        return [self.train_jsonl, self.valid_jsonl] + [
            p + ext for p in (self.train_prefix, self.valid_prefix) for ext in (".bin", ".idx")
        ]


def embedded_paths(out_dir: str) -> EmbeddedPaths:
    return EmbeddedPaths(os.path.abspath(out_dir))


def _expected_manifest(num_docs: int, seed: int, tokenizer) -> dict:
    return {
        "corpus_version": CORPUS_VERSION,
        "num_docs": num_docs,
        "seed": seed,
        "think_share": THINK_SHARE,
        "num_valid_docs": max(1, num_docs // 50),
        "tokenizer_sha256": tokenizer.unique_identifiers["sha256"],
    }


def _is_up_to_date(paths: EmbeddedPaths, expected: dict) -> bool:
    try:
        with open(paths.manifest) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False
    if any(found.get(k) != v for k, v in expected.items()):
        return False
    sizes = found.get("file_sizes", {})
    return all(
        os.path.isfile(p) and os.path.getsize(p) == sizes.get(os.path.basename(p))
        for p in paths.data_files()
    )


def ensure_embedded_dataset(out_dir: str, num_docs: int = DEFAULT_NUM_DOCS,
                            seed: int = DEFAULT_SEED) -> str:
    """Build the embedded dataset in `out_dir` unless already there; returns the train prefix.

    The validation prefix is `embedded_paths(out_dir).valid_prefix`.
    """
    from megatron_rlp.data.indexed import optimal_dtype, write_indexed_dataset
    from megatron_rlp.data.tokenizer import build_tokenizer

    if not isinstance(num_docs, int) or num_docs < 2:
        raise ValueError(f"num_docs must be an int >= 2 (one train, one held out); "
                         f"got {num_docs!r}")
    paths = embedded_paths(out_dir)
    tokenizer = build_tokenizer("EmbeddedTokenizer")
    expected = _expected_manifest(num_docs, seed, tokenizer)
    if _is_up_to_date(paths, expected):
        return paths.train_prefix

    os.makedirs(paths.out_dir, exist_ok=True)
    with open(os.path.join(paths.out_dir, ".embedded.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_up_to_date(paths, expected):  # built by whoever held the lock before us
            return paths.train_prefix
        if os.path.exists(paths.manifest):
            os.unlink(paths.manifest)  # a half-rebuilt folder must not look up to date
        docs = generate_corpus(num_docs, seed, think_share=THINK_SHARE)
        n_valid = expected["num_valid_docs"]
        train, valid = docs[:-n_valid], docs[-n_valid:]
        dtype = optimal_dtype(tokenizer.vocab_size)
        counts = {}
        for part, prefix, jsonl in ((train, paths.train_prefix, paths.train_jsonl),
                                    (valid, paths.valid_prefix, paths.valid_jsonl)):
            ids = tokenizer.encode_batch([d["text"] for d in part])
            for doc in ids:
                doc.append(tokenizer.eod)
            write_indexed_dataset(prefix, ids, dtype=dtype)
            write_jsonl(part, jsonl)
            counts[os.path.basename(prefix)] = {"documents": len(ids),
                                                "tokens": sum(len(d) for d in ids)}
        manifest = dict(expected, counts=counts, file_sizes={
            os.path.basename(p): os.path.getsize(p) for p in paths.data_files()})
        tmp = paths.manifest + f".tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, paths.manifest)
    return paths.train_prefix
