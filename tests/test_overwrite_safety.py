"""Nothing is overwritten half-way or by mistake: HF export build-aside-then-swap, export into a
training directory, tpt_augment in place, --finetune into a --save holding checkpoints."""
import errno
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY_MODEL_FLAGS, read_metrics
from megatron_rlp.hf.export import export_to_hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A weights-only checkpoint of the tiny model (`latest` + iter_0000000), no training."""
    from megatron_rlp.config import parse_args
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.hf.import_ import save_weights_checkpoint
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import init_distributed

    root = str(tmp_path_factory.mktemp("ckpt"))
    cfg = parse_args(TINY_MODEL_FLAGS)
    init_distributed(cfg.parallel, 0)
    model = build_model(cfg, build_tokenizer().vocab_size)
    save_weights_checkpoint(model, cfg.to_flat_dict(), root, stage="pretrain")
    return root


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _cli():
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failed_overwrite_leaves_the_previous_export_whole(ckpt, tmp_path, monkeypatch):
    # Before: --overwrite deleted the old files first, so a write that failed (file-size limit)
    # left a partial model.safetensors and nothing else.
    from megatron_rlp.hf import export

    hf = tmp_path / "hf"
    export_to_hf(ckpt, str(hf), verbose=False)
    before = _snapshot(hf)
    real_write, calls = export.StreamingSafetensorsWriter.write, []

    def write_then_fail(self, name, tensor):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.EFBIG, "File too large")
        real_write(self, name, tensor)

    monkeypatch.setattr(export.StreamingSafetensorsWriter, "write", write_then_fail)
    with pytest.raises(OSError, match="File too large"):
        export_to_hf(ckpt, str(hf), overwrite=True, verbose=False)
    assert len(calls) == 3  # the failure happened mid-model, after bytes were written
    assert _snapshot(hf) == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no staging or set-aside directory left


def test_overwrite_replaces_the_whole_export_so_no_stale_file_survives(ckpt, tmp_path):
    hf = tmp_path / "hf"
    export_to_hf(ckpt, str(hf), verbose=False)
    fresh = sorted(os.listdir(hf))
    (hf / "pytorch_model.bin").write_bytes(b"an older model that transformers could pick up")
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    export_to_hf(ckpt, str(hf), overwrite=True, verbose=False)
    assert sorted(os.listdir(hf)) == fresh
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_export_without_overwrite_into_a_model_directory_is_refused_untouched(ckpt, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "pytorch_model.bin").write_bytes(b"someone's model")
    with pytest.raises(ValueError, match=r"already holds a model \(pytorch_model.bin\); pass "
                                         "--overwrite"):
        export_to_hf(ckpt, str(hf), verbose=False)
    assert _snapshot(hf) == {"pytorch_model.bin": b"someone's model"}


def test_export_into_a_directory_without_a_model_is_refused_even_with_overwrite(ckpt, tmp_path):
    # --overwrite replaces the whole directory; it must not wipe one that holds no model.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty and holds no model"):
        export_to_hf(ckpt, str(notes), overwrite=True, verbose=False)
    assert _snapshot(notes) == {"todo.txt": b"keep me"}


def test_export_into_a_training_checkpoint_directory_is_refused_in_one_line(ckpt, capsys):
    # Before: the export landed beside `latest`, and load_model(dir) silently switched to it.
    from megatron_rlp.hf.import_ import is_hf_dir

    before = _snapshot(ckpt)
    code = _cli().main(["--to-hf", "--load", ckpt, "--save", ckpt, "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"convert_checkpoint: error: --save {ckpt!r} holds a training "
                             "checkpoint (iter_0000000)")
    assert _snapshot(ckpt) == before and not is_hf_dir(ckpt)


def _tpt(*args):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "tpt_augment.py"),
                           *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))


def test_tpt_augment_refuses_to_write_over_its_input(tmp_path):
    # Before: --output == --input replaced the original documents with the augmented ones.
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "12 + 7 = 19"}\n')
    (tmp_path / "link.jsonl").symlink_to(docs)
    os.link(docs, tmp_path / "hard.jsonl")
    (tmp_path / "ckpt").mkdir()
    same_file = [str(docs), str(tmp_path / "ckpt" / ".." / "docs.jsonl"),
                 str(tmp_path / "link.jsonl"), str(tmp_path / "hard.jsonl")]
    for output in same_file:
        r = _tpt("--input", str(docs), "--output", output, "--load", str(tmp_path / "ckpt"))
        assert r.returncode == 2, (output, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "is the --input file" in lines[0], lines
    assert docs.read_text() == '{"text": "12 + 7 = 19"}\n'


def test_finetune_or_new_stage_into_a_save_that_holds_checkpoints_is_refused(tiny_flags, tmp_path, capsys):
    # Before: --finetune with --load == --save wiped metrics.jsonl, overwrote iter_0000002 and
    # moved `latest` from 4 back to 2.
    from megatron_rlp.train import main

    save = str(tmp_path / "run")
    assert main(tiny_flags + ["--train-iters", "4", "--save", save, "--save-interval", "2"]) == 0
    before = _snapshot(save)
    capsys.readouterr()
    code = main(tiny_flags + ["--train-iters", "2", "--load", save, "--save", save,
                              "--finetune"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"--finetune with --save {save!r}, which already holds checkpoints" in err[0]
    assert f"drop --finetune and pass --load {save}" in err[0]
    # A new stage also starts at iteration 0: the same refusal, before anything is written.
    code = main(tiny_flags + ["--train-iters", "2", "--load", save, "--save", save,
                              "--stage", "rlp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--stage rlp from a pretrain checkpoint with --save" in err[0]
    after = _snapshot(save)
    kept = {k: v for k, v in after.items() if not k.startswith("cache")}
    assert kept == {k: v for k, v in before.items() if not k.startswith("cache")}
    assert [r["iteration"] for r in read_metrics(save)] == [1, 2, 3, 4]
