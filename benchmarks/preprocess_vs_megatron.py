#!/usr/bin/env python
"""Our tools/preprocess_data.py against Megatron-LM's, on the same JSONL and tokenizer, in one run.

    python benchmarks/preprocess_vs_megatron.py --megatron-lm PATH [--size-mb 20] [--workers 1 4]

PATH is a checkout of NVIDIA/Megatron-LM at tag core_v0.16.1 (the megatron-core we pin), e.g.

    git clone --depth 1 --branch core_v0.16.1 https://github.com/NVIDIA/Megatron-LM

Megatron's tool runs from it with PYTHONPATH=PATH (it needs `megatron/training`, which the
megatron-core wheel lacks) and needs torch and transformers, both installed with our [dev] extra.

The input is embedded-corpus documents (benchmarks/preprocess.py's generator) with an empty text
every --empty-every documents, so Megatron-LM's empty-document rule is exercised. Both tools use
the embedded tokenizer: ours as `HuggingFaceTokenizer tokenizer.json`, Megatron's as
`HuggingFaceTokenizer DIR` (transformers' fast tokenizer over the same tokenizer.json, `<eod>` as
EOS), both with --append-eod. Each tool runs once per worker count, as a fresh process, page cache
hot. Reported per run:
  - wall seconds and CPU seconds (the tool and all its workers, from getrusage) of the whole
    command, and of its start-up (the same command on a one-line input). tokens/s is computed over
    wall minus start-up (the processing alone); tokens per CPU-second over CPU minus start-up CPU,
    which stays meaningful on a shared machine where wall time is noise;
  - peak RSS and peak PSS of the process tree (sampled every 100 ms with psutil, summed over the
    tool and its workers). RSS counts the pages a forked worker shares with its parent once per
    process (Megatron forks workers from a parent that imported torch); PSS divides them fairly.
It checks that every output pair (.bin, .idx) is byte-identical to Megatron's at the same worker
count and across worker counts, prints ratios (ours / Megatron) and ends with one JSON line.
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
import threading
import time

import psutil

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, REPO)

from preprocess import make_jsonl  # noqa: E402  (benchmarks/preprocess.py)

from megatron_rlp.data.indexed import read_indexed_dataset  # noqa: E402
from megatron_rlp.data.tokenizer import EOD, PAD, build_tokenizer  # noqa: E402

OURS = os.path.join(REPO, "tools", "preprocess_data.py")
MEGATRON_TOOL = os.path.join("tools", "preprocess_data.py")


def check_checkout(path: str) -> None:
    needed = [MEGATRON_TOOL, os.path.join("megatron", "training", "tokenizer")]
    missing = [p for p in needed if not os.path.exists(os.path.join(path, p))]
    if missing:
        raise SystemExit(
            f"error: --megatron-lm {path!r} is not a Megatron-LM checkout (missing "
            f"{', '.join(missing)}); get one with: git clone --depth 1 --branch core_v0.16.1 "
            "https://github.com/NVIDIA/Megatron-LM")


def write_input(path: str, size_mb: float, empty_every: int) -> tuple[int, int]:
    """The generated corpus with an empty text after every `empty_every` documents;
    returns (documents, empty documents)."""
    base = path + ".base"
    make_jsonl(base, size_mb)
    documents = empty = 0
    with open(base, "rb") as src, open(path, "wb") as dst:
        for line in src:
            dst.write(line)
            documents += 1
            if empty_every and documents % empty_every == 0:
                dst.write(b'{"text": ""}\n')
                empty += 1
    os.remove(base)
    return documents + empty, empty


def write_tokenizers(folder: str) -> tuple[str, str]:
    """(tokenizer.json for ours, a transformers folder over the same file for Megatron's)."""
    hf_dir = os.path.join(folder, "hf_tokenizer")
    os.makedirs(hf_dir, exist_ok=True)
    tokenizer_json = os.path.join(hf_dir, "tokenizer.json")
    with open(tokenizer_json, "w", encoding="utf-8") as f:
        f.write(build_tokenizer("EmbeddedTokenizer").hf_tokenizer_json())
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD,
                   "pad_token": PAD}, f)
    return tokenizer_json, hf_dir


class TreeMemory:
    """Peak summed RSS and PSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, period: float = 0.1):
        self.root, self.period = psutil.Process(pid), period
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            try:
                processes = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for p in processes:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], env: dict, cwd: str) -> dict:
    cpu_before, start = _children_cpu_s(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    # Pool workers are waited for by the tool, so their CPU time is in the tool's own total.
    return {"wall_s": wall, "cpu_s": _children_cpu_s() - cpu_before,
            "peak_rss_mb": memory.peak_rss / 2**20, "peak_pss_mb": memory.peak_pss / 2**20}


def commands(tool: str, inp: str, prefix: str, workers: int, tokenizers: tuple,
             megatron_lm: str) -> tuple[list[str], dict, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if tool == "ours":
        cmd = [sys.executable, OURS, "--input", inp, "--output-prefix", prefix, "--append-eod",
               "--workers", str(workers), "--tokenizer-type", "HuggingFaceTokenizer",
               "--tokenizer-model", tokenizers[0]]
        return cmd, env, REPO
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [megatron_lm, env.get("PYTHONPATH")]))
    cmd = [sys.executable, MEGATRON_TOOL, "--input", inp, "--output-prefix", prefix,
           "--append-eod", "--workers", str(workers), "--tokenizer-type",
           "HuggingFaceTokenizer", "--tokenizer-model", tokenizers[1],
           "--log-interval", "1000000"]
    return cmd, env, megatron_lm


def same_files(prefix_a: str, prefix_b: str) -> bool:
    return all(filecmp.cmp(prefix_a + ext, prefix_b + ext, shallow=False)
               for ext in (".bin", ".idx"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron-lm", required=True,
                   help="Megatron-LM checkout at core_v0.16.1 (see the module docstring)")
    p.add_argument("--size-mb", type=float, default=20.0, help="size of the generated JSONL")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    p.add_argument("--empty-every", type=int, default=50,
                   help="an empty text after every N documents (0: none)")
    p.add_argument("--keep", default=None, help="work in this folder and keep the files")
    args = p.parse_args()
    megatron_lm = os.path.abspath(args.megatron_lm)
    check_checkout(megatron_lm)

    with tempfile.TemporaryDirectory() as scratch:
        work = os.path.abspath(args.keep or scratch)
        os.makedirs(work, exist_ok=True)
        inp, tiny = os.path.join(work, "bench.jsonl"), os.path.join(work, "one.jsonl")
        documents, empty = write_input(inp, args.size_mb, args.empty_every)
        with open(tiny, "w") as f:
            f.write('{"text": "1 + 1 = 2"}\n')
        tokenizers = write_tokenizers(work)
        print(f"input: {documents} documents ({empty} empty), "
              f"{os.path.getsize(inp) / 1e6:.1f} MB; {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)

        results, tokens = {}, None
        for workers in args.workers:
            for tool in ("megatron", "ours"):
                name = f"{tool}_w{workers}"
                startup = run(*commands(tool, tiny, os.path.join(work, f"{name}_one"), workers,
                                        tokenizers, megatron_lm))
                prefix = os.path.join(work, name)
                r = run(*commands(tool, inp, prefix, workers, tokenizers, megatron_lm))
                r["startup_s"], r["startup_cpu_s"] = startup["wall_s"], startup["cpu_s"]
                if tokens is None:
                    dataset = read_indexed_dataset(prefix + "_text_document")
                    tokens = int(dataset.sequence_lengths.sum())
                    del dataset
                # None when start-up noise exceeds the processing time (a busy machine).
                busy = r["wall_s"] - r["startup_s"]
                r["tokens_per_s"] = tokens / busy if busy > 0 else None
                r["tokens_per_cpu_s"] = tokens / max(r["cpu_s"] - r["startup_cpu_s"], 1e-9)
                results[name] = r
                shown = f"{r['tokens_per_s']:9.0f}" if r["tokens_per_s"] else "    noise"
                print(f"{name:12s} wall {r['wall_s']:6.1f} s (start-up {r['startup_s']:5.1f} s)"
                      f" {shown} tokens/s | CPU {r['cpu_s']:6.1f} s (start-up "
                      f"{r['startup_cpu_s']:4.1f} s) {r['tokens_per_cpu_s']:7.0f} tokens/CPU-s"
                      f" | peak RSS {r['peak_rss_mb']:5.0f} MB, PSS {r['peak_pss_mb']:5.0f} MB",
                      flush=True)

        def prefix_of(name):
            return os.path.join(work, f"{name}_text_document")

        identical = {f"w{w}": same_files(prefix_of(f"ours_w{w}"), prefix_of(f"megatron_w{w}"))
                     for w in args.workers}
        base = args.workers[0]
        identical["ours_across_workers"] = all(
            same_files(prefix_of(f"ours_w{base}"), prefix_of(f"ours_w{w}")) for w in args.workers)
        identical["megatron_across_workers"] = all(
            same_files(prefix_of(f"megatron_w{base}"), prefix_of(f"megatron_w{w}"))
            for w in args.workers)
        summary = {"benchmark": "preprocess_vs_megatron", "documents": documents,
                   "empty_documents": empty, "tokens": tokens,
                   "size_mb": round(os.path.getsize(inp) / 1e6, 2), "cores": os.cpu_count(),
                   "load_avg_1min": round(os.getloadavg()[0], 2),
                   "byte_identical": identical}
        for w in args.workers:
            ours, theirs = results[f"ours_w{w}"], results[f"megatron_w{w}"]
            for key in ("wall_s", "startup_s", "cpu_s", "startup_cpu_s", "tokens_per_s",
                        "tokens_per_cpu_s", "peak_rss_mb", "peak_pss_mb"):
                for tool, r in (("ours", ours), ("megatron", theirs)):
                    summary[f"{tool}_w{w}_{key}"] = None if r[key] is None else round(r[key], 2)
            ratios = {"tokens_per_s": None, "tokens_per_cpu_s": None, "peak_rss_mb": None,
                      "peak_pss_mb": None}
            for key in ratios:
                if ours[key] and theirs[key]:
                    ratios[key] = ours[key] / theirs[key]
                summary[f"w{w}_{key}_ratio"] = None if ratios[key] is None \
                    else round(ratios[key], 3)
            print(f"workers={w}, ours/Megatron: " + ", ".join(
                f"{key} {'n/a' if value is None else f'{value:.2f}x'}"
                for key, value in ratios.items())
                + f"; byte-identical outputs: {identical[f'w{w}']}")
        print(f"outputs identical across worker counts: ours {identical['ours_across_workers']}, "
              f"Megatron {identical['megatron_across_workers']}")
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
