# megatron-rlp on an NVIDIA PyTorch base image (CUDA, cuDNN, NCCL, TransformerEngine, apex and
# Triton come with it). We add the Mamba kernels (mamba-ssm, causal-conv1d), megatron-core and this
# package. Build and run: see docs/HF.md ("Container").
#
#   docker build -t megatron-rlp .
#   docker run --gpus all --rm -it --ipc=host -v $PWD/runs:/workspace/runs megatron-rlp
#
# Pick the base with BASE_IMAGE; 25.01 ships Python 3.12 and torch 2.6 (megatron-core 0.16.1 needs
# Python >= 3.10; the setup.py torch range is <2.15).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    # Compile the CUDA extensions for the common datacenter GPUs (A100, H100/H200, B200).
    TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0+PTX" \
    MAX_JOBS=8

# Mamba kernels: built against the image's torch/CUDA (no build isolation, so they see them).
RUN pip install --no-build-isolation "causal-conv1d>=1.4" "mamba-ssm>=2.2"

WORKDIR /opt/megatron-rlp
# Dependencies first (cached layer), then the source.
COPY setup.py pyproject.toml ./
RUN pip install "megatron-core==0.16.1" numpy einops psutil pyyaml tokenizers tqdm \
        "transformers>=5" safetensors tensorboard pytest wandb pyarrow
COPY . .
# --no-deps: keep the image's torch, TransformerEngine and Triton.
RUN pip install --no-deps -e .

# Fail the build, not the first job, if a GPU extra does not import.
RUN python -c "import megatron_rlp, megatron.core, transformer_engine, mamba_ssm, causal_conv1d; print('ok')"

WORKDIR /workspace
CMD ["bash"]
