"""Packaging for megatron-rlp.

torch is asked for as a range so GPU users keep their own CUDA build; CI and the README install the
CPU wheel (torch==2.13.0) first. megatron-core is pinned: 0.16.1 is the newest release that supports
Python 3.11, and our CPU shims (megatron_rlp/compat) are written against its source.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-rlp",
    version="0.1.0",
    description=(
        "Megatron-style pretraining for hybrid Mamba-Transformer LMs with NVFP4 training, "
        "RLP and two-phase data"
    ),
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rlp", "megatron_rlp.*"]) + ["megatron_rlp.kernels"],
    package_dir={"megatron_rlp.kernels": "kernels"},
    package_data={"megatron_rlp.data": ["assets/*"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "megatron-core==0.16.1",
        "numpy",
        "einops",
        "psutil",
        "pyyaml",
        "tokenizers",
        "tqdm",
        "triton",
    ],
    extras_require={
        "dev": ["pytest", "transformers>=5", "safetensors", "matplotlib", "scikit-learn", "tensorboard",
                "wandb>=0.31", "pyarrow>=14"],
        "gpu": ["transformer-engine[pytorch]", "mamba-ssm", "causal-conv1d"],
        # --wandb-project (training/wandb_sink.py; tests read its offline run files with 0.31's
        # `wandb leet inspect`); Parquet input of tools/preprocess_data.py.
        "wandb": ["wandb>=0.31"],
        "parquet": ["pyarrow>=14"],
    },
    entry_points={
        "console_scripts": [
            "megatron-rlp-train=megatron_rlp.train:main",
            "megatron-rlp-generate=megatron_rlp.generate:main",
        ]
    },
)
