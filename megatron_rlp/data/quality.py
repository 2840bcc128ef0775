"""Document quality scores and tiers: a hashed n-gram classifier and model perplexity.

Classifier (fastText-style quality filter, as in Nemotron-CC / DCLM, built from scikit-learn):
character n-grams (within word boundaries, case kept: shouting is a signal) are hashed into
`n_features` buckets by `HashingVectorizer` (stateless: nothing to fit or store but the linear
model), then `LogisticRegression` separates user-given high- and low-quality examples.
`score(texts)` is P(high) in [0, 1].

Perplexity: exp(mean next-token NLL) of each document's first `max_tokens` tokens under one of our
checkpoints (`megatron_rlp.load_model`); lower is more "like the training data" of that model.

Tiers: `assign_tiers` cuts a score at two thresholds into high / medium / low.

The classifier is saved as `.npz` arrays plus a JSON header (no pickle: models come from other
people and unpickling runs code).
"""
from __future__ import annotations

import gzip
import json
import math
from typing import Iterable, Optional, Sequence

import numpy as np

TIERS = ("high", "medium", "low")


def read_texts(path: str, text_key: str = "text") -> list[str]:
    """Documents from a JSONL file (`.jsonl[.gz]`, field `text_key`) or a text file (one per line)."""
    opener = gzip.open if path.endswith(".gz") else open
    is_jsonl = path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
    texts = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if not is_jsonl:
                    texts.append(line.rstrip("\n"))
                    continue
                try:
                    doc = json.loads(line)
                    text = doc[text_key]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: not a JSON object with a string {text_key!r} "
                                     "field") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: field {text_key!r} is not a string")
                texts.append(text)
    except FileNotFoundError:
        raise ValueError(f"{path!r}: file not found") from None
    return texts


class NgramQualityClassifier:
    """Hashed character n-grams + logistic regression; `score` = P(high quality)."""

    def __init__(self, n_features: int = 2 ** 18, ngram_range: tuple = (2, 4), C: float = 1.0,
                 seed: int = 0):
        if n_features < 2 or ngram_range[0] < 1 or ngram_range[1] < ngram_range[0]:
            raise ValueError(f"n_features={n_features}, ngram_range={ngram_range}: need "
                             "n_features >= 2 and 1 <= min n <= max n")
        self.n_features = int(n_features)
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.C = float(C)
        self.seed = int(seed)
        self.coef: Optional[np.ndarray] = None
        self.intercept: float = 0.0

    def _vectorizer(self):
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(analyzer="char_wb", ngram_range=self.ngram_range,
                                 n_features=self.n_features, lowercase=False,
                                 alternate_sign=False, norm="l2")

    def fit(self, high: Sequence[str], low: Sequence[str]) -> "NgramQualityClassifier":
        from sklearn.linear_model import LogisticRegression

        if len(high) < 1 or len(low) < 1:
            raise ValueError(f"need at least one high and one low example, got {len(high)} high "
                             f"and {len(low)} low; check --high-examples / --low-examples")
        X = self._vectorizer().transform(list(high) + list(low))
        y = np.array([1] * len(high) + [0] * len(low))
        model = LogisticRegression(C=self.C, max_iter=1000, random_state=self.seed)
        model.fit(X, y)
        self.coef = model.coef_[0].astype(np.float64)
        self.intercept = float(model.intercept_[0])
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("classifier is not trained: call fit() or load() first")
        logits = self._vectorizer().transform(list(texts)) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))

    def save(self, path: str) -> None:
        import os

        header = json.dumps({"n_features": self.n_features, "ngram_range": self.ngram_range,
                             "C": self.C, "seed": self.seed, "intercept": self.intercept})
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, coef=self.coef, header=np.array(header))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "NgramQualityClassifier":
        with np.load(path, allow_pickle=False) as f:
            header = json.loads(str(f["header"]))
            coef = f["coef"]
        clf = cls(header["n_features"], tuple(header["ngram_range"]), header["C"], header["seed"])
        clf.coef, clf.intercept = coef.astype(np.float64), float(header["intercept"])
        return clf


def perplexities(model, token_lists: Sequence[Sequence[int]], max_tokens: int,
                 batch_size: int = 8, pad_id: int = 0) -> np.ndarray:
    """exp(mean NLL of tokens 1..n-1) per document, truncated to `max_tokens`; NaN if < 2 tokens.

    `model(input_ids [b, s]) -> logits [b, s, vocab]` (what `megatron_rlp.load_model` returns).
    Batches are right-padded to `max_tokens`: the model is causal, so padding after a document
    cannot change its scores, and one shape keeps every batch on the same code path.
    """
    import torch

    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} must be >= 2 (one context and one target)")
    out = np.full(len(token_lists), np.nan)
    order = [i for i, t in enumerate(token_lists) if len(t) >= 2]
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            ids = torch.full((len(idx), max_tokens), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), max_tokens - 1))
            for r, i in enumerate(idx):
                toks = list(token_lists[i])[:max_tokens]
                ids[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
                mask[r, :len(toks) - 1] = 1.0
            logits = model(ids).float().cpu()  # the model may run on a GPU; scoring is host-side
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                reduction="none").view(len(idx), -1)
            mean = (nll * mask).sum(1) / mask.sum(1)
            out[idx] = torch.exp(mean).numpy()
    return out


def assign_tiers(scores: Iterable[float], high: float, low: float,
                 higher_is_better: bool = True) -> list[str]:
    """'high' at or beyond `high`, 'low' beyond `low` on the bad side, 'medium' between.

    With `higher_is_better=False` (perplexity) a document is high when score <= high and low when
    score > low. NaN scores (too short to score) are 'low'.
    """
    if (high < low) if higher_is_better else (high > low):
        better = "higher" if higher_is_better else "lower"
        raise ValueError(f"--tier-thresholds {high} {low}: the high threshold must be the {better} "
                         "of the two (give HIGH then LOW)")
    out = []
    for s in scores:
        if s is None or (isinstance(s, float) and math.isnan(s)):
            out.append("low")
        elif (s >= high) if higher_is_better else (s <= high):
            out.append("high")
        elif (s < low) if higher_is_better else (s > low):
            out.append("low")
        else:
            out.append("medium")
    return out


def histogram(scores: Sequence[float], bins: int = 10,
              value_range: Optional[tuple] = None) -> dict:
    """{"edges": [...], "counts": [...]} over the finite scores."""
    arr = np.asarray([s for s in scores if s is not None and np.isfinite(s)], dtype=np.float64)
    if arr.size == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(arr, bins=bins, range=value_range)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
