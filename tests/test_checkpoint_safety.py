"""Loading a checkpoint never runs code from it (issue 14, item 1).

Each test plants a payload, a pickled object whose `__reduce__` calls `os.system("touch MARKER")`,
into a copy of one real checkpoint, then loads it the way a user would: `train --load` (with and
without --no-load-rng), `load_model` and `convert_checkpoint --to-hf`. The load must fail with one
line naming the file and the marker must not exist. The attacker is assumed to rewrite the
integrity manifest too (it is not signed), so these tests exercise the unpickling guard itself.
"""
import io
import os
import pickle
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TINY_MODEL_FLAGS, run_cli
from megatron_rlp.training import manifest, safe_load

ITERATION_DIR = "iter_0000002"


class Payload:
    """Pickles as a call to os.system: unpickling it creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture(scope="module")
def saved_run(embedded_dir, tmp_path_factory):
    """One 2-iteration run with --save, shared by every test (each works on a copy)."""
    save = str(tmp_path_factory.mktemp("ckpt") / "run")
    result = run_cli(TINY_MODEL_FLAGS + ["--embedded-data-dir", embedded_dir,
                                         "--train-iters", "2", "--save", save])
    assert result.returncode == 0, result.stderr[-2000:]
    return save


# --------------------------------------------------------------------------- planting payloads

def _read_metadata(ckpt_dir):
    with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
        return pickle.load(f)  # our own, untampered file


def _write_metadata(ckpt_dir, metadata):
    with open(os.path.join(ckpt_dir, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def _reseal(ckpt_dir):
    """Rewrite manifest.json over the tampered files, as an attacker would."""
    if manifest.has_manifest(ckpt_dir):
        manifest.write_manifest(ckpt_dir,
                                manifest.describe_files(ckpt_dir, manifest.list_files(ckpt_dir)))


def plant_in_metadata(run, marker) -> str:
    ckpt_dir = os.path.join(run, ITERATION_DIR)
    metadata = _read_metadata(ckpt_dir)
    metadata.planner_data = Payload(marker)
    _write_metadata(ckpt_dir, metadata)
    _reseal(ckpt_dir)
    return os.path.join(ckpt_dir, ".metadata")


def replace_item(run, key_prefix, new_bytes) -> str:
    """Splice `new_bytes` into the `__*.distcp` file in place of the item whose key starts with
    `key_prefix`, fixing the offsets and length `.metadata` records. Returns the file's path."""
    ckpt_dir = os.path.join(run, ITERATION_DIR)
    metadata = _read_metadata(ckpt_dir)
    index = next(i for i in metadata.storage_data if i.fqn.startswith(key_prefix))
    info = metadata.storage_data[index]
    path = os.path.join(ckpt_dir, info.relative_path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:info.offset] + new_bytes + data[info.offset + info.length:])
    delta = len(new_bytes) - info.length
    for other in metadata.storage_data.values():
        if other.relative_path == info.relative_path and other.offset > info.offset:
            other.offset += delta
    info.length = len(new_bytes)
    _write_metadata(ckpt_dir, metadata)
    _reseal(ckpt_dir)
    return path


def plant_in_byte_object(run, key_prefix, marker) -> str:
    """Replace a ShardedObject (saved by megatron as `torch.save([value])`) with the payload."""
    buffer = io.BytesIO()
    torch.save([Payload(marker)], buffer)
    return replace_item(run, key_prefix, buffer.getvalue())


def assert_refused_in_one_line(message, path, marker):
    assert not os.path.exists(marker), "the payload ran"
    assert "\n" not in message.strip(), message
    assert path in message, message
    assert "posix.system" in message or "os.system" in message, message
    assert "does not load" in message, message


def assert_cli_refused(result, path, marker):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert_refused_in_one_line(errors[0], path, marker)


# --------------------------------------------------------------------------- the guard itself

def test_metadata_allow_list_covers_what_our_trainer_writes(saved_run):
    """Every class a real `.metadata` names is allow-listed, and the guarded reader accepts it."""
    named = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    path = os.path.join(saved_run, ITERATION_DIR, ".metadata")
    with open(path, "rb") as f:
        Recorder(f).load()
    unlisted = {(m, n) for m, n in named if (m, n) not in safe_load.METADATA_GLOBALS
                and not (m == "torch" and isinstance(getattr(torch, n), torch.dtype))}
    assert not unlisted
    assert safe_load.read_metadata_file(path).storage_data


def test_untouched_checkpoint_loads_and_the_hooks_are_removed_afterwards(run_copy):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    from megatron_rlp import load_model

    upstream = (FileSystemReader.read_metadata, FileSystemReader.read_data,
                DefaultLoadPlanner.load_bytes)
    model = load_model(run_copy)
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()
    assert (FileSystemReader.read_metadata, FileSystemReader.read_data,
            DefaultLoadPlanner.load_bytes) == upstream


def test_guard_refuses_to_run_if_megatron_overrides_a_guarded_reader(monkeypatch, tmp_path):
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner

    monkeypatch.setattr(MCoreLoadPlanner, "load_bytes", lambda self, item, value: None,
                        raising=False)
    with pytest.raises(RuntimeError, match="MCoreLoadPlanner now overrides load_bytes"):
        with safe_load.safe_checkpoint_reads():
            pass


# --------------------------------------------------------------------------- train --load

def test_resume_refuses_a_payload_in_metadata(tiny_flags, run_copy, tmp_path):
    marker = str(tmp_path / "marker")
    path = plant_in_metadata(run_copy, marker)
    result = run_cli(tiny_flags + ["--train-iters", "3", "--load", run_copy, "--save", run_copy])
    assert_cli_refused(result, path, marker)


def test_resume_refuses_a_payload_in_the_rng_state(tiny_flags, run_copy, tmp_path):
    marker = str(tmp_path / "marker")
    path = plant_in_byte_object(run_copy, "rng_state", marker)
    result = run_cli(tiny_flags + ["--train-iters", "3", "--load", run_copy, "--save", run_copy])
    assert_cli_refused(result, path, marker)


def test_resume_without_rng_refuses_a_payload_in_a_layers_extra_state(tiny_flags, run_copy,
                                                                      tmp_path):
    marker = str(tmp_path / "marker")
    path = plant_in_byte_object(run_copy, "decoder.layers.1.self_attention.linear_qkv._extra_state",
                                marker)
    result = run_cli(tiny_flags + ["--train-iters", "3", "--load", run_copy, "--save", run_copy,
                                   "--no-load-rng"])
    assert_cli_refused(result, path, marker)


# --------------------------------------------------------------------------- load_model

@pytest.mark.parametrize("where", ["metadata", "extra_state"])
def test_load_model_refuses_a_payload(run_copy, tmp_path, where):
    from megatron_rlp import load_model

    marker = str(tmp_path / "marker")
    path = (plant_in_metadata(run_copy, marker) if where == "metadata" else
            plant_in_byte_object(run_copy, "output_layer._extra_state", marker))
    with pytest.raises(ValueError) as error:
        load_model(run_copy)
    assert_refused_in_one_line(str(error.value), path, marker)


def test_load_model_refuses_a_payload_in_place_of_a_tensor(run_copy, tmp_path):
    from megatron_rlp import load_model

    marker = str(tmp_path / "marker")
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    path = replace_item(run_copy, "decoder.final_norm.weight", buffer.getvalue())
    with pytest.raises(ValueError) as error:
        load_model(run_copy)
    assert_refused_in_one_line(str(error.value), path, marker)


def test_common_pt_payload_is_refused_even_when_torch_is_told_to_unpickle(run_copy, tmp_path,
                                                                          monkeypatch):
    """torch.load's weights_only default can be switched off by an environment variable;
    megatron calls it without the argument, we pass it explicitly."""
    from megatron_rlp import load_model

    marker = str(tmp_path / "marker")
    ckpt_dir = os.path.join(run_copy, ITERATION_DIR)
    path = os.path.join(ckpt_dir, "common.pt")
    common = torch.load(path, weights_only=True)
    common["training"]["note"] = Payload(marker)
    torch.save(common, path)
    _reseal(ckpt_dir)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError) as error:
        load_model(run_copy)
    assert_refused_in_one_line(str(error.value), path, marker)


def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(run_copy):
    from megatron_rlp import load_model

    ckpt_dir = os.path.join(run_copy, ITERATION_DIR)
    metadata = _read_metadata(ckpt_dir)
    next(iter(metadata.storage_data.values())).relative_path = "../../../etc/passwd"
    _write_metadata(ckpt_dir, metadata)
    _reseal(ckpt_dir)
    with pytest.raises(ValueError, match=r"names data file '\.\./\.\./\.\./etc/passwd', outside "
                                         "its directory"):
        load_model(run_copy)


# --------------------------------------------------------------------------- convert --to-hf

def test_convert_to_hf_refuses_a_payload_in_metadata(run_copy, tmp_path):
    marker = str(tmp_path / "marker")
    path = plant_in_metadata(run_copy, marker)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py"), "--to-hf",
         "--load", run_copy, "--save", str(tmp_path / "hf")],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    assert_cli_refused(result, path, marker)
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")
