"""End-to-end training on the tiny hybrid model: loss falls, logs and schedules are right, and a
resumed run (including one killed with SIGKILL right after a save) repeats the uninterrupted one."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, read_metrics, run_cli


def test_tiny_run_loss_falls_and_metrics_are_logged(tiny_flags, tmp_path):
    save = str(tmp_path / "run")
    result = run_cli(tiny_flags + ["--train-iters", "30", "--save", save,
                                   "--eval-interval", "30", "--eval-iters", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_metrics(save)
    assert [r["iteration"] for r in records] == list(range(1, 31))
    for key in ("iteration", "stage", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in records[-1], key
    assert records[-1]["stage"] == "pretrain"
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[-1]["valid_loss"] < records[0]["loss"]
    assert "ETA" in result.stdout and "done: iterations 0->30" in result.stdout
    assert open(os.path.join(save, "latest")).read().strip() == "30"
    assert os.path.isdir(os.path.join(save, "iter_0000030"))


def test_bf16_run_trains(tiny_flags, tmp_path):
    save = str(tmp_path / "bf16")
    result = run_cli(tiny_flags + ["--train-iters", "12", "--save", save, "--bf16"])
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [r["loss"] for r in read_metrics(save)]
    assert losses[-1] < losses[0] - 0.5


def _losses_by_iteration(save):
    return {r["iteration"]: r["loss"] for r in read_metrics(save)}


def test_resume_after_sigkill_repeats_uninterrupted_losses(tiny_flags, tmp_path):
    schedule = ["--lr-decay-iters", "8", "--log-interval", "1"]
    reference = str(tmp_path / "straight")
    result = run_cli(tiny_flags + schedule + ["--train-iters", "8", "--save", reference])
    assert result.returncode == 0, result.stderr[-2000:]

    # A long run that saves every 4 iterations; SIGKILL it as soon as iteration 4 is complete.
    killed = str(tmp_path / "killed")
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "megatron_rlp.train", *tiny_flags, *schedule,
         "--train-iters", "400", "--save-interval", "4", "--save", killed],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(killed, "latest")
    deadline = time.time() + 240
    while not os.path.exists(latest) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.exists(latest), "the run never completed a save"
    saved = int(open(latest).read())
    assert saved % 4 == 0 and saved < 8

    resumed = run_cli(tiny_flags + schedule + ["--train-iters", "8", "--save", killed,
                                               "--load", killed])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at {saved}" in resumed.stdout
    expected, got = _losses_by_iteration(reference), _losses_by_iteration(killed)
    assert sorted(got) == list(range(1, 9))  # records past the checkpoint were replaced
    for iteration in range(saved + 1, 9):
        assert abs(got[iteration] - expected[iteration]) <= 1e-6, iteration


@pytest.mark.parametrize("extra,message", [
    (["--hybrid-override-pattern", "M*Q-"], "unknown layer symbol(s) ['Q']"),
    (["--num-layers", "5"], "has 4 layers but --num-layers is 5"),
    (["--num-query-groups", "3"], "must divide --num-attention-heads=4"),
    (["--data-path", "/nonexistent/corpus_text_document"], "/nonexistent/corpus_text_document"),
    (["--save", "/proc/forbidden"], "is not writable"),
])
def test_bad_input_fails_with_one_line_and_writes_nothing(tiny_flags, tmp_path, extra, message):
    save = str(tmp_path / "out")
    args = tiny_flags + ["--train-iters", "2"]
    if "--save" not in extra:
        args += ["--save", save]
    result = run_cli(args + extra)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert not os.path.exists(os.path.join(save, "latest"))


def test_unknown_flag_is_one_line_error():
    result = run_cli(["--hiden-size", "8"])
    assert result.returncode == 2
    assert "unrecognized arguments: --hiden-size" in result.stderr


def test_non_finite_gradients_stop_the_run_without_saving(tiny_flags, tmp_path):
    save = str(tmp_path / "diverged")
    result = run_cli(tiny_flags + ["--train-iters", "20", "--save", save, "--save-interval", "50",
                                   "--lr", "1e30", "--min-lr", "1e30", "--lr-warmup-iters", "0"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "non-finite gradient norm" in result.stderr
    assert not os.path.exists(os.path.join(save, "latest"))


def test_resuming_without_a_components_saved_state_is_one_clear_error(tiny_flags, tmp_path):
    """A checkpoint without e.g. the RLP EMA teacher must not resume that component silently
    from scratch: load_checkpoint names the missing state and how to start a new stage instead."""
    from megatron_rlp.config import parse_args
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.checkpoint import load_checkpoint
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    save = str(tmp_path / "pretrain")
    result = run_cli(tiny_flags + ["--train-iters", "2", "--save", save])
    assert result.returncode == 0, result.stderr[-2000:]

    class Teacher:   # never asked for its state: the check fires before anything is read
        def sharded_state_dict(self):
            raise AssertionError("unreachable")

        def load_sharded_state_dict(self, state):
            raise AssertionError("unreachable")

    cfg = parse_args(tiny_flags)
    init_distributed(cfg.parallel, seed=cfg.training.seed)
    try:
        model = build_model(cfg, vocab_size=1024)
        with pytest.raises(ValueError, match=r"iter_0000002 has no saved state for 'ema_teacher' "
                                             r"\(keys 'ext_ema_teacher\*'\).*--finetune"):
            load_checkpoint(save, [model], components={"ema_teacher": Teacher()})
        # the same checkpoint loads fine without the component
        assert load_checkpoint(save, [model])["iteration"] == 2
    finally:
        destroy_distributed()
