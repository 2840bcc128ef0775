"""Long cluster runs the Megatron-LM way: exit on an interval or a wall-clock budget, resume with
changed schedule flags only when told which schedule wins, data order that does not depend on the
planned length, background saves and checkpoint retention."""
import os
import time

import numpy as np
import pytest
import torch

from conftest import read_metrics, run_cli
from megatron_rlp.data.indexed import write_indexed_dataset

SCHEDULE = ["--lr-decay-style", "cosine", "--lr-warmup-iters", "2"]


def _latest(save):
    return int(open(os.path.join(save, "latest")).read())


def _by_iteration(save, key="loss"):
    return {r["iteration"]: r[key] for r in read_metrics(save)}


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if "error:" in line]


# ---- --exit-interval / --exit-duration-in-mins ---------------------------------------------
def test_exit_interval_saves_and_exits_zero_then_resumes(tiny_flags, tmp_path):
    save = str(tmp_path / "run")
    first = run_cli(tiny_flags + SCHEDULE + ["--train-iters", "8", "--exit-interval", "3",
                                             "--save", save])
    assert first.returncode == 0, first.stderr[-2000:]
    assert "exit: --exit-interval 3 reached; saved iteration 3" in first.stdout
    assert _latest(save) == 3 and sorted(_by_iteration(save)) == [1, 2, 3]


def test_exit_duration_saves_at_the_first_boundary_past_the_budget(tiny_flags, tmp_path):
    save = str(tmp_path / "run")
    # A budget already spent by the imports: the run saves after its first iteration.
    result = run_cli(tiny_flags + ["--train-iters", "50", "--exit-duration-in-mins", "0.0001",
                                   "--save", save])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exit: --exit-duration-in-mins 0.0001 reached; saved iteration 1" in result.stdout
    assert _latest(save) == 1


@pytest.mark.parametrize("extra, message", [
    (["--exit-interval", "0"], "--exit-interval=0: must be > 0"),
    (["--exit-duration-in-mins", "-5", "--save", "RUN"], "--exit-duration-in-mins=-5.0: must be > 0"),
    (["--exit-duration-in-mins", "30"], "--save is not set, so nothing would be saved"),
    (["--keep-last-n-checkpoints", "0", "--save", "RUN"], "--keep-last-n-checkpoints=0: must be >= 1"),
    (["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"],
     "contradicts --use-checkpoint-opt-param-scheduler"),
])
def test_bad_long_run_flags_are_one_line_and_write_nothing(tiny_flags, tmp_path, extra, message):
    save = str(tmp_path / "run")
    result = run_cli(tiny_flags + [save if x == "RUN" else x for x in extra])
    assert result.returncode == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not os.path.exists(save)


# ---- resume with changed schedule flags ---------------------------------------------------
@pytest.fixture(scope="module")
def six_of_twelve(tmp_path_factory, embedded_dir):
    """A run planned for 12 iterations, and one planned for 6 (saved at 6) to be extended."""
    from conftest import TINY_MODEL_FLAGS

    flags = TINY_MODEL_FLAGS + ["--embedded-data-dir", embedded_dir] + SCHEDULE
    root = tmp_path_factory.mktemp("schedule")
    straight, short = str(root / "straight"), str(root / "short")
    for save, iters in ((straight, "12"), (short, "6")):
        result = run_cli(flags + ["--train-iters", iters, "--save", save])
        assert result.returncode == 0, result.stderr[-2000:]
    return flags, straight, short


def _extend(six_of_twelve, tmp_path, *extra):
    import shutil

    flags, straight, short = six_of_twelve
    save = str(tmp_path / "extended")
    shutil.copytree(short, save)
    return run_cli(flags + ["--train-iters", "12", "--save", save, "--load", save, *extra]), save


def test_a_changed_schedule_stops_the_resume_naming_flags_and_ways_out(six_of_twelve, tmp_path):
    result, save = _extend(six_of_twelve, tmp_path, "--lr", "1e-3")
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert "--train-iters 12 (checkpoint: 6; it sets the decay length)" in line
    assert "--lr 0.001 (checkpoint: 0.003)" in line
    assert "--override-opt-param-scheduler" in line
    assert "--use-checkpoint-opt-param-scheduler" in line
    assert _latest(save) == 6 and sorted(_by_iteration(save)) == list(range(1, 7))


def test_override_continues_with_the_command_lines_schedule(six_of_twelve, tmp_path):
    _, straight, _ = six_of_twelve
    result, save = _extend(six_of_twelve, tmp_path, "--override-opt-param-scheduler")
    assert result.returncode == 0, result.stderr[-2000:]
    planned, extended = _by_iteration(straight, "lr"), _by_iteration(save, "lr")
    for iteration in range(7, 13):  # the 12-iteration cosine, from iteration 7 on
        assert extended[iteration] == pytest.approx(planned[iteration], rel=1e-12)


def test_use_checkpoint_keeps_the_saved_schedule(six_of_twelve, tmp_path):
    result, save = _extend(six_of_twelve, tmp_path, "--use-checkpoint-opt-param-scheduler")
    assert result.returncode == 0, result.stderr[-2000:]
    lrs = _by_iteration(save, "lr")
    # The saved plan decayed to --min-lr at iteration 6 and stays there.
    assert all(lrs[i] == pytest.approx(3e-4, rel=1e-12) for i in range(7, 13))


def test_schedule_comparison_ignores_flags_that_change_no_learning_rate():
    from megatron_rlp.config import RunConfig
    from megatron_rlp.training.schedule import schedule_differences

    def flags(**changes):
        out = RunConfig().to_flat_dict()
        out.update(changes)
        return out

    explicit = dict(lr_decay_iters=100)
    assert schedule_differences(flags(train_iters=400, **explicit),
                                flags(train_iters=200, **explicit)) == []
    constant = dict(lr_decay_style="constant")
    assert schedule_differences(flags(train_iters=400, min_lr=0.0, **constant),
                                flags(train_iters=200, **constant)) == []
    wsd = dict(lr_decay_style="WSD")
    assert schedule_differences(flags(lr_wsd_decay_style="cosine", **wsd), flags(**wsd)) == [
        "--lr-wsd-decay-style cosine (checkpoint: linear)"]


# ---- data order does not depend on the planned length ---------------------------------------
def _small_corpus(tmp_path, name, seed):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(5, 200, size=int(rng.integers(3, 40))).tolist() for _ in range(60)]
    return write_indexed_dataset(str(tmp_path / name), docs, dtype=np.uint16)


@pytest.mark.parametrize("blend", ["single", "weighted"])
def test_the_first_samples_do_not_depend_on_how_many_were_planned(tmp_path, tokenizer, blend):
    from megatron_rlp.data.datasets import build_pretraining_dataset

    a = _small_corpus(tmp_path, "a", 0)
    data_path = [a] if blend == "single" else ["0.7", a, "0.3", _small_corpus(tmp_path, "b", 1)]

    def samples(planned, count):
        ds = build_pretraining_dataset(data_path, 16, planned, 7, tokenizer,
                                       cache_dir=str(tmp_path / f"cache{planned}"))
        return [ds[i]["tokens"] for i in range(count)], ds

    epoch = samples(1, 1)[1].epoch_size if blend == "single" else None
    n = 3 * (epoch or 60)  # well past one epoch of every source
    short, _ = samples(n, n)
    long, long_ds = samples(2 * n, 2 * n)
    assert all(torch.equal(x, y) for x, y in zip(short, long))
    # Later passes are reshuffled, not a repeat of the first.
    size = long_ds.epoch_size
    assert not all(torch.equal(long[i], long[size + i]) for i in range(min(size, 8)))


@pytest.fixture
def tokenizer():
    from megatron_rlp.data.tokenizer import build_tokenizer

    return build_tokenizer("EmbeddedTokenizer", None)


# ---- --async-save and --keep-last-n-checkpoints ---------------------------------------------
def test_async_save_trains_on_while_writing_and_moves_latest_only_when_complete(
        tiny_flags, tmp_path, monkeypatch, capsys):
    from megatron_rlp.train import main
    from megatron_rlp.training import ckpt_writer

    save = str(tmp_path / "async")
    seen = []
    original = ckpt_writer.write_buckets_in_threads

    def slow_writer(*args, **kwargs):
        # Iteration 4's files are not written until training has logged iteration 5 (or two
        # minutes passed: a trainer that waited for this write would never get there).
        if os.path.isdir(os.path.join(save, "iter_0000004.tmp")) and not seen:
            deadline = time.monotonic() + 120
            while max(_by_iteration(save)) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            seen.append((_latest(save), max(_by_iteration(save))))
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt_writer, "write_buckets_in_threads", slow_writer)
    flags = tiny_flags + SCHEDULE + ["--train-iters", "8", "--save-interval", "2",
                                     "--async-save", "--save", save]
    assert main(flags) == 0, capsys.readouterr().err[-2000:]
    (latest_during, logged_during), = seen
    assert latest_during == 2, "latest moved before the background write finished"
    assert logged_during > 4, "training waited for the background write"
    assert _latest(save) == 8

    # What was written is iteration 4's state, not whatever the later steps made of it: resumed
    # from it, a run repeats the losses this (uninterrupted) run logged after iteration 4.
    resumed = run_cli(tiny_flags + SCHEDULE + ["--train-iters", "8", "--save", str(tmp_path / "r"),
                                               "--load", save, "--ckpt-step", "4"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _by_iteration(save), _by_iteration(str(tmp_path / "r"))
    for iteration in range(5, 9):
        assert abs(got[iteration] - expected[iteration]) <= 1e-6, iteration


def test_a_failed_background_write_keeps_the_previous_checkpoint(tiny_flags, tmp_path,
                                                                monkeypatch, capsys):
    from megatron_rlp.train import main
    from megatron_rlp.training import ckpt_writer

    save = str(tmp_path / "async")
    original = ckpt_writer.write_buckets_in_threads

    def failing_writer(transform_list, use_msc, rank, buckets, results):
        if os.path.isdir(os.path.join(save, "iter_0000004.tmp")):
            results.put(OSError(28, "No space left on device", save))
            return
        return original(transform_list, use_msc, rank, buckets, results)

    monkeypatch.setattr(ckpt_writer, "write_buckets_in_threads", failing_writer)
    status = main(tiny_flags + ["--train-iters", "8", "--save-interval", "2", "--async-save",
                                "--save", save])
    err = capsys.readouterr().err
    assert status == 2
    assert "cannot save checkpoint" in err and "the previous checkpoint (iteration 2) is intact" in err
    assert _latest(save) == 2 and not os.path.exists(os.path.join(save, "iter_0000004.tmp"))


def test_keep_last_n_checkpoints_removes_older_saves(tiny_flags, tmp_path):
    save = str(tmp_path / "run")
    result = run_cli(tiny_flags + ["--train-iters", "8", "--save-interval", "2",
                                   "--keep-last-n-checkpoints", "2", "--save", save])
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == [
        "iter_0000006", "iter_0000008"]


def test_retention_never_removes_the_checkpoint_latest_names(tmp_path):
    from megatron_rlp.training import save_dir

    for iteration in (2, 4, 6, 8):
        os.makedirs(save_dir.checkpoint_dir(str(tmp_path), iteration))
    save_dir.write_latest(str(tmp_path), 4)  # e.g. a re-save of an earlier iteration
    assert save_dir.keep_newest(str(tmp_path), 1) == [2, 6]
    assert save_dir.saved_iterations(str(tmp_path)) == [4, 8]
    os.makedirs(save_dir.checkpoint_dir(str(tmp_path), 2) + ".deleting")
    notes = save_dir.recover_interrupted_saves(str(tmp_path))
    assert len(notes) == 1 and "--keep-last-n-checkpoints" in notes[0]
