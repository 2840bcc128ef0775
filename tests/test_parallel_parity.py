"""TP / PP / DP / SP / distributed-optimizer runs reproduce the one-process run, and their
checkpoints reshard: multi-process (2 gloo ranks, torchrun; 4 for TP2 x PP2 x SP) runs of
`megatron_rlp.train`.

Every layout trains the same tiny fp32 hybrid model (all three layer kinds) for 4 steps from the
same seed on the same global batches (8 sequences = 4 micro-batches of 2 at DP=1, 2 per rank at
DP=2), saving at step 2. Init depends only on (seed, global parameter name), so all layouts start
from the same weights; losses must agree to 1e-5 relative.
"""
import os
import subprocess
import sys

import pytest

from conftest import TINY_MODEL_SHAPE
from mp_utils import (REPO_ROOT, checkpoint_as_if_killed_at, error_lines, launch, logged_losses,
                      max_rel_diff)

pytestmark = pytest.mark.slow

REL_TOL = 1e-5
ITERS = 4
SAVED_AT = 2
MODEL = TINY_MODEL_SHAPE
TRAIN = ["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--train-iters", str(ITERS), "--log-interval", "1", "--lr", "3e-3",
         "--lr-warmup-iters", "1", "--seed", "7"]
LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2": (2, []),
    "dp2_distopt": (2, ["--use-distributed-optimizer"]),
    # the GPU default: the DP reduce starts from backward hooks (async gloo here) and waits in
    # finalize; gradient accumulation (2 micro-batches per rank) must hold it back until the last
    "dp2_overlap": (2, ["--overlap-grad-reduce"]),
    "dp2_distopt_overlap": (2, ["--use-distributed-optimizer", "--overlap-grad-reduce"]),
    # all three at once on 4 ranks (DP=1): TP pairs inside each pipeline stage, SP between them
    "tp2_pp2_sp": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                       "--sequence-parallel"]),
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return str(tmp_path_factory.mktemp("parallel"))


@pytest.fixture(scope="module")
def base_args(embedded_dir):
    return MODEL + TRAIN + ["--embedded-data-dir", embedded_dir]


@pytest.fixture(scope="module")
def runs(scratch, base_args):
    """Layout name -> save directory of its finished run (each layout launched once, lazily)."""
    done = {}

    def get(name):
        if name not in done:
            nproc, flags = LAYOUTS[name]
            save = os.path.join(scratch, name)
            result = launch(base_args + flags + ["--save", save, "--save-interval", str(SAVED_AT)],
                            nproc, scratch)
            assert result.returncode == 0, result.stderr[-3000:]
            done[name] = save
        return done[name]

    return get


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "pp2", "dp2", "dp2_distopt", "dp2_overlap",
                                    "dp2_distopt_overlap", "tp2_pp2_sp"])
def test_parallel_layout_losses_match_one_process(runs, layout):
    reference = logged_losses(runs("tp1"))
    losses = logged_losses(runs(layout))
    assert sorted(losses) == list(range(1, ITERS + 1))
    diff = max_rel_diff(losses, reference)
    print(f"{layout}: max relative loss difference vs 1 process = {diff:.2e}")
    assert diff <= REL_TOL, (layout, losses, reference)


@pytest.mark.parametrize("saved_layout,resumed_layout", [
    ("tp2", "tp1"),            # reshard TP 2 -> 1
    ("tp1", "tp2"),            # reshard TP 1 -> 2
    ("pp2", "tp1"),            # reshard PP 2 -> 1
    ("dp2_distopt", "dp2_distopt"),  # distributed optimizer resume (0.16.1 bugs without TE/Apex)
    ("tp2_pp2_sp", "tp1"),     # reshard TP 2 x PP 2 (4 ranks) -> 1 process
])
def test_resumed_run_continues_the_saving_runs_losses(runs, scratch, base_args, saved_layout,
                                                      resumed_layout):
    saved = runs(saved_layout)
    resume_dir = checkpoint_as_if_killed_at(
        saved, SAVED_AT, os.path.join(scratch, f"resume_{saved_layout}_to_{resumed_layout}"))
    nproc, flags = LAYOUTS[resumed_layout]
    result = launch(base_args + flags + ["--load", resume_dir, "--save", resume_dir], nproc,
                    scratch)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at {SAVED_AT}" in result.stdout
    resumed = logged_losses(resume_dir)
    original = logged_losses(saved)
    later = list(range(SAVED_AT + 1, ITERS + 1))
    diff = max_rel_diff(resumed, original, later)
    print(f"{saved_layout} -> {resumed_layout}: max relative difference after resume = {diff:.2e}")
    assert diff <= REL_TOL, (resumed, original)


def test_load_model_reads_tp2_and_pp2_checkpoints(runs):
    """`load_model` builds TP=PP=1 in one process; the TP2 and PP2 runs' final weights equal the
    one-process run's (up to fp32 reduction order), so their logits must agree."""
    dirs = [runs("tp1"), runs("tp2"), runs("pp2")]
    script = (
        "import sys, torch\n"
        "from megatron_rlp import load_model\n"
        "ids = torch.arange(32).remainder(1000).view(2, 16)\n"
        "out = [load_model(d)(ids) for d in sys.argv[1:]]\n"
        "assert out[0].shape == (2, 16, out[0].shape[-1]) and out[0].dtype == torch.float32\n"
        "print('DIFF', max(float((o - out[0]).abs().max()) for o in out[1:]))\n")
    result = subprocess.run([sys.executable, "-c", script, *dirs], capture_output=True,
                            text=True, timeout=120, cwd=REPO_ROOT,
                            env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("DIFF")[-1])
    assert diff < 1e-4, diff


@pytest.mark.parametrize("flags,message", [
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
     "world size 2 is not divisible by TP x PP = 2 x 2"),
    (["--tensor-model-parallel-size", "2", "--num-query-groups", "1"],
     "--num-query-groups=1: must be divisible by --tensor-model-parallel-size=2"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
     "interleaved (virtual) pipeline parallelism is not supported"),
])
def test_bad_layout_fails_on_every_rank_with_one_line(scratch, base_args, flags, message):
    result = launch(base_args + flags + ["--save", os.path.join(scratch, "bad")], 2, scratch,
                    timeout=90)
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # torchrun's report: ranks exited cleanly, code 2


def test_checkpoint_of_another_shape_fails_on_every_rank_with_one_line(runs, scratch, base_args):
    saved = runs("tp2")
    args = base_args + ["--tensor-model-parallel-size", "2", "--hidden-size", "32",
                        "--load", saved, "--save", os.path.join(scratch, "bad_shape")]
    result = launch(args, 2, scratch, timeout=90)
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert "does not fit this model" in lines[0] and "(1024, 64)" in lines[0], lines[0]
