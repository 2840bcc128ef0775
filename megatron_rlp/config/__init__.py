"""One dataclass tree for a run, spoken in Megatron-LM's flag names.

    fields.py    how a field becomes a flag (`arg`), the one-line error (`fail`)
    sections.py  the core sections: model, parallel, optimizer, training, data, checkpoint
    features.py  the optional features' sections: fp4, rlp, phases, dry_run_plan
    run.py       RunConfig (every section, listed explicitly) and the flag / YAML parser
    launch.py    checks of a launch's environment (W&B)

The lowest layer of the package after `device`: it imports nothing else of megatron_rlp.
"""
from .features import GEMM_CHOICES, DryRunConfig, NVFP4Recipe, PhasesConfig, RLPConfig
from .fields import LAYER_SYMBOLS, arg, check_hybrid_pattern, fail, flag
from .run import (SECTIONS, RunConfig, build_parser, config_from_dict, field_owner, load_yaml,
                  parse_args)
from .sections import (CheckpointConfig, DataConfig, ModelConfig, OptimizerConfig,
                       ParallelConfig, TrainingConfig)

__all__ = [
    "GEMM_CHOICES", "DryRunConfig", "NVFP4Recipe", "PhasesConfig", "RLPConfig",
    "LAYER_SYMBOLS", "arg", "check_hybrid_pattern", "fail", "flag",
    "SECTIONS", "RunConfig", "build_parser", "config_from_dict", "field_owner", "load_yaml",
    "parse_args",
    "CheckpointConfig", "DataConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig",
    "TrainingConfig",
]
