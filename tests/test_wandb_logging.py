"""Weights & Biases logging (--wandb-project ...): the offline run files, read back with wandb's
own reader (`wandb leet inspect --json`), hold the records of metrics.jsonl at their iterations,
written by the logging rank only; bad flags, a missing wandb and a bad WANDB_MODE are one line."""
import glob
import json
import os
import subprocess
import sys
import typing

import pytest
from wandb.sdk.wandb_settings import Settings

from conftest import read_metrics
from megatron_rlp.config import config_from_dict, parse_args
from megatron_rlp.training.metrics import MetricsLogger
from megatron_rlp.config.launch import WANDB_MODES
from mp_utils import launch


def wandb_records(folder):
    """The records of the one W&B run under `folder` (a --wandb-save-dir), as wandb reads them."""
    files = glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", files[0], "--json"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def history(records):
    """[(step, item without W&B's own `_step/_runtime/_timestamp`)] in logged order."""
    rows = []
    for r in records:
        if r["type"] == "history":
            item = {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            rows.append((int(r["history"]["step"]["num"]), item))
    return rows


def run_header(records):
    return next(r["run"] for r in records if r["type"] == "run")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_modes_are_the_ones_the_installed_wandb_accepts():
    assert WANDB_MODES == typing.get_args(Settings.model_fields["mode"].annotation)


def test_logger_writes_the_metrics_jsonl_records_to_the_wandb_run(tmp_path, offline):
    save = str(tmp_path / "run")
    os.makedirs(save)
    cfg = config_from_dict(dict(save=save, wandb_project="proj", wandb_exp_name="exp-1",
                                hidden_size=96))
    logger = MetricsLogger(save, total_iters=6, run_config=cfg)
    sent = [{"iteration": 2, "stage": "pretrain", "phase": None, "loss": 2.718281828459045,
             "lr": 3e-4, "grad_norm": 0.1 + 0.2, "consumed_samples": 16},
            {"iteration": 4, "stage": "pretrain", "phase": "phase2", "loss": 1.5,
             "lr": 1.2345678901234567e-5, "grad_norm": 7.0, "consumed_samples": 32,
             "valid_loss": 1.25}]
    for record in sent:
        logger.tick()
        logger.log(record, tokens_in_window=1000)
    logger.close()

    jsonl = read_metrics(save)
    assert [r["loss"] for r in jsonl] == [r["loss"] for r in sent]  # the logger kept the values
    records = wandb_records(os.path.join(save, "wandb"))  # the default --wandb-save-dir
    assert history(records) == [(r["iteration"], r) for r in jsonl]
    header = run_header(records)
    assert header["project"] == "proj" and header["display_name"] == "exp-1"
    config = header["config"]["update"]
    assert config["hidden_size"] == 96 and config["wandb_exp_name"] == "exp-1"


def test_failing_wandb_init_warns_and_training_logs_go_on(tmp_path, offline, monkeypatch,
                                                         capsys):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    save = str(tmp_path / "run")
    os.makedirs(save)
    cfg = config_from_dict(dict(save=save, wandb_project="proj", wandb_exp_name="e"))
    logger = MetricsLogger(save, total_iters=2, run_config=cfg)
    logger.log({"iteration": 1, "loss": 1.0}, tokens_in_window=10)
    logger.close()
    err = capsys.readouterr().err
    assert "warning: W&B logging is off for this run: wandb.init failed (api_key not" in err
    assert [r["iteration"] for r in read_metrics(save)] == [1]


def test_pipeline_run_logs_to_wandb_once_from_the_last_stage(tiny_flags, tmp_path, offline):
    """PP=2: the logging rank is rank 1 (it holds the loss); rank 0 must open no W&B run."""
    save, wandb_dir = str(tmp_path / "run"), str(tmp_path / "wb")
    result = launch(tiny_flags + ["--train-iters", "4", "--log-interval", "2", "--save", save,
                                  "--pipeline-model-parallel-size", "2",
                                  "--wandb-project", "p", "--wandb-exp-name", "pp2",
                                  "--wandb-save-dir", wandb_dir],
                    nproc=2, scratch=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    jsonl = read_metrics(save)
    assert [r["iteration"] for r in jsonl] == [2, 4] and all(r["loss"] > 0 for r in jsonl)
    records = wandb_records(wandb_dir)  # asserts there is exactly one run
    assert history(records) == [(r["iteration"], r) for r in jsonl]
    assert not os.path.exists(os.path.join(save, "wandb"))


@pytest.mark.parametrize("flags, message", [
    (["--wandb-project", "p"], "--wandb-project='p': needs --wandb-exp-name"),
    (["--wandb-exp-name", "e"], "--wandb-exp-name='e': has no effect without --wandb-project"),
    (["--wandb-save-dir", "/x"], "--wandb-save-dir='/x': has no effect without --wandb-project"),
    (["--wandb-project", "p", "--wandb-exp-name", "e"],
     "--save is not set; add --save DIR or --wandb-save-dir DIR"),
])
def test_inconsistent_wandb_flags_are_refused(flags, message):
    with pytest.raises(ValueError) as error:
        parse_args(flags)
    assert message in str(error.value)


def test_a_saved_config_with_wandb_flags_loads_where_wandb_is_missing(tmp_path, monkeypatch):
    """load_model rebuilds the saved config with --save unset, maybe on a machine without wandb:
    the W&B checks belong to a launch, not to every RunConfig."""
    from megatron_rlp.inference.load import single_process_config

    saved = parse_args(["--save", str(tmp_path), "--wandb-project", "p",
                        "--wandb-exp-name", "e"]).to_flat_dict()
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("WANDB_MODE", "bogus")
    cfg = single_process_config(saved)
    assert cfg.checkpoint.save is None and cfg.training.wandb_project == "p"


def _one_error_line(capsys, argv):
    """Run the trainer's main in-process on `argv`; its exit status and stderr lines."""
    from megatron_rlp.train import main

    status = main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


def test_wandb_flag_without_wandb_installed_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec -> None
    save = tmp_path / "run"
    status, err = _one_error_line(capsys, ["--save", str(save), "--wandb-project", "p",
                                           "--wandb-exp-name", "e"])
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("megatron-rlp-train: error: --wandb-project='p': the wandb package "
                             "is not installed; pip install 'megatron-rlp[wandb]'")
    assert not save.exists()


@pytest.mark.parametrize("mode", ["offlne", ""])
def test_unknown_wandb_mode_is_one_line_exit_2(tmp_path, monkeypatch, capsys, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    save = tmp_path / "run"
    status, err = _one_error_line(capsys, ["--save", str(save), "--wandb-project", "p",
                                           "--wandb-exp-name", "e"])
    assert status == 2 and len(err) == 1, err
    assert f"error: WANDB_MODE={mode!r} (environment): not a W&B mode; set one of online, " \
        "offline, shared, disabled, dryrun, run" in err[0]
    assert not save.exists()


def test_wandb_mode_is_not_checked_without_wandb_project(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offlne")
    assert parse_args(["--train-iters", "3"]).training.wandb_project is None
