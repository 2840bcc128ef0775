"""A run's whole config, `RunConfig`, and the parser that builds it from flags and YAML.

Every section is listed in `SECTIONS`, core and feature sections alike, so the flags are the same
whatever has been imported and a saved config (a flat dict of Megatron-named keys) always parses.
Building a config has no side effects: nothing here touches the file system, devices or process
groups.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, get_args, get_origin, get_type_hints

import yaml

from .features import DryRunConfig, NVFP4Recipe, PhasesConfig, RLPConfig
from .fields import fail, flag
from .launch import check_wandb_flags
from .sections import (CheckpointConfig, DataConfig, ModelConfig, OptimizerConfig,
                       ParallelConfig, TrainingConfig)

# Section name -> dataclass; `cfg.<name>` is the section, its fields are flags, and --help lists
# the groups in this order.
SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    # Features (what uses each: megatron_rlp/extensions.py).
    "fp4": NVFP4Recipe,
    "rlp": RLPConfig,
    "phases": PhasesConfig,
    "dry_run_plan": DryRunConfig,
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fp4: NVFP4Recipe = field(default_factory=NVFP4Recipe)
    rlp: RLPConfig = field(default_factory=RLPConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    dry_run_plan: DryRunConfig = field(default_factory=DryRunConfig)

    def __post_init__(self):
        tp = self.parallel.tensor_model_parallel_size
        pp = self.parallel.pipeline_model_parallel_size
        m = self.model
        for name, value in (("num_query_groups", m.num_query_groups),
                            ("mamba_num_heads", m.mamba_num_heads),
                            ("mamba_num_groups", m.mamba_num_groups)):
            if value % tp:
                fail(name, value, f"must be divisible by --tensor-model-parallel-size={tp}",
                     "lower TP or change the model shape")
        if m.num_layers % pp:
            fail("pipeline_model_parallel_size", pp,
                 f"must divide --num-layers={m.num_layers} (stages must cover all layers)",
                 "choose a PP size that divides the layer count")
        if self.training.exit_duration_in_mins is not None and not self.checkpoint.save:
            fail("exit_duration_in_mins", self.training.exit_duration_in_mins,
                 "exits to be resumed, but --save is not set, so nothing would be saved",
                 "add --save DIR")
        vpp = self.parallel.num_layers_per_virtual_pipeline_stage
        if vpp is not None and (m.num_layers // pp) % vpp:
            fail("num_layers_per_virtual_pipeline_stage", vpp,
                 f"must divide the {m.num_layers // pp} layers of each pipeline stage",
                 "choose a divisor of num_layers / PP")

    def sections(self) -> dict:
        return {name: getattr(self, name) for name in SECTIONS}

    def to_flat_dict(self) -> dict:
        flat = {}
        for section in self.sections().values():
            flat.update(dataclasses.asdict(section))
        return flat


def field_owner() -> dict:
    """Flat key (`hidden_size`) -> the section that owns it (`model`)."""
    owners = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in owners:
                raise RuntimeError(f"config field {f.name} defined in two sections")
            owners[f.name] = section
    return owners


def _base_type(hint):
    if get_origin(hint) is not None and type(None) in get_args(hint):  # Optional[X]
        return next(a for a in get_args(hint) if a is not type(None))
    return hint


def build_parser(prog: str = "megatron-rlp-train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Pretrain / RLP-train a hybrid Mamba-Transformer LM.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with the same keys (underscored); flags win.")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _base_type(hints[f.name])
            help_text = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if kind is bool and f.name.startswith("no_"):
                # Megatron-LM's negative switches (--no-load-optim): argparse's
                # BooleanOptionalAction reads any "--no-" option as "set False".
                group.add_argument(flag(f.name), action="store_true", help=help_text)
            elif kind is bool:
                group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction,
                                   help=help_text)
            elif kind is list or get_origin(kind) is list:
                group.add_argument(flag(f.name), nargs="+", help=help_text)
            else:
                group.add_argument(flag(f.name), type=kind, choices=choices, help=help_text)
    return parser


def config_from_dict(values: dict) -> RunConfig:
    """Build a RunConfig from flat Megatron-named keys (YAML or parsed flags)."""
    owners = field_owner()
    per_section: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in owners:
            raise ValueError(f"unknown config key {key!r}; see --help for the valid names")
        per_section[owners[key]][key] = value
    return RunConfig(**{name: cls(**per_section[name]) for name, cls in SECTIONS.items()})


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"--config {path!r}: file not found") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r}: expected a mapping of flag names to values")
    return values


def parse_args(argv: Optional[list] = None, prog: str = "megatron-rlp-train") -> RunConfig:
    """Flags override the YAML file, which overrides the defaults. Also checks what a launch
    needs from its environment (launch.py)."""
    parser = build_parser(prog)
    namespace = vars(parser.parse_args(argv))
    values = load_yaml(namespace.pop("config")) if "config" in namespace else {}
    values.update(namespace)
    cfg = config_from_dict(values)
    check_wandb_flags(cfg.training, cfg.checkpoint.save)
    return cfg
