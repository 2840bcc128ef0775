"""Checks of the GPU path that run on a CPU-only torch, one per subprocess (`python THIS CHECK`).

A fresh process is needed because the CPU shims (`compat/cpu.py`) are process-wide once applied,
and they map every CUDA request to the CPU, which would hide exactly what these checks look for.
Except for the meta-device forward, CUDA is *declared* present before megatron_rlp is imported
(`torch.cuda.is_available` is True, `current_device` is 0); TransformerEngine and mamba_ssm are
absent, and nothing can really allocate on a GPU. Three tools make that useful (DESIGN.md, "The GPU path"):

- torch's "cuda:fake" process group (FakeStore) accepts CUDA tensors only and raises nccl's own
  "No backend type associated with device type cpu" for a CPU tensor;
- FakeTensorMode makes `device="cuda"` tensors without memory and raises on any CPU/CUDA mix;
- the meta device builds the model without allocating.
Fake tensors carry no values, so reading a reduced number back (`device.host_list`) is replaced by
zeros of the right length: these checks are about where tensors live, not what they hold.

Each check prints one JSON line; tests/test_gpu_simulation.py runs them and asserts on it.
"""
import json
import sys

import torch

import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore


def declare_cuda_present() -> None:
    """A GPU host as far as code that *asks* is concerned. (Not for FakeTensorMode traces: with
    CUDA declared present, fake tensors try real CUDA device guards for some ops.)"""
    torch.cuda.is_available = lambda: True
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    torch.cuda.get_device_capability = lambda device=None: (9, 0)  # a Hopper GPU

TINY = dict(num_layers=4, hybrid_override_pattern="M*M-", hidden_size=64, ffn_hidden_size=128,
            num_attention_heads=4, num_query_groups=2, mamba_num_heads=4, mamba_head_dim=16,
            mamba_state_dim=16, mamba_num_groups=2, mamba_chunk_size=16, seq_length=32,
            micro_batch_size=2)
VOCAB = 96
CUDA = torch.device("cuda", 0)


def fake_world(world_size: int = 2, tp: int = 1) -> None:
    from megatron.core import parallel_state

    dist.init_process_group("cuda:fake", store=FakeStore(), rank=0, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             create_gloo_process_groups=False)


def values_from_fake_tensors(device_module) -> None:
    """Fake tensors hold no values: host numbers enter as an empty tensor *on the device asked
    for* (so a wrong device still reaches the collective and fails) and leave as zeros."""
    device_module.from_host = lambda values, dtype, device: torch.empty(len(values), dtype=dtype,
                                                                        device=device)
    device_module.host_list = lambda tensor: [0.0] * tensor.numel()


def tiny_config(**overrides):
    from megatron_rlp.config import config_from_dict

    return config_from_dict({**TINY, **overrides})


def build_on_meta(cfg):
    from megatron_rlp.models.hybrid import build_model

    with torch.device("meta"):
        return build_model(cfg, VOCAB)


def to_fake_cuda(model: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Replace every meta parameter/buffer by a fake CUDA tensor (random init and autograd on fake
    CUDA tensors abort on a CPU-only torch, so they carry no grad)."""
    with mode:
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                fake = torch.empty(param.shape, dtype=param.dtype, device=CUDA)
                setattr(module, name, torch.nn.Parameter(fake, requires_grad=False))
            for name, buf in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, torch.empty(buf.shape, dtype=buf.dtype, device=CUDA))


# ----------------------------------------------------------------------------------- checks
def check_host() -> dict:
    """What a GPU host without TE/Apex gets: no CPU shims, the optimizer `step` fix in force."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_rlp.compat import cpu_patches_active
    from megatron_rlp.training.distributed import backend, prepare_megatron

    shims = prepare_megatron()
    fix = DistributedOptimizer._set_main_param_and_optimizer_states
    return {"cpu_shims": shims or cpu_patches_active(), "backend": backend(),
            "step_fix": bool(getattr(fix, "_megatron_rlp_patched", False))}


def check_model_build() -> dict:
    """The model built on a CUDA host without TE: module classes and state-dict keys."""
    from megatron_rlp.training.distributed import prepare_megatron

    prepare_megatron()
    fake_world(world_size=1)
    model = build_on_meta(tiny_config())
    classes = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()})
    return {"classes": classes, "keys": sorted(model.state_dict().keys())}


def check_fake_nccl_collectives() -> dict:
    """Every project collective path under a world that rejects CPU tensors like nccl."""
    from types import SimpleNamespace

    from megatron_rlp import device
    from megatron_rlp.training.distributed import prepare_megatron
    from megatron_rlp.training.trainer import Trainer, _reduce_loss_dicts

    prepare_megatron()
    fake_world(world_size=2)
    out = {"group_device": str(device.group_device())}
    try:  # the control: a CPU tensor straight into the fake nccl group
        dist.all_reduce(torch.zeros(1))
        out["cpu_tensor_rejected"] = False
    except RuntimeError as error:
        out["cpu_tensor_rejected"] = "device type cpu" in str(error)
    values_from_fake_tensors(device)
    mode = FakeTensorMode()
    with mode:
        # Fake collectives return zeros, so only reaching the end is checked here.
        training = SimpleNamespace(exit_interval=None, exit_duration_in_mins=1.0)
        trainer = SimpleNamespace(_stop_requested=True, iteration=1, started_at=0.0,
                                  pending_save=None, cfg=SimpleNamespace(training=training))
        Trainer._end_of_iteration(trainer)
        out["exit_agreement_ran"] = True
        losses = [{"loss": torch.empty((), device=CUDA)} for _ in range(3)]
        out["loss_reduced"] = sorted(_reduce_loss_dicts(losses))
        out["rlp"] = sorted(_rlp_callback_metrics())
        amax_input = torch.empty(4, 32, device=CUDA)
        out["nvfp4_amax_device"] = str(_nvfp4_amax(amax_input).device)
    return out


def _rlp_callback_metrics() -> dict:
    from types import SimpleNamespace

    from megatron_rlp.rlp.stage import _SUM_KEYS, RLPCallback

    stage = SimpleNamespace(stats=dict.fromkeys(_SUM_KEYS, 1.0),
                            teacher=SimpleNamespace(update=lambda model: None, updates=1))
    callback = RLPCallback(stage)
    trainer = SimpleNamespace(model=[None], extra_state={})
    callback.after_optimizer_step(trainer, 1)     # step token counts, all-reduced over DP
    return callback.metrics(trainer)               # the window's sums, all-reduced over DP


def _nvfp4_amax(tensor):
    """The TP amax all-reduce of NVFP4 scaling. The reference amax builds scalar constants with
    `torch.tensor`, which fake CUDA cannot hold: a plain amax stands in for it here."""
    from megatron.core import parallel_state

    import importlib

    nvfp4_linear = importlib.import_module("megatron_rlp.quant.nvfp4_linear")
    nvfp4_linear.nvfp4.compute_amax = lambda t, rht, backend: t.abs().amax()

    return nvfp4_linear._amax(tensor, rht=False, group=parallel_state.get_data_parallel_group(),
                 backend="reference")


def check_tp_broadcast() -> dict:
    """Sampled tokens are broadcast over the TP group (generate under TP=2)."""
    from megatron_rlp.inference.generate import _tp_sync
    from megatron_rlp.training.distributed import prepare_megatron

    prepare_megatron()
    fake_world(world_size=2, tp=2)
    with FakeTensorMode():
        tokens = _tp_sync(torch.empty(3, dtype=torch.long, device=CUDA))
    return {"device": str(tokens.device)}


def check_meta_accelerator_forward() -> dict:
    """The model forward, the pretraining `forward_step` (host batch in) and a cached-decoding
    prefill with the model on the meta device standing in for a GPU: a tensor the code creates on
    the CPU, or a batch left there, meets meta tensors and raises. (FakeTensorMode would be the
    closer stand-in, but on a CPU-only torch 2.13 fake CUDA tensors cannot be sliced or made
    contiguous, so megatron's embedding already fails.) Decoding *steps* are not traced: they
    read the cache length, which a meta tensor does not have."""
    from megatron_rlp.inference.decode import CachedDecoder
    from megatron_rlp.training.trainer import PretrainStage

    fake_world(world_size=1)  # no CPU shims: they would map CUDA requests to the CPU
    cfg = tiny_config()
    model = build_on_meta(cfg)
    out = {}
    with torch.no_grad():
        ids = torch.zeros(2, 32, dtype=torch.long, device="meta")
        logits = model(ids, None, None)
        out["logits"] = [str(logits.device), list(logits.shape)]
        host_batch = {"tokens": torch.zeros(2, 32, dtype=torch.long),
                      "labels": torch.zeros(2, 32, dtype=torch.long),
                      "loss_mask": torch.ones(2, 32)}
        stage = PretrainStage(cfg, data_source=None)
        output, loss_func = stage.forward_step(iter([host_batch]), model)
        loss, _ = loss_func(output)
        out["loss"] = str(loss.device)
        prefill_logits, cache = CachedDecoder(model, VOCAB).prefill(ids[:, :8])
        out["prefill"] = [str(prefill_logits.device)] + sorted(
            {str(t.device) for pair in list(cache.kv.values()) + list(cache.mamba.values())
             for t in pair})
    return out


def check_dry_run() -> dict:
    """`--dry-run` on a GPU host: no CPU shims, nothing allocated on the (absent) GPU."""
    from megatron_rlp.dry_run import dry_run

    report = dry_run(tiny_config(), verbose=False)
    return {"total": report["total_params"] if "total_params" in report else sorted(report)}


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    if sys.argv[1] != "meta_accelerator_forward":
        declare_cuda_present()
    print(json.dumps(CHECKS[sys.argv[1]]()), flush=True)
