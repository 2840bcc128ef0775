"""`--dry-run` counts the 12B Nemotron-H config's parameters exactly, per rank too, in seconds,
building on the meta device (no allocation, no GPU)."""
import os
import re
import subprocess
import sys
import time

from mp_utils import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, "examples", "nemotron_h_12b.yaml")


def nemotron_h_params(pattern, h, ffn, heads, groups, kv, m_heads, m_head_dim, m_state, m_groups,
                      conv, vocab):
    """Closed form: embedding + untied output layer + final norm + per-kind layer sizes."""
    d_inner = m_heads * m_head_dim
    conv_dim = d_inner + 2 * m_groups * m_state
    mamba = (h                                            # pre-norm
             + h * (2 * d_inner + 2 * m_groups * m_state + m_heads)  # in_proj z|x|B|C|dt
             + conv_dim * conv + conv_dim                 # depthwise conv weight + bias
             + 3 * m_heads                                # dt_bias, A_log, D
             + d_inner                                    # gated RMSNorm
             + d_inner * h)                               # out_proj
    attention = h + h * (heads * kv + 2 * groups * kv) + heads * kv * h
    mlp = h + 2 * h * ffn
    layers = {"M": mamba, "*": attention, "-": mlp}
    return 2 * vocab * h + h + sum(layers[c] for c in pattern)


PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
EXPECTED = nemotron_h_params(PATTERN, h=5120, ffn=20480, heads=40, groups=8, kv=128, m_heads=128,
                             m_head_dim=80, m_state=128, m_groups=8, conv=4, vocab=131072)


def run_dry(*flags):
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "megatron_rlp.train", "--config", CONFIG, "--dry-run", *flags],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, time.perf_counter() - start


def test_dry_run_counts_12b_exactly_and_per_rank():
    out, seconds = run_dry()
    assert EXPECTED == 12_310_001_152  # ≈ 12.3B, the published Nemotron-H-12B size
    total = int(re.search(r"parameters: ([\d,]+) total", out).group(1).replace(",", ""))
    assert total == EXPECTED
    # TP=8: every matrix and Mamba vector is split 8 ways; only the 62 pre-norms and the final
    # norm (hidden-size vectors) are replicated.
    replicated = (62 + 1) * 5120
    per_rank = int(re.search(r"([\d,]+) params per rank", out).group(1).replace(",", ""))
    assert per_rank == (EXPECTED - replicated) // 8 + replicated
    assert "memory per GPU" in out and "weights" in out and "activations" in out
    assert seconds < 60, seconds


def test_dry_run_pipeline_stages_cover_the_model():
    out, _ = run_dry("--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "4",
                     "--no-sequence-parallel")
    stages = re.findall(r"stage (\d): 31 layers, ([\d,]+) params per rank", out)
    assert [s for s, _ in stages] == ["0", "1"]
    total = int(re.search(r"parameters: ([\d,]+) total", out).group(1).replace(",", ""))
    assert total == EXPECTED
    peak = float(re.search(r"peak memory per GPU ~([\d.]+) GiB", out).group(1))
    per_stage = [float(x) for x in re.findall(r"memory per GPU ~([\d.]+) GiB \(", out)]
    assert peak == max(per_stage) and per_stage[0] > per_stage[1]  # stage 0 holds 2 in flight


def test_memory_estimate_components():
    """Weights bf16, fp32 grad buffer, Adam (fp32 master + 2 moments) sharded over DP."""
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.dry_run import memory_estimate

    cfg = config_from_dict({"bf16": True, "use_distributed_optimizer": True})
    mem = memory_estimate(cfg, params_per_rank=1000, activations=10.0, in_flight=3, dp=4)
    assert mem == {"weights": 2000, "grads": 4000, "optimizer": 3000.0, "activations": 30.0,
                   "total": 9030.0}


def test_dry_run_prints_the_nvfp4_plan_at_the_planned_tp_size():
    out, _ = run_dry("--fp4", "nvfp4")
    # 12B recipe: first 2 and last 8 of 62 blocks BF16; at TP8 every middle-block linear shard is
    # a multiple of 16 (the Mamba in_proj: (2*10240 + 2*8*128 + 128) / 8 = 2832 rows), so all
    # 52 middle blocks run both of their linears in NVFP4.
    assert "NVFP4 blocks: 52/62, linears: 104/124" in out
    assert "kept bf16" not in out
    rows = {int(line.split()[0]): line.split()[2] for line in out.splitlines()
            if re.match(r"\s+\d+\s+(mamba|attention|mlp)\s", line)}
    assert [i for i, p in sorted(rows.items()) if p == "bf16"] == [0, 1, *range(54, 62)]
    assert "NVFP4 GEMMs: chosen at start-up on the GPU (--fp4-gemm auto" in out
