"""The GPU path, proven on a CPU-only torch (see tests/simulated_gpu_host.py for the stand-ins).

Each check runs in a fresh process so the CPU shims of earlier tests cannot hide a CUDA request.
"""
import ast
import json
import os
import subprocess
import sys

import torch

from conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "tests", "simulated_gpu_host.py")


def run_check(name: str) -> dict:
    result = subprocess.run([sys.executable, SCRIPT, name], capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT,
                            env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_gpu_host_runs_megatron_unpatched_with_the_optimizer_step_fix():
    host = run_check("host")
    assert host == {"cpu_shims": False, "backend": "nccl", "step_fix": True}


def test_gpu_host_without_te_builds_the_cpu_model_exactly():
    gpu = run_check("model_build")
    assert not [c for c in gpu["classes"] if "transformer_engine" in c or ".TE" in c]
    assert "megatron_rlp.models.norm.RMSNorm" in gpu["classes"]
    assert "megatron_rlp.models.stack.HybridStack" in gpu["classes"]

    from megatron_rlp.config import config_from_dict
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    sys.path.insert(0, os.path.dirname(SCRIPT))
    from simulated_gpu_host import TINY, VOCAB

    cfg = config_from_dict(TINY)
    init_distributed(cfg.parallel, seed=1)
    try:
        with torch.device("meta"):
            cpu_keys = sorted(build_model(cfg, VOCAB).state_dict().keys())
    finally:
        destroy_distributed()
    assert gpu["keys"] == cpu_keys
    assert "decoder.final_norm.weight" in cpu_keys


def test_project_collectives_put_tensors_on_the_nccl_device():
    out = run_check("fake_nccl_collectives")
    assert out["cpu_tensor_rejected"], "the fake nccl world must reject CPU tensors"
    assert out["group_device"] == "cuda:0"
    assert out["exit_agreement_ran"] and out["loss_reduced"] == ["loss"]
    assert {"reward_mean", "ntp_equivalent_tokens", "thought_len_mean"} <= set(out["rlp"])
    assert out["nvfp4_amax_device"] == "cuda:0"


def test_tp_token_broadcast_runs_on_the_nccl_device():
    assert run_check("tp_broadcast") == {"device": "cuda:0"}


def test_forward_step_and_prefill_follow_the_model_device():
    out = run_check("meta_accelerator_forward")
    assert out["logits"][0] == "meta" and out["logits"][1][:2] == [2, 32]
    assert out["loss"] == "meta"
    assert out["prefill"] == ["meta", "meta"]


def test_dry_run_on_a_gpu_host_needs_no_gpu():
    assert run_check("dry_run")["total"] > 0


# ------------------------------------------------------------------------------ the one door
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor",
               "broadcast", "broadcast_object_list", "barrier", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
               "send", "recv", "isend", "irecv", "gather_object", "scatter_object_list",
               "monitored_barrier"}
SCANNED = ("megatron_rlp", "kernels", "tools")
THE_DOOR = os.path.join("megatron_rlp", "device.py")


def _collective_calls(path: str):
    tree = ast.parse(open(path).read(), path)
    dist_names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            dist_names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            for alias in node.names:
                if alias.name in COLLECTIVES:
                    yield node.lineno, f"from torch.distributed import {alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in dist_names:
                yield node.lineno, ast.unparse(node.func)


def test_no_collective_outside_the_device_module():
    offenders = []
    for top in SCANNED:
        for root, _, files in os.walk(os.path.join(REPO_ROOT, top)):
            for name in files:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO_ROOT)
                if name.endswith(".py") and rel != THE_DOOR:
                    offenders += [f"{rel}:{line}: {call}" for line, call in _collective_calls(path)]
    assert not offenders, "collectives must go through megatron_rlp/device.py:\n" + "\n".join(
        offenders)


def test_the_lint_sees_a_raw_collective(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\nimport torch\n"
                   "dist.all_reduce(x)\ntorch.distributed.barrier()\n")
    assert [line for line, _ in _collective_calls(str(bad))] == [3, 4]
