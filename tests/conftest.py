"""Shared fixtures: a tiny model's CLI flags and one embedded corpus per test session.

Test processes share megatron's global parallel state; `megatron_rlp.train.main` tears it down at
the end of each run, so in-process runs can follow one another.
"""
import os
import subprocess
import sys

import pytest
import torch

# Triton decides interpreted-or-compiled when a kernel module is first imported, and any test may
# import it first (quant -> kernels): set the interpreter for the whole session on CPU hosts.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough that a 10-iteration run takes a few seconds on 2 cores, with all three layer kinds.
TINY_MODEL_SHAPE = [
    "--num-layers", "4", "--hybrid-override-pattern", "M*M-",
    "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--num-query-groups", "2",
    "--mamba-num-heads", "4", "--mamba-head-dim", "16", "--mamba-state-dim", "16",
    "--mamba-num-groups", "2", "--mamba-chunk-size", "16",
]
TINY_MODEL_FLAGS = TINY_MODEL_SHAPE + [
    "--seq-length", "64", "--micro-batch-size", "4",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--log-interval", "1",
]


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory):
    """The embedded corpus, generated once per session (~6 s)."""
    from megatron_rlp.data.embedded import ensure_embedded_dataset

    out = str(tmp_path_factory.mktemp("embedded"))
    ensure_embedded_dataset(out)
    return out


@pytest.fixture
def run_copy(saved_run, tmp_path):
    """A private copy of the module's `saved_run` directory (a test may damage it)."""
    import shutil

    copy = str(tmp_path / "run")
    shutil.copytree(saved_run, copy)
    return copy


@pytest.fixture
def tiny_flags(embedded_dir):
    return TINY_MODEL_FLAGS + ["--embedded-data-dir", embedded_dir]


def run_cli(args, timeout=300, env=None, module="megatron_rlp.train"):
    """Run a console entry point in a fresh process; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("TORCHDYNAMO_DISABLE", "1")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO_ROOT)


def read_metrics(save_dir):
    import json

    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
