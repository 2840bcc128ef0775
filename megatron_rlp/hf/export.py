"""Export a megatron-rlp checkpoint (any TP/PP) to a Hugging Face NemotronH directory.

    python tools/convert_checkpoint.py --to-hf --load runs/tiny --save hf/tiny

Streaming: the dist checkpoint already stores every tensor at its global (TP=1) shape, split per
Mamba component; we read one *unit* (the embedding, one layer, or final norm + head) at a time
through dist_checkpointing with a partial sharded state dict, convert it with `mapping`, and append
it to a safetensors shard whose header was written up front. Peak memory is about one layer plus
the embedding, never a model copy.

Vocabulary: megatron pads the embedding to a multiple of `make_vocab_size_divisible_by · TP`. By
default the padded rows are exported too (`vocab_size` in config.json = padded size; ids beyond the
tokenizer are never produced by it), which keeps export → import bit-exact. `trim_vocab=True` cuts
the embedding and head to the tokenizer's size instead (what you want for serving).

Written files: config.json, generation_config.json, model.safetensors (or model-0000i-of-0000N +
model.safetensors.index.json), tokenizer.json, tokenizer_config.json, special_tokens_map.json, and
megatron_rlp.json (our run config, so `--from-hf` restores the exact training config).

Overwrites are build-aside-then-swap: everything is written to a hidden sibling directory
(`.NAME.export-PID.tmp`), and only a complete export replaces `save` (swapped in atomically where
the file system can, else old directory renamed aside, new one renamed in, old one deleted). A failed or killed export therefore leaves the previous
model untouched (a killed one also leaves its `.tmp` sibling, safe to delete), and `--overwrite`
replaces the whole directory, so no file of the old model (a stale `pytorch_model.bin`, an old
shard) survives. A directory holding a training checkpoint (`latest`, `iter_*`) is never an export
target: `load_model(dir)` would silently start returning the export instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from typing import Optional

import torch

from . import mapping
from .safetensors_stream import StreamingSafetensorsWriter, nbytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_FILES = ("config.json", "generation_config.json", "model.safetensors",
            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", mapping.SIDECAR_FILE)


def parse_size(text) -> int:
    """'2GB', '500MB', '1GiB' or a byte count → bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 2GB, 500MB or a byte count")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1024 if binary else 1000
    return int(number * base ** "_KMGT".index(unit or "_"))


def _is_model_file(name: str) -> bool:
    return (name in HF_FILES or name.endswith(".safetensors")
            or re.fullmatch(r"pytorch_model.*\.bin(\.index\.json)?", name) is not None)


def check_output_dir(save: str, overwrite: bool) -> None:
    """Refuse, before any work, a `save` the export must not replace (see the module doc)."""
    if os.path.exists(save) and not os.path.isdir(save):
        raise ValueError(f"--save {save!r} exists and is not a directory")
    if not os.path.isdir(save):
        return
    names = sorted(os.listdir(save))
    training = [n for n in names if n == "latest" or re.fullmatch(r"iter_\d+(\.tmp)?", n)]
    if training:
        raise ValueError(f"--save {save!r} holds a training checkpoint ({training[0]}); an HF "
                         "export there would change what load_model() reads from it: choose "
                         "another directory")
    if not names:
        return
    models = [n for n in names if _is_model_file(n)]
    if models and not overwrite:
        raise ValueError(f"--save {save!r} already holds a model ({models[0]}); pass "
                         "--overwrite or choose an empty directory")
    if not models:
        raise ValueError(f"--save {save!r} is not empty and holds no model ({names[0]}, ...): an "
                         "export replaces the whole directory; choose an empty or new one")


@contextlib.contextmanager
def staged_output_dir(save: str):
    """Yield a fresh sibling directory to write the export into; on success it replaces `save`
    the way a checkpoint re-save replaces its directory (`save_dir.swap_in`: never delete-then-
    write), on failure it is removed."""
    from megatron_rlp.training.save_dir import swap_in

    final = os.path.realpath(save)  # a symlinked --save: replace what it points at
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.export-{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier killed run with our pid
    os.makedirs(staging)
    try:
        yield staging
        swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(save: str, name: str, obj) -> None:
    path = mapping.check_safe_filename(save, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_tokenizer_files(save: str, tokenizer, max_length: int) -> None:
    """tokenizer.json (the HF `tokenizers` file itself) + a config naming PreTrainedTokenizerFast."""
    with open(mapping.check_safe_filename(save, "tokenizer.json"), "w") as f:
        f.write(tokenizer.hf_tokenizer_json())
    specials = {}
    eod, pad = _token_ids(tokenizer)
    if eod is not None:
        specials["eos_token"] = tokenizer.id_to_token(eod)
    if pad is not None:
        specials["pad_token"] = tokenizer.id_to_token(pad)
    _write_json(save, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **specials,
    })
    _write_json(save, "special_tokens_map.json", specials)


def _token_ids(tokenizer):
    try:
        eod = tokenizer.eod
    except ValueError:
        eod = None
    return eod, getattr(tokenizer, "pad", None)


def export_to_hf(load: str, save: str, *, max_shard_size="2GB", dtype: str = "auto",
                 trim_vocab: bool = False, overwrite: bool = False,
                 iteration: Optional[int] = None, verbose: bool = True) -> dict:
    """Convert `load` (a megatron-rlp checkpoint root) into the HF directory `save`.
    Returns a report dict (tensors, bytes, shards, seconds)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.inference.load import saved_run_config, single_process_config
    from megatron_rlp.training import checkpoint as ckpt
    from megatron_rlp.training import safe_load
    from megatron_rlp.training.distributed import init_distributed

    start = time.perf_counter()
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    if not os.path.isdir(load):
        raise ValueError(f"--load {load!r} is not a directory")
    check_output_dir(save, overwrite)
    flat, iteration = saved_run_config(load, iteration)
    cfg = single_process_config(flat)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    ckpt_dir = ckpt.checkpoint_dir(load, iteration)
    init_distributed(cfg.parallel, cfg.training.seed)

    # Validate everything (names, shapes, config) before writing a byte.
    metadata = safe_load.load_tensors_metadata(ckpt_dir)
    found = {k: tuple(v.global_shape) for k, v in metadata.items() if mapping.is_model_key(k)}
    if "embedding.word_embeddings.weight" not in found:
        raise mapping.ConversionError(f"{ckpt_dir}: no 'embedding.word_embeddings.weight'; not a "
                                      "megatron-rlp model checkpoint")
    vocab_rows = found["embedding.word_embeddings.weight"][0]
    dims = mapping.dims_from_model_config(cfg.model, vocab_rows)
    units = mapping.model_units(dims)
    mapping.check_keys(found, units, "ours")
    if tokenizer.vocab_size > vocab_rows:
        raise mapping.ConversionError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the embedding only {vocab_rows} rows")
    hf_vocab = tokenizer.vocab_size if trim_vocab else vocab_rows
    vocab_names = {"backbone.embeddings.weight", "lm_head.weight"}

    def out_dtype(our_key):
        return DTYPES[dtype] if dtype != "auto" else metadata[our_key].dtype

    entries = []  # (hf name, dtype, shape) in file order
    for unit in units:
        for g in unit:
            for name, shape in zip(g.hf, g.hf_shapes):
                if name in vocab_names:
                    shape = (hf_vocab,) + tuple(shape[1:])
                entries.append((name, out_dtype(g.ours[0]), tuple(shape)))
    config_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                    torch.float16: "float16"}[entries[0][1]]
    eod, pad = _token_ids(tokenizer)
    config = mapping.hf_config(cfg.model, vocab_size=hf_vocab,
                               max_position_embeddings=cfg.training.seq_length,
                               dtype=config_dtype, eos_token_id=eod, pad_token_id=pad)
    shard_of = mapping.shard_plan([(n, nbytes(s, d)) for n, d, s in entries], shard_bytes)
    num_shards = shard_of[-1] + 1
    file_of = (["model.safetensors"] if num_shards == 1 else
               [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)])

    # Written aside and swapped in whole: a failure leaves any previous export untouched.
    with staged_output_dir(save) as out:
        writer, current, index = None, None, 0  # index: next entry to write
        total_bytes = 0
        for unit in units:
            keys = [k for g in unit for k in g.ours]
            state = {k: ShardedTensor.from_rank_offsets(
                k, torch.empty(metadata[k].global_shape, dtype=metadata[k].dtype), replica_id=0)
                for k in keys}
            loaded = safe_load.load(state, ckpt_dir)
            for g in unit:
                converted = g.to_hf([loaded.pop(k) for k in g.ours])
                for name, tensor in zip(g.hf, converted):
                    shard = shard_of[index]
                    if shard != current:
                        if writer is not None:
                            writer.close()
                        shard_entries = [e for e, s in zip(entries, shard_of) if s == shard]
                        path = mapping.check_safe_filename(out, file_of[shard])
                        writer, current = StreamingSafetensorsWriter(path, shard_entries), shard
                    if name in vocab_names:
                        tensor = tensor[:hf_vocab]
                    tensor = tensor.to(entries[index][1])
                    writer.write(name, tensor)
                    total_bytes += tensor.numel() * tensor.element_size()
                    index += 1
            del loaded, state
        writer.close()

        if num_shards > 1:
            _write_json(out, "model.safetensors.index.json", {
                "metadata": {"total_size": total_bytes},
                "weight_map": {name: file_of[s] for (name, _, _), s in zip(entries, shard_of)}})
        _write_json(out, "config.json", config)
        _write_json(out, "generation_config.json", {
            "_from_model_config": True, "eos_token_id": eod, "pad_token_id": pad,
            "bos_token_id": None})
        write_tokenizer_files(out, tokenizer, cfg.training.seq_length)
        _write_json(out, mapping.SIDECAR_FILE, {
            "source_checkpoint": os.path.abspath(ckpt_dir), "iteration": iteration,
            "padded_vocab_rows": vocab_rows, "tokenizer_vocab_size": tokenizer.vocab_size,
            "vocab_trimmed": bool(trim_vocab),
            "note": ("vocab_size in config.json is megatron's padded size; ids >= "
                     f"{tokenizer.vocab_size} are padding"
                     if hf_vocab > tokenizer.vocab_size else ""),
            "run_config": {k: v for k, v in flat.items() if k not in ("save", "load")}})
    report = {"tensors": len(entries), "bytes": total_bytes, "shards": num_shards,
              "vocab_size": hf_vocab, "seconds": time.perf_counter() - start, "save": save}
    if verbose:
        print(f"exported {ckpt_dir} -> {save}: {len(entries)} tensors, "
              f"{total_bytes / 1e6:.1f} MB in {num_shards} shard(s), vocab_size {hf_vocab}"
              + (f" (padded; tokenizer has {tokenizer.vocab_size})"
                 if hf_vocab > tokenizer.vocab_size else "")
              + f", {report['seconds']:.1f}s", flush=True)
    return report


def copy_tokenizer_file(src_dir: str, dst_dir: str) -> Optional[str]:
    src = os.path.join(src_dir, "tokenizer.json")
    if not os.path.isfile(src):
        return None
    dst = os.path.join(dst_dir, "tokenizer.json")
    shutil.copyfile(src, dst)
    return dst
