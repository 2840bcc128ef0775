"""Launch 2-rank gloo jobs of `megatron_rlp.train` (or any module) with torchrun, for tests.

Each launch costs ~5 s of megatron import per rank. torchrun leaves a `torchelastic_*` folder in
the temp directory, so TMPDIR points at a scratch folder the caller owns. A timeout turns a hang
(e.g. one rank waiting in a collective the others left) into a test failure instead of a stuck CI.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

from conftest import REPO_ROOT


def launch(args: List[str], nproc: int, scratch: str, timeout: float = 180,
           module: str = "megatron_rlp.train") -> subprocess.CompletedProcess:
    """`python -m <module> ARGS` in one process (nproc=1) or under `torchrun --standalone`."""
    tmp = os.path.join(scratch, "tmp")
    os.makedirs(tmp, exist_ok=True)
    env = dict(os.environ, TMPDIR=tmp, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO_ROOT)


def logged_losses(save_dir: str) -> Dict[int, float]:
    """iteration -> loss from `<save>/metrics.jsonl`."""
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["iteration"]: r["loss"] for r in records}


def checkpoint_as_if_killed_at(save_dir: str, iteration: int, dest: str) -> str:
    """Copy a run's save directory as it was right after saving `iteration`: later iterations
    removed, `latest` pointing at it (what a run killed after that save leaves)."""
    shutil.copytree(save_dir, dest, ignore=shutil.ignore_patterns("tensorboard", "cache"))
    for name in os.listdir(dest):
        if name.startswith("iter_") and int(name[5:12]) > iteration:
            shutil.rmtree(os.path.join(dest, name))
    with open(os.path.join(dest, "latest"), "w") as f:
        f.write(f"{iteration}\n")
    return dest


def max_rel_diff(a: Dict[int, float], b: Dict[int, float], iterations: Optional[list] = None):
    iterations = iterations or sorted(a)
    return max(abs(a[i] - b[i]) / abs(b[i]) for i in iterations)


def error_lines(result: subprocess.CompletedProcess) -> List[str]:
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("megatron-rlp-train: error:")]
