"""How a dataclass field becomes a flag, and the one-line error every config check raises.

Field `hidden_size` is flag `--hidden-size` and YAML key `hidden_size`; `arg(default, help)` puts
the flag help (and allowed values) in the field's metadata, where the parser reads it.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any, NoReturn, Optional

# --hybrid-override-pattern symbol -> layer kind (megatron-core's hybrid pattern letters).
LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp"}


def arg(default: Any, help: str, *, choices: Optional[tuple] = None) -> Any:
    """A dataclass field whose metadata carries its CLI help (and allowed values)."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """`hidden_size` -> `--hidden-size`."""
    return "--" + name.replace("_", "-")


def fail(name: str, value: Any, rule: str, fix: str) -> NoReturn:
    """Raise the one-line error of a bad setting: flag, value, the rule it breaks, the fix."""
    raise ValueError(f"{flag(name)}={value!r}: {rule}; {fix}")


def check_hybrid_pattern(num_layers: int, pattern: str) -> None:
    """One symbol per layer, each a known layer kind (shared by the model config and the NVFP4
    plan, which is also called on its own)."""
    if num_layers <= 0:
        fail("num_layers", num_layers, "must be positive", "pass a positive integer")
    bad = sorted({c for c in pattern if c not in LAYER_SYMBOLS})
    if bad:
        fail("hybrid_override_pattern", pattern, f"unknown layer symbol(s) {bad}",
             "use only M (Mamba2), * (attention) and - (MLP)")
    if len(pattern) != num_layers:
        fail("hybrid_override_pattern", pattern,
             f"has {len(pattern)} layers but --num-layers is {num_layers}",
             "make the pattern one character per layer or change --num-layers")
