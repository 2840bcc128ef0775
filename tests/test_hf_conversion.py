"""HF NemotronH export/import end to end: logits parity with transformers, bit-exact round trips,
TP=2 checkpoints, padded vocab, sharding, and bad input. CPU, fp32, tiny random models."""
import json
import os
import socket

import pytest
import torch

transformers = pytest.importorskip("transformers")  # dev extra; an import error elsewhere fails
from safetensors.torch import load_file, save_file  # noqa: E402

from megatron_rlp.config import config_from_dict  # noqa: E402
from megatron_rlp.hf import mapping  # noqa: E402
from megatron_rlp.hf.export import export_to_hf  # noqa: E402
from megatron_rlp.hf.import_ import import_from_hf, save_weights_checkpoint  # noqa: E402
from megatron_rlp.hf.parity import compare, load_hf_reference  # noqa: E402

TOL = 1e-4
SEQ = 40  # > chunk size 16 and not a multiple of it: exercises chunk passing and padding

BASE = dict(hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
            mamba_num_heads=8, mamba_head_dim=16, mamba_state_dim=8, mamba_num_groups=2,
            mamba_chunk_size=16, seq_length=SEQ, micro_batch_size=2)

PATTERNS = {
    "only_mamba": dict(hybrid_override_pattern="MMMM", mamba_num_groups=1),
    "only_attention": dict(hybrid_override_pattern="*-*-", num_query_groups=4, kv_channels=32),
    "mixed_gqa": dict(hybrid_override_pattern="M*M-"),
    "mamba_groups4_gqa4to1": dict(hybrid_override_pattern="M-M*", mamba_num_groups=4,
                                  num_query_groups=1),
}


def _flat(**overrides):
    flat = dict(BASE, **overrides)
    flat["num_layers"] = len(flat["hybrid_override_pattern"])
    return config_from_dict(flat).to_flat_dict()


@torch.no_grad()
def make_checkpoint(root, *, seed=0, randomize=True, **overrides):
    """A random TP=1 checkpoint in the trainer's layout. Norm weights, D and dt_bias are
    perturbed away from their init so a swapped or mis-split tensor changes the logits."""
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import init_distributed

    flat = _flat(seed=seed, **overrides)
    cfg = config_from_dict(flat)
    init_distributed(cfg.parallel, seed)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    model = build_model(cfg, tokenizer.vocab_size)
    if randomize:
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", ".D")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("dt_bias"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    save_weights_checkpoint(model, flat, str(root), stage="pretrain")
    return str(root)


def _ids(vocab, seed=0, batch=2):
    return torch.randint(0, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _logits_diff(ckpt, hf_dir):
    from megatron_rlp import load_model

    ours = load_model(ckpt)
    hf = load_hf_reference(hf_dir)
    rows = compare(ours, hf, _ids(ours.vocab_size))
    return rows


@pytest.mark.parametrize("name", list(PATTERNS))
def test_exported_model_logits_match_transformers(tmp_path, name):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=3, **PATTERNS[name])
    hf_dir = str(tmp_path / "hf")
    export_to_hf(ckpt, hf_dir, verbose=False)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config["model_type"] == "nemotron_h" and config["time_step_min"] > 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)  # no overrides, no remote code
    assert type(plain).__name__ == "NemotronHForCausalLM"
    rows = _logits_diff(ckpt, hf_dir)
    diffs = {r["stage"]: r["max_abs_diff"] for r in rows}
    print(f"\nparity {name}: logits max abs diff {diffs['logits']:.3e}")
    assert diffs["logits"] <= TOL, rows
    assert rows[-1]["max_abs"] > 0.1  # the comparison is not between two near-zero tensors


def test_load_model_accepts_hf_directory_and_matches_checkpoint(tmp_path):
    from megatron_rlp import load_model

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=4, **PATTERNS["mixed_gqa"])
    export_to_hf(ckpt, str(tmp_path / "hf"), verbose=False)
    ids = _ids(1024)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "hf"))(ids), load_model(ckpt)(ids))


def test_hf_tokenizer_files_load_with_autotokenizer(tmp_path):
    from megatron_rlp.data.tokenizer import build_tokenizer

    ckpt = make_checkpoint(tmp_path / "ckpt", randomize=False, **PATTERNS["mixed_gqa"])
    export_to_hf(ckpt, str(tmp_path / "hf"), verbose=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = build_tokenizer("EmbeddedTokenizer")
    text = "17 + 25 = 42. The cat sat."
    assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.eos_token_id == ours.eod and tok.pad_token_id == ours.pad
    gen = json.load(open(tmp_path / "hf" / "generation_config.json"))
    assert gen["eos_token_id"] == ours.eod


def _our_tensors(ckpt):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_rlp.training.checkpoint import checkpoint_dir, read_latest_iteration

    d = checkpoint_dir(ckpt, read_latest_iteration(ckpt))
    meta = dist_checkpointing.load_tensors_metadata(d)
    state = {k: ShardedTensor.from_rank_offsets(k, torch.empty(v.global_shape, dtype=v.dtype), replica_id=0)
             for k, v in meta.items() if mapping.is_model_key(k)}
    loaded = dist_checkpointing.load(state, d)  # also merges in the common (non-tensor) state
    return {k: v for k, v in loaded.items() if k in state}


def test_export_import_round_trip_is_bit_exact(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=5, **PATTERNS["mamba_groups4_gqa4to1"])
    export_to_hf(ckpt, str(tmp_path / "hf1"), verbose=False)
    import_from_hf(str(tmp_path / "hf1"), str(tmp_path / "back"), verbose=False)
    export_to_hf(str(tmp_path / "back"), str(tmp_path / "hf2"), verbose=False)
    a, b = _our_tensors(ckpt), _our_tensors(str(tmp_path / "back"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "hf1" / f).read_bytes() == (tmp_path / "hf2" / f).read_bytes(), f
    # The imported run config is the original one (sidecar), built-in tokenizer kept.
    back_cfg = json.load(open(tmp_path / "hf2" / mapping.SIDECAR_FILE))["run_config"]
    assert back_cfg["tokenizer_type"] == "EmbeddedTokenizer"
    assert back_cfg["hybrid_override_pattern"] == "M-M*"


def test_padded_vocab_is_exported_by_default_and_trimmed_on_request(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=6, tokenizer_type="ByteTokenizer",
                           **PATTERNS["mixed_gqa"])  # 260 ids, padded to 384
    export_to_hf(ckpt, str(tmp_path / "padded"), verbose=False)
    export_to_hf(ckpt, str(tmp_path / "trimmed"), trim_vocab=True, verbose=False)
    assert json.load(open(tmp_path / "padded" / "config.json"))["vocab_size"] == 384
    assert json.load(open(tmp_path / "trimmed" / "config.json"))["vocab_size"] == 260
    for d in ("padded", "trimmed"):
        rows = _logits_diff(ckpt, str(tmp_path / d))
        assert rows[-1]["max_abs_diff"] <= TOL, (d, rows)
    # Importing the trimmed model re-pads with zero rows; real-token logits are unchanged.
    import_from_hf(str(tmp_path / "trimmed"), str(tmp_path / "back"), verbose=False)
    a, b = _our_tensors(ckpt), _our_tensors(str(tmp_path / "back"))
    assert torch.equal(a["output_layer.weight"][:260], b["output_layer.weight"][:260])
    assert not b["output_layer.weight"][260:].any()


def test_large_export_is_sharded_with_an_index_and_loads(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=7, **PATTERNS["mixed_gqa"])
    hf_dir = tmp_path / "hf"
    report = export_to_hf(ckpt, str(hf_dir), max_shard_size="300KB", verbose=False)
    assert report["shards"] > 2
    index = json.load(open(hf_dir / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == {
        f"model-{i:05d}-of-{report['shards']:05d}.safetensors" for i in range(1, report["shards"] + 1)}
    assert not (hf_dir / "model.safetensors").exists()
    assert _logits_diff(ckpt, str(hf_dir))[-1]["max_abs_diff"] <= TOL
    import_from_hf(str(hf_dir), str(tmp_path / "back"), verbose=False)
    a, b = _our_tensors(ckpt), _our_tensors(str(tmp_path / "back"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# TP=2: a checkpoint written by two tensor-parallel ranks exports to the same HF weights
# ------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp2_worker(rank, port, flat, save):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", TORCHDYNAMO_DISABLE="1")
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training import checkpoint as ckpt
    from megatron_rlp.training.distributed import init_distributed

    cfg = config_from_dict({**flat, "tensor_model_parallel_size": 2})
    init_distributed(cfg.parallel, cfg.training.seed)
    model = build_model(cfg, build_tokenizer(cfg.data.tokenizer_type).vocab_size)
    state = ckpt.model_sharded_state_dict([model])
    state["training"] = {"iteration": 0, "consumed_samples": 0, "stage": "pretrain",
                         "config": cfg.to_flat_dict(), "layout": [2, 1, 1],
                         "format_version": ckpt.FORMAT_VERSION}
    d = ckpt.checkpoint_dir(save, 0)
    if rank == 0:
        os.makedirs(d)
    dist.barrier()
    dist_checkpointing.save(state, d)
    dist.barrier()
    if rank == 0:
        open(os.path.join(save, "latest"), "w").write("0\n")
    dist.destroy_process_group()


def test_tp2_checkpoint_exports_same_hf_weights_as_tp1(tmp_path):
    """Both layouts are initialised from the same seed (megatron's CPU init and our mixer's are
    TP-invariant), saved by a real TP=2 run of two gloo ranks and by TP=1, then exported."""
    overrides = dict(PATTERNS["mamba_groups4_gqa4to1"], num_query_groups=2, seed=11)
    flat = _flat(**overrides)
    make_checkpoint(tmp_path / "tp1", randomize=False, **overrides)
    torch.multiprocessing.spawn(_tp2_worker, args=(_free_port(), flat, str(tmp_path / "tp2")),
                                nprocs=2, join=True)
    export_to_hf(str(tmp_path / "tp1"), str(tmp_path / "hf1"), verbose=False)
    export_to_hf(str(tmp_path / "tp2"), str(tmp_path / "hf2"), verbose=False)
    a = load_file(str(tmp_path / "hf1" / "model.safetensors"))
    b = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the tensor or field, nothing silently wrong
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def hf_dir(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", randomize=False, **PATTERNS["mixed_gqa"])
    out = tmp_path / "hf"
    export_to_hf(ckpt, str(out), verbose=False)
    return out


def _edit_config(hf_dir, **changes):
    path = hf_dir / "config.json"
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


def test_import_names_an_unknown_tensor(hf_dir, tmp_path):
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["backbone.layers.0.mixer.in_proj.bias"] = torch.zeros(3)
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(mapping.ConversionError, match="unknown tensor 'backbone.layers.0.mixer.in_proj.bias'"):
        import_from_hf(str(hf_dir), str(tmp_path / "out"), verbose=False)
    assert not (tmp_path / "out" / "latest").exists()


def test_import_names_a_tensor_whose_shape_disagrees_with_the_config(hf_dir, tmp_path):
    _edit_config(hf_dir, ssm_state_size=16)
    with pytest.raises(mapping.ConversionError, match="'backbone.layers.0.mixer.in_proj.weight' has shape"):
        import_from_hf(str(hf_dir), str(tmp_path / "out"), verbose=False)


def test_import_names_a_layer_kind_we_lack(hf_dir, tmp_path):
    _edit_config(hf_dir, layers_block_type=["linear_attention", "moe", "linear_attention", "mlp"])
    with pytest.raises(mapping.ConversionError, match=r"layers_block_type\[1\]='moe'"):
        import_from_hf(str(hf_dir), str(tmp_path / "out"), verbose=False)
    assert not (tmp_path / "out").exists()


def test_import_refuses_index_entries_outside_the_directory(hf_dir, tmp_path):
    names = load_file(str(hf_dir / "model.safetensors")).keys()
    json.dump({"weight_map": {n: "../model.safetensors" for n in names}},
              open(hf_dir / "model.safetensors.index.json", "w"))
    with pytest.raises(mapping.ConversionError, match="refusing file name '../model.safetensors'"):
        import_from_hf(str(hf_dir), str(tmp_path / "out"), verbose=False)


def test_import_never_unpickles_bin_weights(hf_dir, tmp_path):
    os.remove(hf_dir / "model.safetensors")
    (hf_dir / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(mapping.ConversionError, match="pickled weights are never loaded"):
        import_from_hf(str(hf_dir), str(tmp_path / "out"), verbose=False)


def test_export_names_an_unknown_tensor_in_the_checkpoint(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    ckpt = make_checkpoint(tmp_path / "ckpt", randomize=False, **PATTERNS["mixed_gqa"])
    key = "decoder.layers.1.self_attention.linear_qkv.bias"  # e.g. a bias the format lacks
    real = dist_checkpointing.load_tensors_metadata

    def with_extra(d, *a, **k):
        meta = dict(real(d, *a, **k))
        meta[key] = ShardedTensor.from_rank_offsets(key, torch.zeros(4), replica_id=0)
        return meta

    monkeypatch.setattr(dist_checkpointing, "load_tensors_metadata", with_extra)
    with pytest.raises(mapping.ConversionError, match=f"unknown tensor '{key}'"):
        export_to_hf(ckpt, str(tmp_path / "hf"), verbose=False)
    assert not (tmp_path / "hf").exists()


def test_export_refuses_to_overwrite_a_model_without_the_flag(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="already holds a model"):
        export_to_hf(str(tmp_path / "ckpt"), str(hf_dir), verbose=False)


def test_cli_reports_bad_input_in_one_line_with_exit_code_2(hf_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(os.path.dirname(__file__), "..", "tools", "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    _edit_config(hf_dir, mlp_hidden_act="gelu")
    code = cli.main(["--from-hf", "--load", str(hf_dir), "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("convert_checkpoint: error: config.json mlp_hidden_act='gelu'")
