"""The integrity manifest of one checkpoint directory: every file's size and SHA-256.

Why: dist_checkpointing stores no checksums. A truncated copy, a deleted file or a few flipped bits
either surfaced as a long traceback from deep inside the loader naming no file, or loaded
silently and showed up iterations later as a drifting or non-finite loss. A save therefore writes
`manifest.json` into the iteration directory *before* it is renamed into place, and a load checks
it before reading anything, so damage is named (file, iteration) at once.

    {"format": 1, "algorithm": "sha256",
     "files": {"__0_0.distcp": {"size": 1274168, "sha256": "9f2c..."}, ...}}

Paths are relative to the iteration directory, with "/" separators; the manifest does not list
itself. Checking sizes only (cheap: one `stat` per file) catches truncation and missing or added
files; the hashes catch bit flips and overwritten bytes at the price of reading every byte
(measured cost per GB: docs/CHECKPOINTS.md, "Integrity").

This module only reads and writes files; which rank hashes which files, and how the answers are
shared, is decided by `checkpoint.py` (collectives go through `megatron_rlp.device`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

MANIFEST_FILE = "manifest.json"
FORMAT = 1
_CHUNK = 8 << 20  # bytes read per call while hashing: large enough that hashing dominates


def list_files(ckpt_dir: str) -> List[str]:
    """Every file under `ckpt_dir` except the manifest, as sorted relative "/" paths. Symbolic
    links are listed too (a save writes none; `size_problem` reports them)."""
    names = []
    for root, dirs, files in os.walk(ckpt_dir):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), ckpt_dir).replace(os.sep, "/")
            if rel != MANIFEST_FILE:
                names.append(rel)
    return sorted(names)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(ckpt_dir: str, names: List[str]) -> Dict[str, dict]:
    """{name: {"size", "sha256"}} for `names` (one rank's share of a save)."""
    out = {}
    for name in names:
        path = os.path.join(ckpt_dir, name)
        out[name] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
    return out


def write_manifest(ckpt_dir: str, files: Dict[str, dict]) -> None:
    """Write the manifest durably (temp file, fsync, rename): it is either whole or absent."""
    body = {"format": FORMAT, "algorithm": "sha256", "files": dict(sorted(files.items()))}
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def has_manifest(ckpt_dir: str) -> bool:
    return os.path.lexists(os.path.join(ckpt_dir, MANIFEST_FILE))


def read_manifest(ckpt_dir: str) -> Dict[str, dict]:
    """The manifest's file table. Raises ValueError (the problem, without the directory) if it is
    unreadable or names a path outside `ckpt_dir`; call only when `has_manifest`."""
    try:
        with open(os.path.join(ckpt_dir, MANIFEST_FILE)) as f:
            body = json.load(f)
        files = body["files"]
        for name, entry in files.items():
            int(entry["size"]), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{MANIFEST_FILE} is unreadable (not the JSON a save writes)") from None
    for name in files:
        # The manifest may come from someone else: never let it point us outside the directory.
        parts = name.split("/")
        if os.path.isabs(name) or ".." in parts or "" in parts or "\\" in name:
            raise ValueError(f"{MANIFEST_FILE} lists {name!r}, a path outside the checkpoint")
    return files


def size_problem(ckpt_dir: str, files: Dict[str, dict]) -> Optional[str]:
    """The first disagreement between the directory and the manifest's names and sizes, as a
    phrase naming the file ("common.pt is missing ..."), or None."""
    present = set(list_files(ckpt_dir))
    for name, entry in files.items():
        path = os.path.join(ckpt_dir, name)
        if name not in present:
            return f"{name} is missing (the manifest lists {entry['size']} bytes)"
        if os.path.islink(path):
            return f"{name} is a symbolic link (a save writes none)"
        size, expected = os.path.getsize(path), int(entry["size"])
        if size != expected:
            why = "truncated copy?" if size < expected else "appended to or replaced?"
            return f"{name} has {size} bytes, the manifest says {expected} ({why})"
    extra = sorted(present - set(files))
    if extra:
        return f"{extra[0]} is not in the manifest (added after the save?)"
    return None


def hash_problem(ckpt_dir: str, files: Dict[str, dict], names: List[str]) -> Optional[str]:
    """The first of `names` whose SHA-256 differs from the manifest's, as a phrase, or None.
    Assumes `size_problem` found nothing (every name exists)."""
    for name in names:
        if sha256_file(os.path.join(ckpt_dir, name)) != files[name]["sha256"]:
            return (f"{name} does not match its SHA-256 in the manifest (same size, different "
                    "bytes: bit rot or an edit after the save)")
    return None


def total_size(files: Dict[str, dict]) -> int:
    return sum(int(entry["size"]) for entry in files.values())
