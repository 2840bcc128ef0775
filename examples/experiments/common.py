"""Shared helpers for the small-scale reproductions in examples/experiments/.

Each experiment script launches training runs through the public CLI (`python -m
megatron_rlp.train`, one subprocess per run, so a crash or a leaked process group in one run
cannot poison the next), reads `<save>/metrics.jsonl`, evaluates checkpoints in-process with
`megatron_rlp.load_model`, and writes `report.md`, `metrics.json` and PNG plots. Files are
written atomically (temp file + rename), so a half-finished experiment never leaves a report
that looks complete.

Scales: every script has a `--quick` smoke mode (CI, tens of seconds) and a full mode. The model
shapes below are the only knobs shared between experiments; each script picks one.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Model shapes (Megatron flag names). "micro" is for --quick smoke runs: 3 blocks (Mamba,
# attention, MLP) so every layer kind is exercised; "tiny" is examples/tiny_cpu.yaml's shape.
SHAPES = {
    "micro": {
        "num-layers": 3, "hybrid-override-pattern": "M*-", "hidden-size": 32,
        "ffn-hidden-size": 64, "num-attention-heads": 2, "num-query-groups": 1,
        "mamba-num-heads": 2, "mamba-head-dim": 16, "mamba-state-dim": 8,
        "mamba-num-groups": 1, "mamba-chunk-size": 16,
    },
    "small": {
        "num-layers": 4, "hybrid-override-pattern": "M*M-", "hidden-size": 96,
        "ffn-hidden-size": 384, "num-attention-heads": 4, "num-query-groups": 2,
        "mamba-num-heads": 4, "mamba-head-dim": 48, "mamba-state-dim": 16,
        "mamba-num-groups": 2, "mamba-chunk-size": 32,
    },
    "tiny": {
        "num-layers": 6, "hybrid-override-pattern": "M*M-M-", "hidden-size": 160,
        "ffn-hidden-size": 640, "num-attention-heads": 4, "num-query-groups": 2,
        "mamba-num-heads": 8, "mamba-head-dim": 40, "mamba-state-dim": 32,
        "mamba-num-groups": 2, "mamba-chunk-size": 64,
    },
}


def flags(d: dict) -> list[str]:
    """{'hidden-size': 32, 'bf16': True} -> ['--hidden-size', '32', '--bf16'] (False: dropped;
    lists are spread as several values)."""
    out = []
    for k, v in d.items():
        if v is None or v is False:
            continue
        out.append(f"--{k}")
        if v is True:
            continue
        out.extend(str(x) for x in v) if isinstance(v, (list, tuple)) else out.append(str(v))
    return out


def default_embedded_dir() -> str:
    return os.environ.get("MEGATRON_RLP_EMBEDDED_DIR",
                          os.path.expanduser("~/.cache/megatron_rlp/embedded"))


def ensure_embedded(embedded_dir: Optional[str] = None) -> str:
    """Build (once; cached and file-locked) the embedded corpus; returns its folder."""
    from megatron_rlp.data.embedded import ensure_embedded_dataset

    d = embedded_dir or default_embedded_dir()
    ensure_embedded_dataset(d)
    return d


# ----------------------------------------------------------------------------------------------
# running the trainer
# ----------------------------------------------------------------------------------------------
def train(save: str, args: list[str], log_name: str = "train.log", reuse: bool = True) -> list[dict]:
    """Run `python -m megatron_rlp.train ARGS --save SAVE`; return its metrics.jsonl rows.

    With `reuse`, a save folder that already holds a finished run (a `done.json` marker written
    after a zero exit) is not retrained: experiments can be resumed after an interruption.
    A failed run raises with the tail of its log.
    """
    os.makedirs(save, exist_ok=True)
    marker = os.path.join(save, "done.json")
    if reuse and os.path.exists(marker):
        return read_metrics(save)
    metrics = os.path.join(save, "metrics.jsonl")
    if os.path.exists(metrics):  # a half-run from before: start over, metrics append otherwise
        os.unlink(metrics)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "megatron_rlp.train", *args, "--save", save]
    t0 = time.perf_counter()
    with open(os.path.join(save, log_name), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    if rc != 0:
        with open(os.path.join(save, log_name)) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"training run failed (exit {rc}): {' '.join(cmd)}\n{tail}")
    write_json(marker, {"wall_s": wall, "cmd": cmd})
    return read_metrics(save)


def read_metrics(save: str) -> list[dict]:
    path = os.path.join(save, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_wall_s(save: str) -> float:
    with open(os.path.join(save, "done.json")) as f:
        return float(json.load(f)["wall_s"])


def series(rows: list[dict], key: str, x: str = "iteration") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def last(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        raise KeyError(f"no {key!r} in metrics")
    return float(vals[-1])


# ----------------------------------------------------------------------------------------------
# evaluation with megatron_rlp.load_model
# ----------------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_tokens(checkpoint: str, texts: Iterable[str], seq_length: int,
                classify: Callable[[list[str]], list[str]],
                max_windows: Optional[int] = None) -> dict:
    """Per-category next-token loss and accuracy of a checkpoint on held-out texts.

    Each text is tokenised (+<eod>) and cut into windows of seq_length + 1 tokens (no packing
    across documents, so the model always starts at a document start). `classify(tokens)` gives a
    category name (or "" to skip) for each *target* position, i.e. tokens[1:]. Returns
    {category: {"loss": mean nll (nats), "acc": argmax accuracy, "tokens": count}}.
    """
    import torch

    import megatron_rlp
    from megatron_rlp.data.tokenizer import build_tokenizer

    model = megatron_rlp.load_model(checkpoint)
    cfg = model.run_config
    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    sums: dict[str, list[float]] = {}
    windows = 0
    with torch.no_grad():
        for text in texts:
            ids = tok.encode(text) + [tok.eod]
            pieces = [tok.id_to_token(i) or "" for i in ids]
            cats = classify(pieces)
            for start in range(0, len(ids) - 1, seq_length):
                chunk = ids[start:start + seq_length + 1]
                if len(chunk) < 2:
                    break
                x = torch.tensor([chunk[:-1]])
                y = torch.tensor(chunk[1:])
                logits = model(x)[0].cpu()  # model(...) runs on its own device (GPU if any)
                nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                hit = (logits.argmax(-1) == y).float()
                for j in range(len(y)):
                    c = cats[start + j]
                    if not c:
                        continue
                    s = sums.setdefault(c, [0.0, 0.0, 0])
                    s[0] += float(nll[j])
                    s[1] += float(hit[j])
                    s[2] += 1
                windows += 1
                if max_windows and windows >= max_windows:
                    break
            if max_windows and windows >= max_windows:
                break
    return {c: {"loss": s[0] / s[2], "acc": s[1] / s[2], "tokens": int(s[2])}
            for c, s in sorted(sums.items())}


# ----------------------------------------------------------------------------------------------
# stats, tables, plots, atomic writes
# ----------------------------------------------------------------------------------------------
def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt(x, digits: int = 4) -> str:
    if isinstance(x, float):
        if x != 0 and abs(x) < 10 ** -(digits - 1):  # e.g. a learning rate of 1e-6
            return f"{x:.3g}"
        return f"{x:.{digits}f}"
    return str(x)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def all_finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_text(path: str, text: str) -> None:
    _atomic_write(path, text.encode())


def write_results(out: str, metrics: dict, report_md: str) -> None:
    """Every experiment's result files: ``metrics.json`` (all numbers) and ``report.md``."""
    write_json(os.path.join(out, "metrics.json"), metrics)
    write_text(os.path.join(out, "report.md"), report_md)


def plot(path: str, curves: dict, title: str, xlabel: str, ylabel: str,
         logy: bool = False) -> str:
    """curves: {label: (xs, ys)} or {label: (xs, ys, style_kwargs)}. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, c in curves.items():
        kw = c[2] if len(c) > 2 else {}
        ax.plot(c[0], c[1], label=label, **kw)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure atomically (temp PNG in the same folder, then rename), close it."""
    import matplotlib.pyplot as plt

    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return os.path.basename(path)


def base_parser(name: str, doc: str):
    import argparse

    p = argparse.ArgumentParser(prog=name, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test scale (CI)")
    p.add_argument("--out", default=None, help=f"output folder (default runs/experiments/{name})")
    p.add_argument("--embedded-data-dir", default=None,
                   help="embedded corpus folder (default ~/.cache/megatron_rlp/embedded)")
    p.add_argument("--fresh", action="store_true",
                   help="retrain runs even if their save folder holds a finished run")
    return p


def out_dir(args, name: str) -> str:
    d = args.out or os.path.join(REPO, "runs", "experiments", name + ("_quick" if args.quick else ""))
    os.makedirs(d, exist_ok=True)
    return os.path.abspath(d)
