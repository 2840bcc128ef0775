#!/usr/bin/env bash
# GPU check: install offline, GPU tests, tiny training runs compared with the CPU, resume, RLP,
# and two benchmarks, on a bare CUDA machine within ~8 minutes. See docs/GPU.md.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # where there is internet: wheels into .whl/
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from a copy of the repo + .whl/
#
# Each step prints one line, "[x] what ... PASS|FAIL|SKIP|NOT RUN (seconds) detail", and on FAIL
# the end of its log. A failed step does not stop the others; the exit status is 1 if any step
# failed or did not run. Environment: GPU_CHECK_BUDGET_S (default 470: the whole script, steps
# beyond it are NOT RUN), GPU_CHECK_DIR (where this run's work dir gpu_check.XXXXXX is made,
# default /tmp; logs, metrics and checkpoints),
# GPU_CHECK_LOGS (a .tar.gz to write every log into at the end, e.g. $OUT/gpu_check_logs.tar.gz),
# GPU_CHECK_ALLOW_CPU=1 (rehearse the script on a CPU host: "GPU" runs run on the CPU, the
# benchmarks with small shapes; nothing about GPUs is checked then), GPU_CHECK_STEPS (the steps to
# run, default abcdefgh; d, e and f need c's checkpoint, c needs a's corpus).
set -uo pipefail
cd "$(dirname "$0")/.."
export REPO=$PWD
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
mkdir -p "${GPU_CHECK_DIR:-/tmp}"
export W=$(mktemp -d "${GPU_CHECK_DIR:-/tmp}/gpu_check.XXXXXX")   # a fresh one per run
mkdir -p "$W/tmp"
export TMPDIR=$W/tmp                 # torchrun leaves torchelastic_* folders there
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore CUDA_DEVICE_MAX_CONNECTIONS=1
# Carried wheels (megatron-core for cp312) go to /tmp/site, ahead of the image's packages, unless
# megatron-core is installed already.
export USE_WHEELS=""
if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c \
        "import importlib.util as u, sys; sys.exit(u.find_spec('megatron') is None)" 2>/dev/null; then
    USE_WHEELS=1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export DATA=$W/data
export SMALL="" TIME_SCALE=1
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then   # a CPU rehearsal: small benchmark shapes, and
    SMALL=1 TIME_SCALE=8                       # (bf16 training on a CPU is slow)
fi
# examples/tiny_cpu.yaml for 20 iterations, 8 sequences per step as 2 micro-batches of 4 (so DP=2
# runs the same global batch), saving at 10 and 20.
TINY=(--config examples/tiny_cpu.yaml --train-iters 20 --micro-batch-size 4 --global-batch-size 8
      --log-interval 1 --save-interval 10 --embedded-data-dir "$DATA")
export TINY_FLAGS="${TINY[*]}"
# losses of two runs' metrics.jsonl within a tolerance (iterations in common, or FIRST..LAST)
cat > "$W/compare_losses.py" <<'PY'
import json, math, sys
a_dir, b_dir, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
first = int(sys.argv[4]) if len(sys.argv) > 4 else 1

def losses(d):  # iteration -> loss; a resumed run's later lines win
    with open(f"{d}/metrics.jsonl") as f:
        return {r["iteration"]: r["loss"] for r in map(json.loads, filter(str.strip, f))
                if "loss" in r}

a, b = losses(a_dir), losses(b_dir)
its = sorted(i for i in set(a) & set(b) if i >= first)
if not its or any(not math.isfinite(a[i]) or not math.isfinite(b[i]) for i in its):
    print(f"FAIL: no common finite losses (iterations {sorted(a)[:3]}... vs {sorted(b)[:3]}...)")
    sys.exit(1)
diff = max(abs(a[i] - b[i]) for i in its)
worst = max(its, key=lambda i: abs(a[i] - b[i]))
verdict = "PASS" if diff <= tol else "FAIL"
print(f"{verdict}: iterations {its[0]}-{its[-1]}, max abs loss diff {diff:.3g} (iteration {worst}:"
      f" {a[worst]:.4f} vs {b[worst]:.4f}; tolerance {tol:g})")
sys.exit(verdict != "PASS")
PY

# ------------------------------------------------------------------------------------------ steps
# Each prints its detail as the last line of its log; exit 0 PASS, 77 SKIP, else FAIL.
step_a() {  # install what the image lacks, offline; check imports and the device
    set -e
    if [ -n "$USE_WHEELS" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
    fi
    # megatron_rlp.kernels lives in kernels/ (setup.py package_dir), so a plain PYTHONPATH=. is
    # not enough: an editable install maps it, offline with the image's setuptools.
    if ! python3 -c "import megatron_rlp.kernels" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
    fi
    python3 - <<'PY'
import megatron.core, torch
import megatron_rlp.kernels, megatron_rlp.models.hybrid  # noqa: F401
import os
if torch.cuda.is_available():
    device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
elif os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
    device = "no CUDA device: CPU rehearsal (GPU_CHECK_ALLOW_CPU=1)"
else:
    raise SystemExit("torch sees no CUDA device (GPU_CHECK_ALLOW_CPU=1 rehearses on a CPU)")
print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, {device}")
PY
    python3 -c "from megatron_rlp.data.embedded import ensure_embedded_dataset as e; e('$DATA')" \
        >/dev/null
}

step_b() {  # every test marked gpu
    python3 -m pytest -q -m gpu -p no:cacheprovider tests
    local rc=$?
    [ $rc -eq 5 ] && { echo "no tests marked gpu were collected"; return 1; }
    return $rc
}

start_cpu_reference() {  # the same tiny run on the CPU, in the background, while the GPU works
    ( CUDA_VISIBLE_DEVICES= TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=8 python3 -m megatron_rlp.train \
        $TINY_FLAGS --save "$W/cpu_fp32" > "$W/cpu_fp32.log" 2>&1; echo $? > "$W/cpu_fp32.rc" ) &
    CPU_PID=$!
}

step_c() {  # 20 bf16 iterations on the GPU; losses vs the fp32 CPU run
    python3 -m megatron_rlp.train $TINY_FLAGS --bf16 --save "$W/gpu_bf16" || return 1
    local waited=0
    until [ -f "$W/cpu_fp32.rc" ] || [ $waited -ge $((120 * TIME_SCALE)) ]; do
        sleep 2; waited=$((waited + 2))
    done
    if [ "$(cat "$W/cpu_fp32.rc" 2>/dev/null)" != 0 ]; then
        tail -n 15 "$W/cpu_fp32.log"; echo "the CPU reference run failed or did not finish"
        return 1
    fi
    # bf16 vs fp32 on this run, both on a CPU (2026-12): at most 0.004 apart over the 20
    # iterations; 0.02 leaves room for the GPU kernels' own accumulation order.
    python3 "$W/compare_losses.py" "$W/gpu_bf16" "$W/cpu_fp32" 0.02
}

step_d() {  # TP=2 and DP=2 on nccl, two processes
    local layout flags out rc=0
    for layout in tp2 dp2; do
        flags=""; [ $layout = tp2 ] && flags="--tensor-model-parallel-size 2"
        python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_rlp.train \
            $TINY_FLAGS --bf16 $flags --save "$W/$layout" > "$W/$layout.log" 2>&1
        out=$?
        if [ $out -ne 0 ]; then
            if grep -qE "Duplicate GPU detected|shows 1 CUDA device|LOCAL_RANK=1 but" "$W/$layout.log"; then
                echo "nccl: two ranks on one GPU not allowed — skipped"
                return 77
            fi
            tail -n 20 "$W/$layout.log"; echo "$layout failed"; return 1
        fi
        python3 "$W/compare_losses.py" "$W/$layout" "$W/gpu_bf16" 0.02 || rc=1
    done
    return $rc
}

step_e() {  # a run killed after its iteration-10 save, resumed to 20, vs the uninterrupted run
    python3 - "$W/gpu_bf16" "$W/resume" 10 <<'PY' || return 1
import os, shutil, sys
src, dst, it = sys.argv[1], sys.argv[2], int(sys.argv[3])
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tensorboard"))
for name in os.listdir(dst):
    if name.startswith("iter_") and int(name[5:12]) > it:
        shutil.rmtree(os.path.join(dst, name))
with open(os.path.join(dst, "latest"), "w") as f:
    f.write(f"{it}\n")
PY
    python3 -m megatron_rlp.train $TINY_FLAGS --bf16 --load "$W/resume" --save "$W/resume" \
        2>&1 | tee "$W/resume.log" || return 1
    grep -q "iterations 10->20" "$W/resume.log" || { echo "FAIL: the run did not resume at 10"; return 1; }
    # Same device, same kernels: should be bit-identical; 1e-3 admits non-deterministic kernels.
    python3 "$W/compare_losses.py" "$W/resume" "$W/gpu_bf16" 1e-3 11
}

step_f() {  # one RLP iteration from the bf16 pretrained checkpoint (as examples/demo.sh does)
    python3 -m megatron_rlp.train --config examples/tiny_rlp.yaml --bf16 --train-iters 1 \
        --embedded-data-dir "$DATA" --load "$W/gpu_bf16" --save "$W/rlp" || return 1
    python3 - "$W/rlp" <<'PY'
import json, math, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl") if l.strip()]
r = recs[-1]
ok = r.get("stage") == "rlp" and math.isfinite(r["loss"]) and "reward_mean" in r
print(f"{'PASS' if ok else 'FAIL'}: RLP iteration {r['iteration']}, loss {r['loss']:.4g}, "
      f"reward_mean {r.get('reward_mean')}, grad_norm {r.get('grad_norm')}")
sys.exit(not ok)
PY
}

step_g() {  # NVFP4 quantize bandwidth (Triton compiled) vs copy bandwidth
    python3 benchmarks/nvfp4_quantize.py ${SMALL:+--quick} 2>&1 | tee "$W/nvfp4_quantize.out" \
        || return 1
    # the amax-given 1D quantize of the first shape (Triton on a GPU): GB/s and share of copy
    grep -E "^[0-9]+x[0-9]+ (triton|reference)/1d_amax_given" "$W/nvfp4_quantize.out" | head -n 1 \
        | tr -s ' '
}

step_h() {  # training throughput of a ~350M hybrid at seq 4096, bf16, micro-batch 1
    python3 benchmarks/throughput.py --steps 10 --warmup 3 ${SMALL:+--tiny} 2>&1 \
        | tee "$W/throughput.out" || return 1
    grep "^throughput:" "$W/throughput.out"
}
export -f step_a step_b step_c step_d step_e step_f step_g step_h

# ------------------------------------------------------------------------------------------ runner
FAILED=0
CPU_PID=
STEPS=${GPU_CHECK_STEPS:-abcdefgh}
run_step() {  # id, description, time limit (s)
    local id=$1 desc=$2 limit=$(($3 * TIME_SCALE)) left t0 rc secs status detail
    case $STEPS in *$id*) ;; *) printf '[%s] %-46s not selected\n' "$id" "$desc"; return ;; esac
    left=$((BUDGET_S - ($(date +%s) - START) - 5))
    if [ $left -lt 15 ]; then
        printf '[%s] %-46s NOT RUN (time budget of %ss spent)\n' "$id" "$desc" "$BUDGET_S"
        FAILED=1; return
    fi
    [ $limit -gt $left ] && limit=$left
    t0=$(date +%s)
    timeout -k 10 "$limit" bash -c "step_$id" > "$W/$id.log" 2>&1
    rc=$?
    secs=$(($(date +%s) - t0))
    detail=$(grep -v '^\s*$' "$W/$id.log" | tail -n 1 | cut -c1-200)
    case $rc in
        0) status=PASS ;;
        77) status=SKIP ;;
        124|137) status=FAIL; detail="timed out after ${limit}s" ;;
        *) status=FAIL ;;
    esac
    printf '[%s] %-46s %s (%ss) %s\n' "$id" "$desc" "$status" "$secs" "$detail"
    if [ $status = FAIL ]; then
        FAILED=1
        tail -n 25 "$W/$id.log" | sed 's/^/      | /'
    fi
}

echo "gpu_check: $(date -u +%FT%TZ) in $REPO, budget ${BUDGET_S}s, logs in $W"
run_step a "install (carried wheels, editable repo)" 90
case $STEPS in *c*) start_cpu_reference ;; esac
run_step b "pytest -m gpu" 150
run_step c "tiny 20 iters bf16 GPU vs fp32 CPU" 120
run_step d "nccl TP=2 / DP=2, 2 ranks" 90
run_step e "resume at 10 -> 20 vs uninterrupted" 60
run_step f "one RLP iteration from the checkpoint" 90
run_step g "NVFP4 quantize bandwidth" 90
run_step h "throughput ~350M hybrid, seq 4096, bf16" 150
[ -n "$CPU_PID" ] && { pkill -P "$CPU_PID" 2>/dev/null; kill "$CPU_PID" 2>/dev/null; }
wait
if [ -n "${GPU_CHECK_LOGS:-}" ]; then
    tar -czf "$GPU_CHECK_LOGS" -C "$W" --exclude=data --exclude=tmp --exclude='iter_*' . \
        2>/dev/null && echo "logs: $GPU_CHECK_LOGS"
fi
echo "gpu_check: $([ $FAILED = 0 ] && echo 'all steps passed' || echo 'some steps failed or did not run') in $(($(date +%s) - START))s"
exit $FAILED
