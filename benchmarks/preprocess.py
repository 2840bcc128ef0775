#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py with 1 and 2 workers on a generated JSONL.

    python benchmarks/preprocess.py [--size-mb 50] [--workers 1 2] [--keep DIR]

Writes ~size-mb of embedded-corpus documents as JSONL (page-cache hot afterwards), runs the real
command line once per worker count with --append-eod, and reads the tool's own timing (first line
read → outputs renamed; interpreter and megatron-core start-up excluded). Prints documents/s and
tokens/s per run, the speed-up over 1 worker and its share of the ideal (min(workers, cores)), and
CPU seconds per run (the trustworthy figure on a shared machine); checks the outputs are
byte-identical and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_rlp.data.corpus import generate_document, write_jsonl  # noqa: E402

TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def make_jsonl(path: str, size_mb: float, seed: int = 0) -> int:
    """Write documents 0, 1, 2, ... of the corpus until the file reaches size_mb."""
    target, docs, size = size_mb * 1e6, [], 0
    while size < target:
        doc = generate_document(len(docs), seed)
        docs.append(doc)
        size += len(json.dumps(doc, ensure_ascii=False).encode("utf-8")) + 1
    write_jsonl(docs, path)
    return len(docs)


def run_tool(inp: str, prefix: str, workers: int) -> dict:
    cmd = [sys.executable, TOOL, "--input", inp, "--output-prefix", prefix, "--append-eod",
           "--workers", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"preprocess_data.py failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # CPU seconds of the tool and its workers, start-up included: with a busy machine the wall
    # ratio is noise, while equal CPU totals show the workers add no overhead.
    result["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=50.0, help="size of the generated JSONL")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--keep", default=None, help="work in this folder and keep the files")
    args = p.parse_args()
    if args.workers[0] != 1:
        args.workers = [1] + args.workers  # the baseline

    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or scratch
        os.makedirs(work, exist_ok=True)
        inp = os.path.join(work, "bench.jsonl")
        t0 = time.perf_counter()
        n_docs = make_jsonl(inp, args.size_mb)
        print(f"generated {n_docs} documents, {os.path.getsize(inp) / 1e6:.1f} MB "
              f"in {time.perf_counter() - t0:.1f} s")
        runs = {}
        for w in args.workers:
            r = run_tool(inp, os.path.join(work, f"w{w}"), w)
            runs[w] = r
            print(f"workers={w}: {r['documents']} docs, {r['tokens']} tokens "
                  f"in {r['seconds']:.2f} s"
                  f" -> {r['docs_per_s']:.0f} docs/s, {r['tokens_per_s']:.0f} tokens/s "
                  f"({r['cpu_s']:.1f} CPU s incl. start-up)")
        base = runs[1]
        identical = all(
            filecmp.cmp(os.path.join(work, f"w1_text_document{ext}"),
                        os.path.join(work, f"w{w}_text_document{ext}"), shallow=False)
            for w in args.workers for ext in (".bin", ".idx")
        )
        cores = os.cpu_count() or 1
        result = {"benchmark": "preprocess", "size_mb": round(os.path.getsize(inp) / 1e6, 2),
                  "documents": base["documents"], "tokens": base["tokens"], "cores": cores,
                  "outputs_identical": identical,
                  "load_avg_1min": round(os.getloadavg()[0], 2)}
        for w in args.workers:
            r = runs[w]
            speedup = base["seconds"] / r["seconds"]
            result[f"w{w}_docs_per_s"] = r["docs_per_s"]
            result[f"w{w}_tokens_per_s"] = r["tokens_per_s"]
            result[f"w{w}_cpu_s"] = r["cpu_s"]
            if w != 1:
                ideal = min(w, cores)
                result[f"speedup_w{w}"] = round(speedup, 3)
                result[f"share_of_ideal_w{w}"] = round(speedup / ideal, 3)
                print(f"speed-up {w} workers / 1 worker: {speedup:.2f}x "
                      f"({100 * speedup / ideal:.0f}% of the ideal {ideal}x on {cores} cores)")
        print(f"outputs byte-identical across worker counts: {identical}; "
              f"load average {os.getloadavg()[0]:.1f} on {cores} cores "
              f"(>> cores: ratios are noise)")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
