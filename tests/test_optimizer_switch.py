"""Resuming with --use-distributed-optimizer switched on or off, and the DP size changed with it,
carries the optimizer over exactly (Adam moments, step count, bf16's fp32 master weights): the
resumed losses equal those of the run that never switched.

Two chains of runs (torchrun, gloo), 6 iterations each, checkpoints at 2 and 4:

    fp32: plain, 1 process -> resumed at 2: distributed, DP 2 -> resumed at 4: plain, 1 process
    bf16: plain, DP 2      -> resumed at 2: distributed, DP 2 -> resumed at 4: plain, DP 2

Each resumed run is compared with the chain's first run, which never switched. The loss of
iteration N is computed before step N, so iterations after the first resumed one test the
optimizer state. Measured: the losses agree exactly, except one float32 ulp (5e-7) at iteration
3 of DP 1 -> 2 (a forward at another DP size); with the moments dropped (--no-load-optim)
iterations 4-6 move by 1e-1 to 3e-2, with the bf16 master copy taken from the bf16 weights
instead of the checkpoint by 4e-4 to 9e-4.
"""
import os

import pytest
import torch

from conftest import TINY_MODEL_SHAPE
from mp_utils import (checkpoint_as_if_killed_at, error_lines, launch, logged_losses,
                      max_rel_diff)

pytestmark = pytest.mark.slow

REL_TOL = 1e-6
ITERS = 6
TRAIN = ["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--train-iters", str(ITERS), "--log-interval", "1", "--lr", "3e-3",
         "--lr-warmup-iters", "1", "--seed", "7", "--save-interval", "2"]
DISTRIBUTED = ["--use-distributed-optimizer"]
# chain name -> (extra flags, processes of the plain runs); the distributed run always has 2
CHAINS = {"fp32": ([], 1), "bf16": (["--bf16"], 2)}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return str(tmp_path_factory.mktemp("optimizer_switch"))


@pytest.fixture(scope="module")
def base_args(embedded_dir):
    return TINY_MODEL_SHAPE + TRAIN + ["--embedded-data-dir", embedded_dir]


@pytest.fixture(scope="module")
def chains(scratch, base_args):
    """name -> {"plain": the never-switched run, "distributed": resumed from it at 2,
    "plain_again": resumed from that at 4} (save directories; each launched once, lazily)."""
    done = {}

    def get(name):
        if name in done:
            return done[name]
        flags, nproc = CHAINS[name]
        first = os.path.join(scratch, f"{name}_plain")
        result = launch(base_args + flags + ["--save", first], nproc, scratch)
        assert result.returncode == 0, result.stderr[-3000:]
        switched = _resume(scratch, base_args, first, 2, f"{name}_distributed", 2,
                           flags + DISTRIBUTED)
        back = _resume(scratch, base_args, switched, 4, f"{name}_plain_again", nproc, flags)
        done[name] = {"plain": first, "distributed": switched, "plain_again": back}
        return done[name]

    return get


def _resume(scratch, base_args, source, iteration, name, nproc, flags):
    save = checkpoint_as_if_killed_at(source, iteration, os.path.join(scratch, name))
    result = launch(base_args + flags + ["--load", save, "--save", save], nproc, scratch)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at {iteration}" in result.stdout, result.stdout[-2000:]
    return save


def _saved_with_distributed_optimizer(save, iteration):
    common = torch.load(os.path.join(save, f"iter_{iteration:07d}", "common.pt"),
                        weights_only=True)
    return "param_state_sharding_type" in common["optimizer"]


def _check_continues(resumed, reference, first_resumed_iteration, label):
    later = list(range(first_resumed_iteration, ITERS + 1))
    assert sorted(resumed) == list(range(1, ITERS + 1)), resumed
    diff = max_rel_diff(resumed, reference, later)
    print(f"{label}: max relative loss difference over iterations {later} = {diff:.2e}")
    assert diff <= REL_TOL, (label, {i: (resumed[i], reference[i]) for i in later})


@pytest.mark.parametrize("chain", ["fp32", "bf16"])
def test_plain_to_distributed_optimizer_continues_the_unswitched_losses(chains, chain):
    runs = chains(chain)
    assert not _saved_with_distributed_optimizer(runs["plain"], 2)
    assert _saved_with_distributed_optimizer(runs["distributed"], 4)
    dp = CHAINS[chain][1]
    _check_continues(logged_losses(runs["distributed"]), logged_losses(runs["plain"]), 3,
                     f"{chain} plain DP{dp} -> distributed DP2")


@pytest.mark.parametrize("chain", ["fp32", "bf16"])
def test_distributed_to_plain_optimizer_continues_the_unswitched_losses(chains, chain):
    runs = chains(chain)
    assert not _saved_with_distributed_optimizer(runs["plain_again"], 6)
    dp = CHAINS[chain][1]
    _check_continues(logged_losses(runs["plain_again"]), logged_losses(runs["plain"]), 5,
                     f"{chain} distributed DP2 -> plain DP{dp}")


def test_switching_optimizer_and_precision_together_stops_with_one_line(chains, scratch,
                                                                        base_args):
    """A plain fp32 checkpoint has no fp32 master copy for a bf16 run (only its weights, which
    the bf16 model rounds): refused, naming the way out, before anything is written."""
    save = checkpoint_as_if_killed_at(chains("fp32")["plain"], 2,
                                      os.path.join(scratch, "to_bf16_distributed"))
    metrics = open(os.path.join(save, "metrics.jsonl")).read()
    result = launch(base_args + ["--bf16"] + DISTRIBUTED + ["--load", save, "--save", save], 1,
                    scratch, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert ("was saved in fp32 without --use-distributed-optimizer; this run is in bf16 with "
            "--use-distributed-optimizer") in lines[0], lines[0]
    assert "--no-load-optim" in lines[0], lines[0]
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == ["iter_0000002"]
    assert open(os.path.join(save, "latest")).read().strip() == "2"
    assert open(os.path.join(save, "metrics.jsonl")).read() == metrics
