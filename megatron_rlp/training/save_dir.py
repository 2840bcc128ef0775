"""A `--save` directory on disk: iteration directories, the `latest` pointer, swapping a new save
into place, and cleaning up after a save that was interrupted.

    iter_0000008/         a complete checkpoint (with manifest.json since integrity manifests)
    iter_0000012.tmp/     a save in progress, or the leftover of one that was killed
    iter_0000012.old/     the previous copy of iter_0000012 during a re-save (fallback swap only)
    iter_0000004.deleting/  a checkpoint being removed by --keep-last-n-checkpoints
    latest                the newest complete iteration, as text; replaced by rename

Plain file-system code, no collectives: callers run it on rank 0 and share the outcome.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from typing import List, Optional, Tuple

from megatron_rlp.training import manifest

LATEST_FILE = "latest"
_ITER_DIR = re.compile(r"iter_(\d{7,})$")
# Files every megatron dist_checkpointing directory has; the only check possible for checkpoints
# saved before manifests existed.
LEGACY_REQUIRED = ("metadata.json", "common.pt", ".metadata")


def checkpoint_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def split_checkpoint_dir(ckpt_dir: str) -> Tuple[str, Optional[int]]:
    """(save root, iteration) of an `iter_NNNNNNN` path; iteration None for any other name."""
    root, name = os.path.split(os.path.normpath(ckpt_dir))
    match = _ITER_DIR.match(name)
    return root, int(match.group(1)) if match else None


def saved_iterations(root: str) -> List[int]:
    """Iterations with a (possibly damaged) directory under `root`, ascending."""
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    found = (_ITER_DIR.match(name) for name in entries)
    return sorted(int(m.group(1)) for m in found
                  if m and os.path.isdir(os.path.join(root, m.group(0))))


def looks_intact(ckpt_dir: str) -> bool:
    """File names and sizes match the manifest; no hashing, so the search for a fallback stays a
    `stat` per file even on a checkpoint of hundreds of GB. Without a manifest (saved before
    manifests existed): megatron's three index files are present."""
    if not manifest.has_manifest(ckpt_dir):
        return all(os.path.isfile(os.path.join(ckpt_dir, name)) for name in LEGACY_REQUIRED)
    try:
        return manifest.size_problem(ckpt_dir, manifest.read_manifest(ckpt_dir)) is None
    except (ValueError, OSError):
        return False


def newest_intact(root: str, before: Optional[int] = None) -> Optional[int]:
    """The newest iteration below `before` (all, if None) whose directory `looks_intact`."""
    for iteration in reversed(saved_iterations(root)):
        if (before is None or iteration < before) and looks_intact(checkpoint_dir(root, iteration)):
            return iteration
    return None


def fallback_hint(root: str, iteration: Optional[int]) -> str:
    """The tail of a load error: which earlier checkpoint to use instead, and the flag for it."""
    earlier = newest_intact(root, before=iteration)
    if earlier is None:
        return (f"; {root} holds no earlier intact checkpoint: restore the file from a copy, or "
                "start again without --load")
    return (f"; the newest intact checkpoint is iteration {earlier}: resume with "
            f"--ckpt-step {earlier}")


def write_latest(save: str, iteration: int) -> None:
    path = os.path.join(save, LATEST_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directories (Linux `renameat2(RENAME_EXCHANGE)`). False where the call
    or the file system does not support it (other OSes, NFS, old kernels)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), b)


def swap_in(tmp_dir: str, final_dir: str) -> None:
    """Move the complete new save `tmp_dir` to `final_dir`, replacing any old copy without ever
    deleting it first (a crash between delete and rename once left `latest` naming nothing).

    Where the file system can exchange two directories atomically, `final_dir` is whole at every
    moment and the old copy ends up in `tmp_dir` before it is deleted. Elsewhere the old copy is
    renamed aside to `<final>.old` first: a crash between the two renames leaves `final_dir`
    missing for an instant, and `recover_interrupted_saves` puts `.old` back at the next start."""
    if not os.path.exists(final_dir):
        os.replace(tmp_dir, final_dir)
        return
    if _exchange(tmp_dir, final_dir):
        shutil.rmtree(tmp_dir)  # now the old copy
        return
    aside = final_dir + ".old"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final_dir, aside)
    try:
        os.replace(tmp_dir, final_dir)
    except OSError:
        os.replace(aside, final_dir)
        raise
    shutil.rmtree(aside)


def publish(save: str, iteration: int, files: dict) -> None:
    """Finish a save written into `<iter dir>.tmp`: its manifest (`files`, from
    `manifest.describe_files`), the swap into place, then `latest`. Rank 0 only."""
    final_dir = checkpoint_dir(save, iteration)
    manifest.write_manifest(final_dir + ".tmp", files)
    swap_in(final_dir + ".tmp", final_dir)
    write_latest(save, iteration)


def keep_newest(save: str, count: int) -> List[int]:
    """Remove all but the newest `count` checkpoints (never the one `latest` names); returns the
    iterations removed. Each is renamed aside first, so a crash mid-delete leaves a
    `.deleting` folder (removed at the next start), never a half-deleted `iter_*`."""
    latest = _read_latest(save)
    removed = []
    for iteration in saved_iterations(save)[:-count]:
        if iteration == latest:
            continue
        doomed = checkpoint_dir(save, iteration) + ".deleting"
        os.replace(checkpoint_dir(save, iteration), doomed)
        shutil.rmtree(doomed)
        removed.append(iteration)
    return removed


def _read_latest(save: str) -> Optional[int]:
    try:
        with open(os.path.join(save, LATEST_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def recover_interrupted_saves(save: str) -> List[str]:
    """Undo what a save killed half-way leaves behind; returns one note per action. Call only
    while holding the directory's run lock (another live run's `.tmp` is not a leftover)."""
    notes = []
    try:
        entries = sorted(os.listdir(save))
    except OSError:
        return notes
    for name in entries:
        path = os.path.join(save, name)
        if name == LATEST_FILE + ".tmp":
            os.remove(path)
        elif name.endswith(".tmp") and _ITER_DIR.match(name[:-4]) and os.path.isdir(path):
            shutil.rmtree(path)
            notes.append(f"removed {path}, left by an interrupted save")
        elif name.endswith(".deleting") and _ITER_DIR.match(name[:-9]) and os.path.isdir(path):
            shutil.rmtree(path)
            notes.append(f"removed {path}, left by an interrupted --keep-last-n-checkpoints")
        elif name.endswith(".old") and _ITER_DIR.match(name[:-4]) and os.path.isdir(path):
            final = path[:-4]
            if os.path.exists(final):  # the swap had completed: this is the replaced copy
                shutil.rmtree(path)
                notes.append(f"removed {path}, the old copy of a completed re-save")
            else:  # killed between the two renames: the old copy is the whole checkpoint
                os.replace(path, final)
                notes.append(f"restored {final} from {path} (a re-save was interrupted)")
    return notes


def latest_bytes(save: str, iteration: int) -> Optional[int]:
    """The size of checkpoint `iteration` per its manifest (None without one)."""
    ckpt_dir = checkpoint_dir(save, iteration)
    if not manifest.has_manifest(ckpt_dir):
        return None
    try:
        return manifest.total_size(manifest.read_manifest(ckpt_dir))
    except ValueError:
        return None
