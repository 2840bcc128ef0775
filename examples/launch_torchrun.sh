#!/usr/bin/env bash
# Single-node launch: one process per GPU (or per CPU rank with gloo when there is no GPU).
#
#   examples/launch_torchrun.sh 8 --config examples/nemotron_h_12b.yaml --data-path ... --save runs/12b
#   examples/launch_torchrun.sh 2 --config examples/tiny_cpu.yaml --tensor-model-parallel-size 2 --save runs/tp2
#
# World size = NPROC; data parallelism = NPROC / (TP x PP), gradient accumulation =
# global batch / (micro-batch x DP). Passing --load equal to --save resumes from `latest` if there
# is one. Ctrl-C / SIGTERM: every rank agrees, saves a checkpoint and exits.
set -euo pipefail
NPROC=${1:?usage: $0 NPROC [train flags...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    # CPU only: torch.compile costs seconds per process and buys nothing at CPU sizes. GPU runs
    # keep torch.compile (megatron's fused helpers use it).
    export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}
fi
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP comm/compute ordering
# torchrun leaves torchelastic_* folders in the temp directory; keep them out of /tmp's way.
export TMPDIR=${TMPDIR:-$(mktemp -d)}
exec python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m megatron_rlp.train "$@"
