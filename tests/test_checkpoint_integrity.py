"""Checkpoint integrity (issue 14, items 2, 4 and 9).

Every save writes `manifest.json` (each file's size and SHA-256); a damaged checkpoint fails
`train --load` with exit 2 and one line naming the file, the iteration and the newest intact
earlier iteration with `--ckpt-step`, which then loads. A re-save of an existing iteration swaps
the new copy in, never deleting the old one first; a save that cannot be written (disk full,
read-only directory) ends the run with one line naming the path and the intact previous checkpoint.

One real run (iterations 2 and 4 saved) is shared by the module; each test damages a copy.
"""
import builtins
import errno
import json
import os
import re
import shutil

import pytest

from conftest import TINY_MODEL_FLAGS, read_metrics, run_cli
from megatron_rlp.training import manifest, save_dir

LATEST_DIR = "iter_0000004"
EARLIER_DIR = "iter_0000002"


@pytest.fixture(scope="module")
def flags(embedded_dir):
    # The decay length is fixed, so extending a 4-iteration run to 6 keeps its schedule (a resume
    # that changes it stops: tests/test_long_runs.py).
    return TINY_MODEL_FLAGS + ["--embedded-data-dir", embedded_dir, "--lr-decay-iters", "6"]


@pytest.fixture(scope="module")
def saved_run(flags, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("integrity") / "run")
    result = run_cli(flags + ["--train-iters", "4", "--save-interval", "2", "--save", save])
    assert result.returncode == 0, result.stderr[-2000:]
    return save


def _error_lines(result):
    """stderr lines that are ours (megatron's import warnings are not)."""
    return [line for line in result.stderr.splitlines() if "error:" in line]


def _resume(flags, run, *extra, iters=6):
    return run_cli(flags + ["--train-iters", str(iters), "--load", run, "--save", run, *extra])


# ------------------------------------------------------------------------------ damage
def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(4096)


def _overwrite_4k_with_random_bytes(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        f.write(os.urandom(4096))


def _flip_bits_in_64k(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 4)
        block = bytearray(f.read(65536))
        f.seek(-len(block), os.SEEK_CUR)
        f.write(bytes(b ^ 0x10 for b in block))


DAMAGE = {
    "truncated_distcp": ("__0_0.distcp", _truncate, "has 4096 bytes, the manifest says"),
    "deleted_common_pt": ("common.pt", os.remove, "common.pt is missing"),
    "deleted_metadata_json": ("metadata.json", os.remove, "metadata.json is missing"),
    "deleted_distcp": ("__0_1.distcp", os.remove, "__0_1.distcp is missing"),
    "random_4k": ("__0_0.distcp", _overwrite_4k_with_random_bytes, "does not match its SHA-256"),
    "flipped_bits_64k": ("__0_0.distcp", _flip_bits_in_64k, "does not match its SHA-256"),
}


def test_every_save_writes_a_manifest_of_every_file(saved_run):
    for name in (EARLIER_DIR, LATEST_DIR):
        ckpt_dir = os.path.join(saved_run, name)
        with open(os.path.join(ckpt_dir, manifest.MANIFEST_FILE)) as f:
            listed = json.load(f)["files"]
        on_disk = manifest.list_files(ckpt_dir)
        assert sorted(listed) == on_disk and "common.pt" in on_disk and ".metadata" in on_disk
        for file, entry in listed.items():
            path = os.path.join(ckpt_dir, file)
            assert entry == {"size": os.path.getsize(path), "sha256": manifest.sha256_file(path)}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_checkpoint_fails_with_one_line_naming_file_and_intact_iteration(
        flags, run_copy, kind):
    file, damage, phrase = DAMAGE[kind]
    damage(os.path.join(run_copy, LATEST_DIR, file))
    result = _resume(flags, run_copy)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = _error_lines(result)
    assert f"checkpoint {os.path.join(run_copy, LATEST_DIR)} is damaged: " in line, line
    assert file in line and phrase in line, line
    assert line.endswith("the newest intact checkpoint is iteration 2: resume with --ckpt-step 2")


def test_ckpt_step_loads_the_earlier_checkpoint_and_training_continues(flags, run_copy):
    before = {r["iteration"]: r["loss"] for r in read_metrics(run_copy)}
    _truncate(os.path.join(run_copy, LATEST_DIR, "__0_0.distcp"))
    result = _resume(flags, run_copy, "--ckpt-step", "2", "--save-interval", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at 2" in result.stdout
    after = {r["iteration"]: r["loss"] for r in read_metrics(run_copy)}
    assert sorted(after) == list(range(1, 7))
    for iteration in (3, 4):  # recomputed from iteration 2: a resume repeats the same losses
        assert abs(after[iteration] - before[iteration]) <= 1e-6, iteration
    # The damaged iteration 4 was replaced by a whole one, and `latest` moved on.
    assert open(os.path.join(run_copy, "latest")).read().strip() == "6"
    ckpt_dir = os.path.join(run_copy, LATEST_DIR)
    files = manifest.read_manifest(ckpt_dir)
    assert manifest.size_problem(ckpt_dir, files) is None
    assert manifest.hash_problem(ckpt_dir, files, sorted(files)) is None


def test_ckpt_step_of_a_missing_iteration_names_the_saved_ones(run_copy):
    from megatron_rlp.training.checkpoint import resolve_iteration

    with pytest.raises(ValueError, match=r"--ckpt-step 3: .*iter_0000003 does not exist "
                                         r"\(saved iterations in .*: 2, 4\)"):
        resolve_iteration(run_copy, 3)


def test_no_ckpt_verify_skips_hashing_so_bit_flips_load(flags, run_copy):
    """The trade-off of --no-ckpt-verify: no SHA-256 pass over every byte, so same-size damage
    (here 64 KiB of flipped bits) is loaded as if it were good."""
    _flip_bits_in_64k(os.path.join(run_copy, LATEST_DIR, "__0_0.distcp"))
    result = _resume(flags, run_copy, "--no-ckpt-verify")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at 4" in result.stdout


def test_no_ckpt_verify_still_checks_sizes(run_copy):
    from megatron_rlp.training.checkpoint import verify_checkpoint

    _truncate(os.path.join(run_copy, LATEST_DIR, "__0_0.distcp"))
    with pytest.raises(ValueError, match=r"__0_0.distcp has 4096 bytes.*--ckpt-step 2$"):
        verify_checkpoint(run_copy, 4, hashes=False)


def test_checkpoint_saved_before_manifests_loads_unverified(flags, run_copy):
    for name in (EARLIER_DIR, LATEST_DIR):
        os.remove(os.path.join(run_copy, name, manifest.MANIFEST_FILE))
    result = _resume(flags, run_copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at 4" in result.stdout
    assert "has no manifest.json (saved before integrity manifests)" in result.stdout


@pytest.mark.parametrize("tamper,message", [
    (lambda d: open(os.path.join(d, "extra.bin"), "wb").write(b"x"),
     "extra.bin is not in the manifest"),
    (lambda d: open(os.path.join(d, manifest.MANIFEST_FILE), "w").write("{not json"),
     "manifest.json is unreadable"),
    (lambda d: manifest.write_manifest(d, {"../../latest": {"size": 2, "sha256": "0" * 64}}),
     "lists '../../latest', a path outside the checkpoint"),
])
def test_manifest_tampering_is_named(run_copy, tamper, message):
    from megatron_rlp.training.checkpoint import verify_checkpoint

    tamper(os.path.join(run_copy, LATEST_DIR))
    with pytest.raises(ValueError, match=message):
        verify_checkpoint(run_copy, 4)


def test_reader_errors_become_one_line_even_torchs_base_exception(run_copy):
    """Without a manifest (older checkpoints) damage surfaces inside megatron's and torch's
    readers; torch wraps it in CheckpointException, a BaseException that `except Exception`
    missed (a 73-line traceback naming no file)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_rlp.training.checkpoint import load_errors

    ckpt_dir = os.path.join(run_copy, LATEST_DIR)
    missing = os.path.join(ckpt_dir, "__0_1.distcp")
    cases = [
        (CheckpointException("read", {0: (EOFError(), None)}), "a file ends early"),
        (CheckpointException("read", {1: (FileNotFoundError(2, "No such file or directory",
                                                            missing), None)}),
         "__0_1.distcp: No such file or directory"),
        (RuntimeError("PytorchStreamReader failed reading zip archive in common.pt"),
         "common.pt: RuntimeError: PytorchStreamReader failed"),
    ]
    for error, detail in cases:
        with pytest.raises(ValueError) as caught:
            with load_errors(ckpt_dir):
                raise error
        line = str(caught.value)
        assert "\n" not in line
        assert line.startswith(f"cannot load checkpoint {ckpt_dir}: {detail}"), line
        assert line.endswith("resume with --ckpt-step 2"), line
    with pytest.raises(KeyboardInterrupt):  # a user's Ctrl-C is not a damaged checkpoint
        with load_errors(ckpt_dir):
            raise KeyboardInterrupt()


def test_newest_intact_skips_damaged_earlier_iterations(run_copy):
    os.remove(os.path.join(run_copy, EARLIER_DIR, "common.pt"))
    assert save_dir.newest_intact(run_copy) == 4
    assert save_dir.newest_intact(run_copy, before=4) is None
    assert "no earlier intact checkpoint" in save_dir.fallback_hint(run_copy, 4)


# ------------------------------------------------------------------------------ saving
class Crash(BaseException):
    """Stands in for SIGKILL at one instant of a save (nothing catches a BaseException)."""


@pytest.fixture
def resumed_run(flags, run_copy):
    """A run built in this process and resumed from iteration 4 of `run_copy`, so that its next
    save re-saves iteration 4; torn down afterwards."""
    from megatron_rlp.config import parse_args
    from megatron_rlp.train import build_run, load_for_run
    from megatron_rlp.training.distributed import destroy_distributed

    run = build_run(parse_args(flags + ["--train-iters", "4", "--load", run_copy,
                                        "--save", run_copy]))
    try:
        load_for_run(run)
        assert run.trainer.iteration == 4
        yield run
    finally:
        if run.lock is not None:
            run.lock.release()
        destroy_distributed()


def _assert_latest_is_whole(save):
    from megatron_rlp.training.checkpoint import read_latest_iteration, verify_checkpoint

    iteration = read_latest_iteration(save)  # raises if `latest` names a missing directory
    assert verify_checkpoint(save, iteration) is True
    return iteration


def test_resave_crash_after_the_atomic_swap_leaves_latest_whole(resumed_run, run_copy,
                                                                 monkeypatch):
    tmp_dir = os.path.join(run_copy, LATEST_DIR + ".tmp")
    real_rmtree = shutil.rmtree

    def crash_deleting_the_old_copy(path, *args, **kwargs):
        if path == tmp_dir and manifest.has_manifest(path):  # the old copy, swapped out
            raise Crash()
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", crash_deleting_the_old_copy)
    with pytest.raises(Crash):
        resumed_run.trainer.save()
    monkeypatch.undo()
    assert _assert_latest_is_whole(run_copy) == 4
    assert save_dir.recover_interrupted_saves(run_copy) == [
        f"removed {tmp_dir}, left by an interrupted save"]
    assert not os.path.exists(tmp_dir)


def test_resave_crash_between_fallback_renames_is_repaired_at_start(resumed_run, run_copy,
                                                                    monkeypatch):
    """Where directories cannot be exchanged atomically (NFS), the old copy is renamed aside
    first; a crash before the new copy is renamed in leaves `<iter>.old`, which the next start
    puts back."""
    final_dir = os.path.join(run_copy, LATEST_DIR)
    real_replace = os.replace

    def crash_renaming_in(src, dst, *args, **kwargs):
        if src == final_dir + ".tmp" and dst == final_dir:
            raise Crash()
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(save_dir, "_exchange", lambda a, b: False)
    monkeypatch.setattr(os, "replace", crash_renaming_in)
    with pytest.raises(Crash):
        resumed_run.trainer.save()
    monkeypatch.undo()
    assert not os.path.exists(final_dir) and os.path.isdir(final_dir + ".old")
    from megatron_rlp.training.checkpoint import read_latest_iteration

    with pytest.raises(ValueError, match=r"iter_0000004 is missing \(a re-save was interrupted: "
                                         r"the previous copy is .*iter_0000004.old"):
        read_latest_iteration(run_copy)
    notes = save_dir.recover_interrupted_saves(run_copy)
    assert f"restored {final_dir} from {final_dir}.old (a re-save was interrupted)" in notes
    assert _assert_latest_is_whole(run_copy) == 4


def test_resave_replaces_the_old_copy_without_the_swap_too(resumed_run, run_copy, monkeypatch):
    monkeypatch.setattr(save_dir, "_exchange", lambda a, b: False)
    resumed_run.trainer.save()
    assert _assert_latest_is_whole(run_copy) == 4
    assert not [name for name in os.listdir(run_copy) if name.endswith((".old", ".tmp"))]


def test_start_repairs_what_an_interrupted_resave_left(flags, run_copy):
    final_dir = os.path.join(run_copy, LATEST_DIR)
    os.rename(final_dir, final_dir + ".old")  # killed between the fallback's two renames
    os.makedirs(os.path.join(run_copy, "iter_0000006.tmp"))  # killed while writing 6
    result = _resume(flags, run_copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"note: restored {final_dir}" in result.stdout and "resuming at 4" in result.stdout
    assert f"note: removed {final_dir[:-1]}6.tmp, left by an interrupted save" in result.stdout
    assert _assert_latest_is_whole(run_copy) == 6


def _fail_writes_under(monkeypatch, target, code):
    """Make creating `target` or any file in it fail with `code`, as a full disk or a read-only
    directory would (used where chmod cannot: root ignores permissions)."""
    real_open, real_makedirs = builtins.open, os.makedirs

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(target) \
                and any(c in mode for c in "wax+"):
            raise OSError(code, os.strerror(code), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    def guarded_makedirs(name, *args, **kwargs):
        if os.fspath(name) == target:
            raise OSError(code, os.strerror(code), os.fspath(name))
        return real_makedirs(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "makedirs", guarded_makedirs)


def _train_in_process(flags, save, capsys):
    from megatron_rlp.train import main

    status = main(flags + ["--train-iters", "4", "--save-interval", "2", "--save", save])
    return status, capsys.readouterr()


def _assert_save_failed_cleanly(status, captured, save, path_pattern):
    assert status == 2, captured.err[-3000:]
    lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err[-3000:]
    line = lines[0]
    assert re.search(re.escape(f"cannot save checkpoint {os.path.join(save, LATEST_DIR)}: ")
                     + path_pattern + ": ", line), line
    assert "the previous checkpoint (iteration 2) is intact" in line, line
    assert open(os.path.join(save, "latest")).read().strip() == "2"
    assert not os.path.exists(os.path.join(save, LATEST_DIR + ".tmp"))
    assert not os.path.exists(os.path.join(save, LATEST_DIR))
    return line


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
        flags, tmp_path, monkeypatch, capsys):
    save = str(tmp_path / "full")
    tmp_dir = os.path.join(save, LATEST_DIR + ".tmp")
    _fail_writes_under(monkeypatch, tmp_dir + os.sep, errno.ENOSPC)
    status, captured = _train_in_process(flags, save, capsys)
    # torch.save writes common.pt through C++ (not `open`), so the first write refused is one of
    # the data files, by whichever writer thread gets there first.
    data_file = re.escape(tmp_dir + os.sep) + r"__0_[01]\.distcp"
    line = _assert_save_failed_cleanly(status, captured, save, data_file)
    assert "No space left on device (free disk space for" in line, line


def _chmod_is_enforced(tmp_path):
    """False for root (os.geteuid() == 0) and anyone else with CAP_DAC_OVERRIDE, who can write
    into a 0o555 directory; tried rather than assumed from the uid."""
    probe = tmp_path / "chmod_probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "file").write_text("x")
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


def test_read_only_save_directory_is_one_line_and_keeps_the_previous_checkpoint(
        flags, tmp_path, monkeypatch, capsys):
    save = str(tmp_path / "readonly")
    tmp_dir = os.path.join(save, LATEST_DIR + ".tmp")
    if _chmod_is_enforced(tmp_path):  # a real read-only directory once iteration 2 is saved
        from megatron_rlp.training.trainer import Trainer

        real_save = Trainer.save

        def save_then_lock_down(self):
            real_save(self)
            os.chmod(save, 0o555)

        monkeypatch.setattr(Trainer, "save", save_then_lock_down)
    else:  # root writes through chmod: make the next save's directory creation fail instead
        _fail_writes_under(monkeypatch, tmp_dir, errno.EACCES)
    try:
        status, captured = _train_in_process(flags, save, capsys)
    finally:
        os.chmod(save, 0o755)
    line = _assert_save_failed_cleanly(status, captured, save, re.escape(tmp_dir))
    assert "Permission denied (make" in line and "writable)" in line, line


def test_save_is_refused_up_front_without_room_for_another_checkpoint(
        flags, tmp_path, monkeypatch, capsys):
    from megatron_rlp.training import checkpoint

    save = str(tmp_path / "small")
    real_usage = shutil.disk_usage

    def nearly_full(path):
        usage = real_usage(path)
        if os.path.exists(os.path.join(save, EARLIER_DIR)):
            return usage._replace(free=1 << 20)
        return usage

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", nearly_full)
    status, captured = _train_in_process(flags, save, capsys)
    line = _assert_save_failed_cleanly(status, captured, save, re.escape(save))
    assert re.search(r"only 1\.0 MiB free, the last checkpoint took \d+\.\d MiB", line), line
