"""Token ids of a Megatron `.bin` checked against the tokenizer when a dataset opens.

Why: a `.bin` built with another tokenizer (or damaged) holds ids >= the vocabulary size. Nothing
upstream checks them: training died with an `IndexError` traceback when such a sample was drawn,
and exited 0 when none happened to be. `check_token_ids` fails before any work instead, with one
line naming the file, its largest id and the vocabulary size.

Cost: one pass over each file, read in CHUNK_BYTES pieces (memory stays bounded whatever the file
size), then cached as `token-range/<name>-<hash>.json` keyed by the file's path, size and mtime, so
a 100 GB corpus is read once, not at every start. The entry goes beside the data, in the folder's
`index-cache/` (megatron-core's default index cache), so runs with different --save share it; a
read-only data folder falls back to the run's cache folder. The cache holds the range, not the
verdict, so a different tokenizer needs no new scan; an unwritable cache only costs a rescan.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Optional, Sequence

import numpy as np

CHUNK_BYTES = 64 << 20
_CACHE_FOLDER = "token-range"
_HEADER = b"MMIDIDX\x00\x00"  # then <Q version, <B dtype code (megatron-core's IndexedDataset)


def _bin_dtype(prefix: str) -> np.dtype:
    from megatron_rlp.data.indexed import import_indexed_dataset

    with open(prefix + ".idx", "rb") as f:
        header = f.read(len(_HEADER) + 9)
    if len(header) < len(_HEADER) + 9 or not header.startswith(_HEADER):
        raise ValueError(f"{prefix}.idx is not a Megatron index file (bad header); rebuild it "
                         "with tools/preprocess_data.py")
    code = struct.unpack("<B", header[-1:])[0]
    try:
        return np.dtype(import_indexed_dataset().DType.dtype_from_code(code))
    except ValueError:
        raise ValueError(f"{prefix}.idx names unknown token dtype code {code}; rebuild it with "
                         "tools/preprocess_data.py") from None


def scan_token_range(path: str, dtype: np.dtype) -> tuple[Optional[int], Optional[int]]:
    """(min, max) token id in the flat array file `path` (None, None when empty), reading
    CHUNK_BYTES at a time."""
    step = max(CHUNK_BYTES // dtype.itemsize, 1)
    low = high = None
    with open(path, "rb") as f:
        while True:
            chunk = np.fromfile(f, dtype=dtype, count=step)
            if chunk.size == 0:
                break
            low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
            high = int(chunk.max()) if high is None else max(high, int(chunk.max()))
    return low, high


def _cache_path(cache_dir: str, bin_path: str) -> str:
    digest = hashlib.sha256(bin_path.encode()).hexdigest()[:16]
    return os.path.join(cache_dir, _CACHE_FOLDER, f"{os.path.basename(bin_path)}-{digest}.json")


def token_range(prefix: str, cache_dir: Optional[str] = None) -> dict:
    """{"path", "size", "mtime_ns", "min", "max"} of `<prefix>.bin`, from a cache entry whose size
    and mtime still match, else scanned and cached (beside the data, else in `cache_dir`)."""
    bin_path = os.path.abspath(prefix + ".bin")
    st = os.stat(bin_path)
    key = {"path": bin_path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    folders = [os.path.join(os.path.dirname(bin_path), "index-cache")] + \
        ([cache_dir] if cache_dir else [])
    places = [_cache_path(folder, bin_path) for folder in folders]
    for place in places:
        try:
            with open(place) as f:
                entry = json.load(f)
            if all(entry.get(k) == v for k, v in key.items()):
                return entry
        except (OSError, ValueError):
            pass  # absent, unreadable or torn: try the next, then scan
    low, high = scan_token_range(bin_path, _bin_dtype(prefix))
    entry = dict(key, min=low, max=high)
    for place in places:
        try:
            os.makedirs(os.path.dirname(place), exist_ok=True)
            tmp = f"{place}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, place)
            break
        except OSError:
            continue
    return entry


def check_token_ids(prefixes: Sequence[str], vocab_size: int,
                    cache_dir: Optional[str] = None) -> None:
    """ValueError naming the first file whose ids fall outside [0, vocab_size)."""
    for prefix in prefixes:
        entry = token_range(prefix, cache_dir)
        if entry["max"] is None:
            continue
        if entry["max"] >= vocab_size or entry["min"] < 0:
            bad = entry["max"] if entry["max"] >= vocab_size else entry["min"]
            raise ValueError(
                f"{prefix}.bin holds token id {bad} (ids span {entry['min']}..{entry['max']}) but "
                f"the tokenizer has {vocab_size} ids (0..{vocab_size - 1}); the data was built "
                "with another tokenizer: rebuild it with tools/preprocess_data.py and this "
                "run's --tokenizer-type/--tokenizer-model")


def check_token_ids_rank_zero_first(prefixes: Sequence[str], vocab_size: int,
                                    cache_dir: Optional[str] = None) -> None:
    """`check_token_ids` on every rank (collective): rank 0 scans and caches first, the others
    then read its cache instead of all scanning the corpus at once. Every rank raises the same
    error; none is left waiting at the barrier."""
    import torch.distributed as dist

    from megatron_rlp import device

    if not device.is_distributed():
        check_token_ids(prefixes, vocab_size, cache_dir)
        return
    error = None
    if dist.get_rank() == 0:
        try:
            check_token_ids(prefixes, vocab_size, cache_dir)
        except Exception as e:  # raised after the barrier, so no rank hangs on it
            error = e
    device.barrier()
    if error is not None:
        raise error
    if dist.get_rank() != 0:
        check_token_ids(prefixes, vocab_size, cache_dir)
