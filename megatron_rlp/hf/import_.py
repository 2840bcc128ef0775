"""Import a Hugging Face NemotronH directory into megatron-rlp (a checkpoint, or a model in memory).

    python tools/convert_checkpoint.py --from-hf --load hf/tiny --save runs/from_hf
    python -m megatron_rlp.train --config ... --load runs/from_hf --save runs/continued  (any TP/PP)

The written checkpoint holds weights only (stage "hf_import", iteration 0): `--load` starts a new
stage from it. It is saved at TP=PP=1; dist_checkpointing reshards it to whatever TP/PP the
training run uses (the Mamba in_proj/conv are stored per component, so resharding is exact).

Only safetensors are read (never pickles), config.json is parsed as data (no remote code), and the
shard file names in model.safetensors.index.json must stay inside the HF directory.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional

import torch

from . import config_keys, mapping

IMPORT_STAGE = "hf_import"
BUILTIN_TOKENIZERS = ("EmbeddedTokenizer", "ByteTokenizer")


def read_json(hf_dir: str, name: str) -> Optional[dict]:
    path = mapping.check_safe_filename(hf_dir, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise mapping.ConversionError(f"{path}: not valid JSON ({error})") from None


def read_config(hf_dir: str) -> dict:
    hf = read_json(hf_dir, "config.json")
    if hf is None:
        raise mapping.ConversionError(f"{hf_dir}: no config.json; not a Hugging Face model dir")
    return hf


def is_hf_dir(path: str) -> bool:
    """A directory with a config.json whose model_type is nemotron_h."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return json.load(f).get("model_type") == "nemotron_h"
    except (OSError, json.JSONDecodeError):
        return False


def tensor_files(hf_dir: str) -> dict:
    """HF tensor name (canonical `backbone.*`) → safetensors file path. Refuses .bin/.pt files."""
    index = read_json(hf_dir, "model.safetensors.index.json")
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise mapping.ConversionError(f"{hf_dir}/model.safetensors.index.json: no weight_map")
        files = {name: mapping.check_safe_filename(hf_dir, f) for name, f in weight_map.items()}
    else:
        single = mapping.check_safe_filename(hf_dir, "model.safetensors")
        if not os.path.isfile(single):
            pickles = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth"))]
            raise mapping.ConversionError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json"
                + (f" (found {pickles[0]}: pickled weights are never loaded; convert them to "
                   "safetensors with a tool you trust)" if pickles else ""))
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            files = {name: single for name in f.keys()}
    out = {}
    for name, path in files.items():
        canonical = mapping.hf_name_to_canonical(name)
        out[canonical] = (path, name)
    return out


def _tensor_shapes(files: dict) -> dict:
    from safetensors import safe_open

    shapes, by_file = {}, {}
    for canonical, (path, name) in files.items():
        by_file.setdefault(path, []).append((canonical, name))
    for path, names in by_file.items():
        if not os.path.isfile(path):
            raise mapping.ConversionError(f"shard {path} named by the index is missing")
        with safe_open(path, framework="pt") as f:
            present = set(f.keys())
            for canonical, name in names:
                if name not in present:
                    raise mapping.ConversionError(f"tensor {name!r} is listed in the index but "
                                                  f"absent from {path}")
                shapes[canonical] = tuple(f.get_slice(name).get_shape())
    return shapes


def run_config_from_hf(hf_dir: str, tokenizer_dir: Optional[str] = None) -> dict:
    """Flat megatron-rlp run config for an HF directory. Starts from our sidecar (exact training
    settings of an exported model) when present; model shapes always come from config.json.
    `tokenizer_dir`: where the tokenizer.json should be referenced from (default: `hf_dir`)."""
    from megatron_rlp.config import field_owner
    from megatron_rlp.data.tokenizer import build_tokenizer

    hf = read_config(hf_dir)
    sidecar = read_json(hf_dir, mapping.SIDECAR_FILE) or {}
    known = field_owner()
    # Keys of an older or newer megatron-rlp only affect training, never the weights: drop them.
    flat = {k: v for k, v in (sidecar.get("run_config") or {}).items() if k in known}
    flat.update(config_keys.model_config_from_hf(hf))
    if "max_position_embeddings" in hf and "seq_length" not in flat:
        flat["seq_length"] = int(hf["max_position_embeddings"])
    tok_path = os.path.join(hf_dir, "tokenizer.json")
    if os.path.isfile(tok_path):
        keep_builtin = False
        if flat.get("tokenizer_type") in BUILTIN_TOKENIZERS:
            builtin = build_tokenizer(flat["tokenizer_type"])
            with open(tok_path) as f:
                keep_builtin = f.read() == builtin.hf_tokenizer_json()
        if not keep_builtin:
            flat["tokenizer_type"] = "HuggingFaceTokenizer"
            flat["tokenizer_model"] = os.path.abspath(
                os.path.join(tokenizer_dir or hf_dir, "tokenizer.json"))
    elif not flat.get("tokenizer_type"):
        raise mapping.ConversionError(f"{hf_dir}: no tokenizer.json, so the vocabulary is unknown;"
                                      " add the model's tokenizer.json")
    for key in ("save", "load", "data_path", "valid_data_path"):
        flat.pop(key, None)
    return flat


def _param_name(group: mapping.Group) -> str:
    """The module parameter a group fills: split components (`...in_proj.weight.z`) share one
    fused TP=1 parameter (`...in_proj.weight`) in rows z|x|B|C|dt."""
    return group.ours[0].rsplit(".", 1)[0] if len(group.ours) > 1 else group.ours[0]


@torch.no_grad()
def load_weights_into(model: torch.nn.Module, hf_dir: str, model_cfg, tokenizer_vocab: int,
                      tie_word_embeddings: bool = False, verbose: bool = True) -> None:
    """Copy the HF weights into a TP=PP=1 megatron-rlp model, one tensor at a time."""
    from safetensors import safe_open

    files = tensor_files(hf_dir)
    shapes = _tensor_shapes(files)
    hf_vocab = shapes.get("backbone.embeddings.weight", (0,))[0]
    if tie_word_embeddings and "lm_head.weight" not in files and hf_vocab:
        files["lm_head.weight"] = files["backbone.embeddings.weight"]
        shapes["lm_head.weight"] = shapes["backbone.embeddings.weight"]
    dims = mapping.dims_from_model_config(model_cfg, hf_vocab)
    units = mapping.model_units(dims)
    # A mis-shaped tensor names the config.json keys its expected shape came from, so a key read
    # in the wrong spelling (or a wrong value) shows, rather than blaming the weights.
    keys = config_keys.NemotronHConfigKeys(read_config(hf_dir))
    mapping.check_keys(shapes, units, "hf", explain_shape=keys.explain_shape)
    if hf_vocab < tokenizer_vocab:
        raise mapping.ConversionError(
            f"backbone.embeddings.weight has {hf_vocab} rows but the tokenizer has "
            f"{tokenizer_vocab} ids")

    params = dict(model.state_dict(keep_vars=True))
    params = {k: v for k, v in params.items() if not k.endswith("_extra_state")}
    rows = params["embedding.word_embeddings.weight"].shape[0]
    if verbose and hf_vocab > rows:
        print(f"note: HF vocab_size {hf_vocab} > our padded {rows}; rows {rows}..{hf_vocab - 1} "
              f"are beyond the tokenizer ({tokenizer_vocab} ids) and are dropped", flush=True)
    handles, filled = {}, set()
    try:
        for unit in units:
            for g in unit:
                hf_tensors = []
                for name in g.hf:
                    path, stored = files[name]
                    if path not in handles:
                        handles[path] = safe_open(path, framework="pt").__enter__()
                    hf_tensors.append(handles[path].get_tensor(stored))
                parts = g.to_ours(hf_tensors)
                target = _param_name(g)
                if target not in params:
                    raise mapping.ConversionError(f"{g.hf[0]}: the model has no parameter {target}")
                value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
                param = params[target]
                if target in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    n = min(rows, value.shape[0])
                    param.zero_()
                    param[:n].copy_(value[:n])
                else:
                    if tuple(param.shape) != tuple(value.shape):
                        raise mapping.ConversionError(
                            f"{g.hf[0]}: shape {tuple(value.shape)} does not fit {target} "
                            f"{tuple(param.shape)}")
                    param.copy_(value)
                filled.add(target)
                del hf_tensors, parts, value
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise mapping.ConversionError(f"parameter {unfilled[0]} got no HF tensor (mapping gap)")


def build_model_from_hf(hf_dir: str, *, tokenizer_dir: Optional[str] = None,
                        keep_precision: bool = False, verbose: bool = True, device=None):
    """(model, cfg, flat run config, tokenizer) for an HF dir, built at TP=PP=1 in this process on
    `device` (default: this process's GPU, else the CPU). `keep_precision=False` builds an fp32
    model (evaluation); True keeps the run's bf16 flag."""
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.inference.load import build_single_process_model, single_process_config

    hf = read_config(hf_dir)
    flat = run_config_from_hf(hf_dir, tokenizer_dir)
    cfg = single_process_config(flat)
    if keep_precision and flat.get("bf16"):
        cfg = config_from_dict({**cfg.to_flat_dict(), "bf16": True})
    model, tokenizer = build_single_process_model(cfg, device)
    load_weights_into(model, hf_dir, cfg.model, tokenizer.vocab_size,
                      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      verbose=verbose)
    return model.eval(), cfg, flat, tokenizer


def load_hf_model(hf_dir: str, device=None):
    """`megatron_rlp.load_model(HF_DIR)`: our CausalLM wrapper over the imported weights."""
    from megatron_rlp.inference.load import CausalLM

    model, cfg, _, tokenizer = build_model_from_hf(hf_dir, verbose=False, device=device)
    return CausalLM(model, tokenizer.vocab_size, cfg).eval()


def save_weights_checkpoint(model: torch.nn.Module, flat_config: dict, save: str,
                            stage: str = IMPORT_STAGE, iteration: int = 0) -> str:
    """A weights-only dist checkpoint in the trainer's layout (`iter_NNNNNNN/` + `latest`), whose
    stage differs from every training stage so `--load` starts a new stage from it."""
    from megatron.core import dist_checkpointing

    from megatron_rlp.training import checkpoint as ckpt
    from megatron_rlp.training import manifest, save_dir

    final_dir = ckpt.checkpoint_dir(save, iteration)
    tmp_dir = final_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    state = ckpt.model_sharded_state_dict([model])
    state["training"] = {"iteration": iteration, "consumed_samples": 0, "stage": stage,
                         "config": dict(flat_config), "layout": [1, 1, 1],
                         "format_version": ckpt.FORMAT_VERSION}
    # Written by threads, not forked writers + a spawn Manager that outlive a killed run.
    from megatron_rlp.training.ckpt_writer import InProcessSaveStrategy

    dist_checkpointing.save(state, tmp_dir, sharded_strategy=InProcessSaveStrategy(),
                            validate_access_integrity=True)
    # As the trainer finishes a save: manifest, swap into place (never delete-then-write), latest.
    files = manifest.describe_files(tmp_dir, manifest.list_files(tmp_dir))
    save_dir.publish(save, iteration, files)
    return final_dir


def import_from_hf(hf_dir: str, save: str, *, overwrite: bool = False,
                   verbose: bool = True) -> dict:
    """Convert the HF directory `hf_dir` into a megatron-rlp checkpoint under `save`."""
    start = time.perf_counter()
    if not os.path.isdir(hf_dir):
        raise ValueError(f"--load {hf_dir!r} is not a directory")
    if os.path.exists(os.path.join(save, "latest")) and not overwrite:
        raise ValueError(f"--save {save!r} already holds a checkpoint; pass --overwrite or choose "
                         "an empty directory")
    # Validate the config before creating anything.
    run_config_from_hf(hf_dir)
    os.makedirs(save, exist_ok=True)
    from .export import copy_tokenizer_file

    copy_tokenizer_file(hf_dir, save)
    model, cfg, flat, tokenizer = build_model_from_hf(hf_dir, tokenizer_dir=save,
                                                      keep_precision=True, verbose=verbose)
    out = save_weights_checkpoint(model, flat, save)
    report = {"checkpoint": out, "seconds": time.perf_counter() - start,
              "parameters": sum(p.numel() for p in model.parameters())}
    if verbose:
        print(f"imported {hf_dir} -> {out}: {report['parameters'] / 1e6:.2f}M parameters, "
              f"tokenizer {flat.get('tokenizer_type')}, {report['seconds']:.1f}s; continue "
              f"training with --load {save} (any TP/PP)", flush=True)
    return report
