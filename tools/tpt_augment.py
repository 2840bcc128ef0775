#!/usr/bin/env python
"""Thinking-augmented pretraining data (TPT): append a sampled "expert thinking" to each document.

    python tools/tpt_augment.py --input docs.jsonl[.gz] --output docs_tpt.jsonl --load runs/tiny \\
        --max-doc-tokens 256 --max-new-tokens 128 --temperature 0.7 --top-p 0.9
    python tools/preprocess_data.py --input docs_tpt.jsonl --output-prefix data/tpt --append-eod

For each document, its first --max-doc-tokens tokens fill --prompt-template (placeholder
{document}); a continuation is sampled from the checkpoint with our cached `generate` API
(megatron_rlp/inference/generate.py: prefill once, KV + Mamba state cache, temperature/top-p,
stopping at <eod>), and --output-template (placeholders {document} {thinking}) builds the new
text. Every other field of the input line is kept; `thinking` holds the sample alone.
Runs offline on CPU. The output is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

try:
    import megatron_rlp  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_PROMPT = "{document}\n\nLet me think about this step by step like an expert.\n"
DEFAULT_OUTPUT = "{document}\n\nLet me think about this step by step like an expert.\n{thinking}"


def get_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL documents (.gz ok)")
    p.add_argument("--output", required=True, help="JSONL to write (.gz compresses)")
    p.add_argument("--load", required=True, help="megatron-rlp checkpoint directory")
    p.add_argument("--text-key", default="text")
    p.add_argument("--max-doc-tokens", type=int, default=256,
                   help="truncate each document to this many tokens before prompting")
    p.add_argument("--max-new-tokens", type=int, default=128, help="thinking length limit")
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT, help="uses {document}")
    p.add_argument("--output-template", default=DEFAULT_OUTPUT,
                   help="uses {document} and {thinking}")
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="documents sampled together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="stop after N documents (0: all)")
    return p.parse_args(argv)


def _check(a: argparse.Namespace) -> None:
    if not os.path.isfile(a.input):
        raise ValueError(f"--input {a.input!r}: file not found")
    if not os.path.isdir(a.load):
        raise ValueError(f"--load {a.load!r}: not a checkpoint directory")
    if os.path.realpath(a.output) == os.path.realpath(a.input) or (
            os.path.exists(a.output) and os.path.samefile(a.output, a.input)):
        raise ValueError(f"--output {a.output!r} is the --input file: augmenting in place would "
                         "replace the original documents; choose a new --output")
    if "{document}" not in a.prompt_template:
        raise ValueError("--prompt-template must contain {document}")
    if "{thinking}" not in a.output_template:
        raise ValueError("--output-template must contain {thinking}")
    for flag in ("max_doc_tokens", "max_new_tokens", "batch_size"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if a.temperature < 0 or not 0 < a.top_p <= 1:
        raise ValueError(f"--temperature {a.temperature} must be >= 0 and --top-p {a.top_p} in "
                         "(0, 1]")


def _read(path: str, text_key: str, limit: int) -> list[dict]:
    from megatron_rlp.data.corpus import iter_jsonl

    docs = []
    for _, doc in iter_jsonl(path, text_key):
        docs.append(doc)
        if limit and len(docs) >= limit:
            break
    return docs


def augment(model, tokenizer, docs: list[dict], a: argparse.Namespace, progress=None) -> list:
    """The augmented documents (same order); `model` is what `load_model` returns."""
    import torch

    from megatron_rlp.inference.decode import CachedDecoder
    from megatron_rlp.inference.generate import generate

    decoder = CachedDecoder(model.model, tokenizer.vocab_size)
    generator = torch.Generator().manual_seed(a.seed)
    out = []
    for b in range(0, len(docs), a.batch_size):
        batch = docs[b:b + a.batch_size]
        truncated = [tokenizer.decode(tokenizer.encode(d[a.text_key])[:a.max_doc_tokens])
                     for d in batch]
        prompts = [tokenizer.encode(a.prompt_template.format(document=t)) for t in truncated]
        result = generate(decoder, prompts, max_new_tokens=a.max_new_tokens,
                          temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          stop_ids=[tokenizer.eod], generator=generator, pad_id=tokenizer.eod)
        for row, (doc, text) in enumerate(zip(batch, truncated)):
            n = int(result.lengths[row]) - int(result.stopped[row])  # drop the <eod> itself
            thinking = tokenizer.decode(result.tokens[row, :n].tolist())
            new = dict(doc)
            new[a.text_key] = a.output_template.format(document=text, thinking=thinking)
            new["thinking"] = thinking
            out.append(new)
        if progress is not None:
            progress.update(len(batch))
    return out


def main(argv: Optional[list] = None) -> int:
    a = get_args(argv)
    from megatron_rlp.cli import run_main

    return run_main("tpt_augment", lambda: _augment_file(a), errors=(ValueError,))


def _augment_file(a) -> None:
    _check(a)
    docs = _read(a.input, a.text_key, a.limit)
    from tqdm import tqdm

    import megatron_rlp
    from megatron_rlp.data.corpus import write_jsonl
    from megatron_rlp.data.tokenizer import build_tokenizer

    model = megatron_rlp.load_model(a.load)
    d = model.run_config.data
    tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model)
    with tqdm(total=len(docs), desc="thinking", unit="doc", disable=None) as bar:
        augmented = augment(model, tokenizer, docs, a, bar)
    write_jsonl(augmented, a.output)  # atomic: temp file, then rename
    mean = sum(len(x["thinking"]) for x in augmented) / max(len(augmented), 1)
    print(json.dumps({"documents": len(augmented), "output": os.path.abspath(a.output),
                      "mean_thinking_chars": round(mean, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
