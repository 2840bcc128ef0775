#!/usr/bin/env python
"""Score documents for quality, assign tiers, and write one Megatron .bin/.idx per (source, tier).

    python tools/estimate_quality.py --input docs.jsonl[.gz] --output-dir data/tiers \\
        --high-examples good.jsonl --low-examples bad.jsonl --append-eod \\
        [--load runs/tiny --perplexity-max-tokens 256] [--scorer classifier|perplexity]

Scorers (megatron_rlp/data/quality.py):
  classifier   hashed character n-grams + logistic regression (scikit-learn), trained here from
               --high-examples / --low-examples (JSONL with --text-key, or text, one doc a line);
               score = P(high) in [0, 1]
  perplexity   exp(mean next-token NLL) under our checkpoint --load (lower is better)
Both are reported when both are available; --scorer picks the one that assigns tiers, cut by
--tier-thresholds HIGH LOW (classifier default 0.8 0.2; perplexity needs them given).

Outputs in --output-dir (each written under a temporary name and renamed when complete; on an
error nothing new is left behind):
  scores.jsonl                         per document: line, id, source, tier, classifier, perplexity
  <source>_<tier>_text_document.{bin,idx}  tokens of that source's documents in that tier
  manifest.json                        one entry per (source, tier): name, category, tier, tokens,
                                       documents, path — the input of tools/build_phase_blend.py
  summary.json                         documents, tokens, score histograms; agreement with a
                                       "quality" field when the input has one
  classifier.npz                       the trained classifier (arrays + JSON header, no pickle)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

try:
    import megatron_rlp  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from megatron_rlp.data import quality
from megatron_rlp.data.corpus import iter_jsonl
from megatron_rlp.data.tokenizer import TOKENIZER_TYPES


def get_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="JSONL documents (.gz ok)")
    g.add_argument("--text-key", default="text", help="field holding the document text")
    g.add_argument("--source-key", default="source",
                   help="field naming the document's source; documents without it go to "
                        "--default-source")
    g.add_argument("--default-source", default="default", help="source of unlabelled documents")
    g.add_argument("--category", nargs="*", default=[], metavar="SOURCE=CATEGORY",
                   help="category per source for the blend builder (e.g. algebra=math); "
                        "default: the source name")
    g = p.add_argument_group("classifier")
    g.add_argument("--high-examples", help="high-quality examples (JSONL or text)")
    g.add_argument("--low-examples", help="low-quality examples (JSONL or text)")
    g.add_argument("--classifier", help="load a classifier.npz instead of training one")
    g.add_argument("--n-features", type=int, default=2 ** 18, help="hash buckets")
    g.add_argument("--ngram-range", type=int, nargs=2, default=[2, 4], help="character n-grams")
    g = p.add_argument_group("perplexity")
    g.add_argument("--load", help="megatron-rlp checkpoint directory for perplexity scores")
    g.add_argument("--perplexity-max-tokens", type=int, default=128,
                   help="score each document's first N tokens")
    g.add_argument("--perplexity-batch-size", type=int, default=8)
    g = p.add_argument_group("tiers")
    g.add_argument("--scorer", choices=("classifier", "perplexity"), default="classifier",
                   help="which score assigns tiers")
    g.add_argument("--tier-thresholds", type=float, nargs=2, metavar=("HIGH", "LOW"),
                   help="classifier: high if P >= HIGH, low if P < LOW (default 0.8 0.2); "
                        "perplexity: high if ppl <= HIGH, low if ppl > LOW")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", required=True, help="folder for the outputs (created)")
    g.add_argument("--tokenizer-type", default="EmbeddedTokenizer", choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="HF tokenizer.json for file tokenizers")
    g.add_argument("--append-eod", action="store_true", help="end every document with <eod>")
    g.add_argument("--chunk-docs", type=int, default=1000, help="documents per processing chunk")
    return p.parse_args(argv)


def _check_args(a: argparse.Namespace) -> None:
    """Every bad input fails here, before any work or file write."""
    if not os.path.isfile(a.input):
        raise ValueError(f"--input {a.input!r}: file not found")
    has_examples = a.high_examples or a.low_examples
    if has_examples and not (a.high_examples and a.low_examples):
        raise ValueError("--high-examples and --low-examples go together; give both")
    if has_examples and a.classifier:
        raise ValueError("give either --classifier FILE or --high/--low-examples, not both")
    for flag in ("high_examples", "low_examples", "classifier", "load"):
        path = getattr(a, flag)
        if path and not os.path.exists(path):
            raise ValueError(f"--{flag.replace('_', '-')} {path!r}: not found")
    if a.scorer == "classifier" and not (has_examples or a.classifier):
        raise ValueError("--scorer classifier needs --high-examples and --low-examples (or "
                         "--classifier FILE); or use --scorer perplexity with --load")
    if a.scorer == "perplexity":
        if not a.load:
            raise ValueError("--scorer perplexity needs --load CHECKPOINT_DIR")
        if a.tier_thresholds is None:
            raise ValueError("--scorer perplexity needs --tier-thresholds HIGH LOW (perplexity "
                             "values depend on the model; look at a first run's summary.json)")
    if a.tier_thresholds is None:
        a.tier_thresholds = [0.8, 0.2]
    quality.assign_tiers([], *a.tier_thresholds, higher_is_better=a.scorer == "classifier")
    for item in a.category:
        if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]:
            raise ValueError(f"--category {item!r}: expected SOURCE=CATEGORY, e.g. algebra=math")
    if a.chunk_docs < 1 or a.perplexity_max_tokens < 2:
        raise ValueError("--chunk-docs must be >= 1 and --perplexity-max-tokens >= 2")


def _read_documents(path: str, text_key: str, source_key: str, default_source: str) -> list:
    docs = []
    for n, doc in iter_jsonl(path, text_key):
        source = str(doc.get(source_key, default_source))
        if not source.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"{path}:{n}: source {source!r} must be letters, digits, - _ . "
                             "(it becomes a file name)")
        docs.append({"line": n, "id": doc.get("id"), "source": source,
                     "text": doc[text_key], "quality": doc.get("quality")})
    if not docs:
        raise ValueError(f"--input {path!r} holds no documents")
    return docs


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Optional[list] = None) -> int:
    a = get_args(argv)
    try:
        _check_args(a)
        return _run(a)
    except ValueError as e:
        print(f"estimate_quality: error: {e}", file=sys.stderr, flush=True)
        return 2


def _run(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from megatron_rlp.data.indexed import IndexedWriter, optimal_dtype
    from megatron_rlp.data.tokenizer import build_tokenizer

    start = time.perf_counter()
    docs = _read_documents(a.input, a.text_key, a.source_key, a.default_source)
    tokenizer = build_tokenizer(a.tokenizer_type, a.tokenizer_model)
    categories = dict(item.split("=", 1) for item in a.category)

    clf = None
    if a.classifier:
        clf = quality.NgramQualityClassifier.load(a.classifier)
    elif a.high_examples:
        high = quality.read_texts(a.high_examples, a.text_key)
        low = quality.read_texts(a.low_examples, a.text_key)
        clf = quality.NgramQualityClassifier(a.n_features, tuple(a.ngram_range)).fit(high, low)
        print(f"classifier: trained on {len(high)} high and {len(low)} low examples", flush=True)
    model = None
    if a.load:
        import megatron_rlp

        model = megatron_rlp.load_model(a.load)

    os.makedirs(a.output_dir, exist_ok=True)
    dtype = optimal_dtype(tokenizer.vocab_size)
    writers: dict = {}
    counts: dict = {}
    rows: list = []
    higher_is_better = a.scorer == "classifier"
    try:
        with tqdm(total=len(docs), desc="scoring", unit="doc", disable=None) as bar:
            for c in range(0, len(docs), a.chunk_docs):
                chunk = docs[c:c + a.chunk_docs]
                texts = [d["text"] for d in chunk]
                ids = tokenizer.encode_batch(texts)
                cls_scores = clf.score(texts) if clf is not None else [None] * len(chunk)
                ppl = (quality.perplexities(model, ids, a.perplexity_max_tokens,
                                            a.perplexity_batch_size, pad_id=tokenizer.eod)
                       if model is not None else [None] * len(chunk))
                chosen = cls_scores if a.scorer == "classifier" else ppl
                tiers = quality.assign_tiers(chosen, *a.tier_thresholds,
                                             higher_is_better=higher_is_better)
                for d, toks, s, p, tier in zip(chunk, ids, cls_scores, ppl, tiers):
                    key = (d["source"], tier)
                    if key not in writers:
                        prefix = os.path.join(a.output_dir, f"{key[0]}_{key[1]}_text_document")
                        writers[key] = IndexedWriter(prefix, dtype)
                        counts[key] = {"documents": 0, "tokens": 0}
                    if a.append_eod:
                        toks = list(toks) + [tokenizer.eod]
                    writers[key].add(toks)
                    counts[key]["documents"] += 1
                    counts[key]["tokens"] += len(toks)
                    rows.append({"line": d["line"], "id": d["id"], "source": d["source"],
                                 "tier": tier,
                                 "classifier": None if s is None else round(float(s), 6),
                                 "perplexity": None if p is None or np.isnan(p)
                                 else round(float(p), 4),
                                 "quality": d["quality"]})
                bar.update(len(chunk))
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.discard()
        raise

    _atomic_write(os.path.join(a.output_dir, "scores.jsonl"),
                  "".join(json.dumps({k: v for k, v in r.items() if k != "quality"}) + "\n"
                          for r in rows))
    if clf is not None:
        clf.save(os.path.join(a.output_dir, "classifier.npz"))
    summary = _summary(a, rows, counts)
    _atomic_write(os.path.join(a.output_dir, "summary.json"), json.dumps(summary, indent=2))
    manifest = {"sources": [
        {"name": f"{src}_{tier}", "category": categories.get(src, src), "tier": tier,
         "tokens": n["tokens"], "documents": n["documents"], "path": f"{src}_{tier}_text_document"}
        for (src, tier), n in sorted(counts.items())]}
    _atomic_write(os.path.join(a.output_dir, "manifest.json"), json.dumps(manifest, indent=2))
    _print_summary(summary)
    print(json.dumps({"documents": len(rows), "outputs": len(counts),
                      "manifest": os.path.join(a.output_dir, "manifest.json"),
                      "wall_s": round(time.perf_counter() - start, 2)}), flush=True)
    return 0


def _summary(a, rows: list, counts: dict) -> dict:
    out = {"input": os.path.abspath(a.input), "scorer": a.scorer,
           "tier_thresholds": list(a.tier_thresholds),
           "documents": len(rows), "tokens": sum(n["tokens"] for n in counts.values()),
           "per_source_tier": {f"{s}/{t}": n for (s, t), n in sorted(counts.items())},
           "per_tier": {t: {"documents": sum(n["documents"] for (s, tt), n in counts.items()
                                             if tt == t),
                            "tokens": sum(n["tokens"] for (s, tt), n in counts.items() if tt == t)}
                        for t in quality.TIERS}}
    if rows[0]["classifier"] is not None:
        out["classifier_histogram"] = quality.histogram([r["classifier"] for r in rows], 10,
                                                        (0.0, 1.0))
    if rows[0]["perplexity"] is not None or any(r["perplexity"] is not None for r in rows):
        out["perplexity_histogram"] = quality.histogram(
            [r["perplexity"] for r in rows if r["perplexity"] is not None], 10)
    labelled = [r for r in rows if r["quality"] in quality.TIERS]
    if labelled:  # the embedded corpus carries a generator label: report how well we recover it
        conf = {q: {t: 0 for t in quality.TIERS} for q in quality.TIERS}
        for r in labelled:
            conf[r["quality"]][r["tier"]] += 1
        out["agreement_with_quality_field"] = {
            "accuracy": round(sum(conf[t][t] for t in quality.TIERS) / len(labelled), 4),
            "confusion (label -> tier)": conf}
    return out


def _print_summary(s: dict) -> None:
    print(f"{s['documents']:,} documents, {s['tokens']:,} tokens (scorer {s['scorer']}, "
          f"thresholds {s['tier_thresholds']})")
    print(f"  {'source/tier':<28}{'documents':>10}{'tokens':>12}")
    for key, n in s["per_source_tier"].items():
        print(f"  {key:<28}{n['documents']:>10,}{n['tokens']:>12,}")
    for name in ("classifier_histogram", "perplexity_histogram"):
        h = s.get(name)
        if h and h["counts"]:
            print(f"  {name.split('_')[0]} histogram:")
            top = max(h["counts"]) or 1
            for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"]):
                print(f"    [{lo:8.3f}, {hi:8.3f}) {c:>7,} {'#' * round(40 * c / top)}")
    if "agreement_with_quality_field" in s:
        print(f"  agreement with the 'quality' field: "
              f"{s['agreement_with_quality_field']['accuracy']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
