"""The optional features of a run, each declared once, in one list: the config section that holds
its flags and the points where it attaches to a run. `train.py` (building a run, `--dry-run`)
reads `EXTENSIONS`; features never import `train`, and nothing registers itself on import.

    feature       section  attaches as
    NVFP4         fp4      convert_model (quant.integration.apply_nvfp4), callbacks, dry-run report
    RLP           rlp      stages: --stage rlp (rlp.stage.build_rlp_stage; its callbacks come
                           with the stage)
    data phases   phases   train_source (a --data-phases schedule), callbacks (phase switches)

Every section's flags exist whether or not its feature is used (config/run.py lists them all), so
`--help` and saved configs do not depend on what was imported. To add a feature: its section in
config/features.py and `config.SECTIONS`, its code in its own package, one `Extension` here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional

from megatron_rlp.data.phases import phase_callbacks, phased_source_builder
from megatron_rlp.quant.integration import apply_nvfp4, dry_run_report, nvfp4_callbacks
from megatron_rlp.rlp.stage import build_rlp_stage


@dataclass(frozen=True)
class Extension:
    name: str
    section: str  # `cfg.<section>` holds its flags (a key of config.SECTIONS)
    # (model_chunks, cfg): change the freshly built model in place, before it is placed on the
    # device and wrapped for data parallelism.
    convert_model: Optional[Callable[[list, Any], Any]] = None
    # (cfg, tokenizer) -> the training data source, or None to leave it to --data-path.
    train_source: Optional[Callable[[Any, Any], Any]] = None
    # --stage name -> (cfg, model_chunks, tokenizer, train_source) -> the stage.
    stages: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    # (cfg, model_chunks, tokenizer, train_source) -> trainer callbacks (maybe none).
    callbacks: Optional[Callable[[Any, list, Any, Any], List[Any]]] = None
    # (cfg) -> text printed after the --dry-run report, or None.
    dry_run_report: Optional[Callable[[Any], Optional[str]]] = None


EXTENSIONS = (
    Extension("NVFP4 training", section="fp4", convert_model=apply_nvfp4,
              callbacks=nvfp4_callbacks, dry_run_report=dry_run_report),
    Extension("RLP", section="rlp", stages={"rlp": build_rlp_stage}),
    Extension("data phases", section="phases", train_source=phased_source_builder,
              callbacks=phase_callbacks),
)


def stage_builder(name: str) -> Callable[..., Any]:
    """The builder of `--stage name` (not `pretrain`, which is the trainer's own)."""
    for extension in EXTENSIONS:
        if name in extension.stages:
            return extension.stages[name]
    raise ValueError(f"--stage={name!r} is not provided by any extension "
                     f"({', '.join(e.name for e in EXTENSIONS)})")
