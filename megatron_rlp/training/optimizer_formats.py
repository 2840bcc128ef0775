"""Resume with `--use-distributed-optimizer` switched on or off (and the DP size changed with it).

megatron-core 0.16.1 saves the optimizer in one of three layouts, depending on which optimizer
the run built (`get_megatron_optimizer`); each is read back only by the same kind:

    kind         optimizer (runs)                        tensors (one per model key K, fp32)
    plain        FP32Optimizer (fp32)                    optimizer.state.{exp_avg,exp_avg_sq}.K
    fp32_master  Float16OptimizerWithFloat16Params       the same + optimizer.state.fp32_param.K
                 (bf16: fp32 master copies)              (the master copy of K)
    distributed  DistributedOptimizer, fully_reshardable the same + optimizer.state.param.K
                 (any precision)                         (its fp32 main param)

    kind         non-tensor part (common.pt)
    plain        {"state": {"common_step": t}, "param_groups": [...]}
    fp32_master  {"optimizer": <as plain>}
    distributed  {"optimizer": {"param_groups": [... "step": n]}, "param_state_sharding_type"}

The moments and their keys agree across kinds (the distributed optimizer's `fully_reshardable`
format gathers its flat shards back into model-shaped tensors, at any DP size), so a switch
needs only: (1) the master copy under the other name, `param` <-> `fp32_param`; in fp32 the
plain optimizer keeps no master copy because the model weights are it, so the distributed
optimizer's `param` is then the loaded weights themselves; and (2) the step count and the
param groups' hyperparameters moved into the other non-tensor layout. `FormatSwitch` does both
around megatron's own load, which still does every tensor read, DP slicing included.

Refused with one line and the way out (`--no-load-optim`, or one change per resume): changing
`--bf16` in a resume unless both runs use the distributed optimizer (whose `param` is the fp32
master in either precision; a plain fp32 checkpoint has no master copy for a bf16 run other than
its weights, which a bf16 model rounds, and a plain fp32 run would round a bf16 checkpoint's
master to the bf16 weights), and distributed checkpoints in a sharding format other than
`fully_reshardable` (megatron-rlp writes no other).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject, ShardedTensor,
                                                      ShardedTensorFactory)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import (Float16OptimizerWithFloat16Params,
                                               param_group_identifier_keys)

from megatron_rlp import device

PLAIN, FP32_MASTER, DISTRIBUTED = "plain", "fp32_master", "distributed"
# Which state key holds the fp32 master copy in each kind (plain: the model weights are it).
MASTER_KEY = {PLAIN: None, FP32_MASTER: "fp32_param", DISTRIBUTED: "param"}
FULLY_RESHARDABLE = "fully_reshardable"
NO_LOAD_OPTIM = ("pass --no-load-optim to start a new optimizer from the saved weights "
                 "(Adam moments restart from zero)")


def current_kind(optimizer) -> str:
    """The layout `optimizer` (megatron's ChainedOptimizer of one) saves and loads."""
    inner = _single(optimizer)
    if isinstance(inner, DistributedOptimizer):
        return DISTRIBUTED
    return FP32_MASTER if isinstance(inner, Float16OptimizerWithFloat16Params) else PLAIN


def saved_kind(common_optimizer: dict) -> str:
    """The layout of a checkpoint's optimizer, from its non-tensor part (`common.pt`)."""
    if "param_state_sharding_type" in common_optimizer:
        return DISTRIBUTED
    return FP32_MASTER if "optimizer" in common_optimizer else PLAIN


def describe(kind: str, bf16: Optional[bool]) -> str:
    """'in bf16 with --use-distributed-optimizer' and the like, for messages."""
    precision = "" if bf16 is None else ("in bf16 " if bf16 else "in fp32 ")
    return f"{precision}{'with' if kind == DISTRIBUTED else 'without'} --use-distributed-optimizer"


def plan_switch(optimizer, common: dict, ckpt_dir: str) -> Optional["FormatSwitch"]:
    """None when `optimizer` reads the checkpoint's layout as it is; else the `FormatSwitch`
    that translates it. Raises a one-line ValueError (the same on every rank: it depends only on
    the checkpoint and the flags) where no exact translation exists."""
    saved_opt = common.get("optimizer")
    if saved_opt is None:  # no optimizer saved (e.g. an HF import): megatron reports it
        return None
    if len(getattr(optimizer, "chained_optimizers", [optimizer])) != 1:
        return None  # several (MoE experts): megatron prefixes their state; not translated
    saved, current = saved_kind(saved_opt), current_kind(optimizer)
    if saved == current:
        return None
    # The run config records --bf16; the plain layouts also tell it themselves.
    saved_bf16 = common.get("training", {}).get("config", {}).get(
        "bf16", {PLAIN: False, FP32_MASTER: True}.get(saved))
    bf16 = _single(optimizer).config.bf16
    where = (f"checkpoint {ckpt_dir} was saved {describe(saved, saved_bf16)}; this run is "
             f"{describe(current, bf16)}")
    if saved == DISTRIBUTED and saved_opt["param_state_sharding_type"] != FULLY_RESHARDABLE:
        raise ValueError(f"{where}: its distributed optimizer state is in the "
                         f"'{saved_opt['param_state_sharding_type']}' format, which only a "
                         f"distributed optimizer reads; resume with --use-distributed-optimizer, "
                         f"or {NO_LOAD_OPTIM}")
    if saved_bf16 is not None and saved_bf16 != bf16:
        # Only the distributed optimizer keeps its fp32 master weights under one name in both
        # precisions; a plain fp32 checkpoint has none apart from the weights themselves.
        raise ValueError(f"{where}: the optimizer state carries over a change of --bf16 only "
                         "with --use-distributed-optimizer on in both runs; change one thing "
                         "per resume (the precision with --use-distributed-optimizer on), or "
                         f"{NO_LOAD_OPTIM}")
    return FormatSwitch(saved, current, _single(optimizer).optimizer)


class FormatSwitch:
    """Load a checkpoint of kind `saved` into an optimizer of kind `current`:
    `adapt_request` before megatron's load, `adapt_loaded` on its result."""

    def __init__(self, saved: str, current: str, torch_optimizer):
        self.saved, self.current = saved, current
        # torch's Adam keeps `step` per param (megatron saves one `common_step`); TE's FusedAdam,
        # megatron's choice when installed, keeps it in each param group.
        self.per_param_step = isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW))
        self.request: dict = {}
        # (path in the request, model weight) of master copies taken from the weights
        self.weights_as_master: List[Tuple[tuple, torch.Tensor]] = []

    # ------------------------------------------------------------------ tensors
    def adapt_request(self, request: dict, model_request: dict, saved_keys) -> None:
        """Rename, in place, the master-copy tensors `request` (this optimizer's
        `sharded_state_dict(is_loading=True)`) asks for to the names the checkpoint holds them
        under. Where the checkpoint has none (a plain fp32 run), the request is dropped and
        `adapt_loaded` uses the model's own fp32 weights, which that run's optimizer stepped.
        Collective: a problem on any rank is raised on every rank."""
        self.request = request
        want, have = MASTER_KEY[self.current], MASTER_KEY[self.saved]
        if want is None:  # plain fp32 needs no master copy: the weights load with the model
            return
        prefixes = _key_prefixes(saved_keys)
        weights = {sh.key: sh.data for sh in nested_values(model_request)
                   if isinstance(sh, (ShardedTensor, ShardedTensorFactory))}
        ours = f"optimizer.state.{want}."
        problem = ""
        for path, container, slot, sharded in list(_sharded_slots(request)):
            if not sharded.key.startswith(ours) or sharded.key in prefixes:
                continue
            model_key = sharded.key[len(ours):]
            theirs = f"optimizer.state.{have}.{model_key}" if have else None
            weight = weights.get(model_key)
            if theirs is not None and theirs in prefixes:
                container[slot] = dataclasses.replace(sharded, key=theirs)
            elif (isinstance(container, dict) and weight is not None
                  and weight.dtype == torch.float32):
                del container[slot]  # not read from the checkpoint: see adapt_loaded
                self.weights_as_master.append((path + (slot,), weight))
            elif not problem:
                problem = (f"it holds no fp32 master copy of {model_key} (neither "
                           f"{sharded.key} nor {theirs})")
        problem = device.first_problem(problem)
        if problem:
            raise ValueError(f"cannot switch the optimizer: {problem}; {NO_LOAD_OPTIM}")

    # ------------------------------------------------------------------ the rest
    def adapt_loaded(self, loaded: dict, saved_common_optimizer: dict) -> dict:
        """The state dict `optimizer.load_state_dict` expects, from megatron's `loaded` result
        (this optimizer's tensors, merged with the checkpoint's non-tensor part, which is in the
        saved layout) and the checkpoint's non-tensor part. Call after the model weights are
        loaded: a dropped master copy is taken from them."""
        for path, weight in self.weights_as_master:
            node = loaded
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = weight.detach()
        step, groups = _saved_step_and_groups(self.saved, saved_common_optimizer)
        if self.current == DISTRIBUTED:
            # DistributedOptimizer.load_state_dict matches groups by identifier and reads the
            # step from them (non-TE) or keeps it there (TE's FusedAdam).
            return {"optimizer": {"param_groups": [dict(_hyperparameters(g), step=step)
                                                   for g in groups]},
                    "param_state": loaded["param_state"],
                    "param_state_sharding_type": self.request["param_state_sharding_type"],
                    **_grad_scaler(saved_common_optimizer)}
        wrapped = self.current == FP32_MASTER
        inner_request = self.request["optimizer"] if wrapped else self.request
        inner_loaded = loaded["optimizer"] if wrapped else loaded
        inner = {"state": {k: v for k, v in inner_loaded["state"].items() if k != "common_step"},
                 "param_groups": self._plain_groups(inner_request["param_groups"], groups, step)}
        if self.per_param_step:
            inner["state"]["common_step"] = torch.tensor(float(step), dtype=torch.float32)
        if not wrapped:
            return inner
        return {"optimizer": inner, "fp32_from_fp16_params": loaded["fp32_from_fp16_params"],
                **_grad_scaler(saved_common_optimizer)}

    def _plain_groups(self, requested: list, saved: list, step) -> list:
        """The checkpoint's groups in this optimizer's order, with its params (megatron's
        `_filter_and_reorder_param_groups` pairs them by position)."""
        by_identity = {_identity(g): g for g in saved}
        out = []
        for group in requested:
            match = by_identity.get(_identity(group))
            if match is None:
                raise ValueError(f"cannot switch the optimizer: the checkpoint has no param group "
                                 f"{dict(zip(param_group_identifier_keys, _identity(group)))}; "
                                 f"{NO_LOAD_OPTIM}")
            params = group["params"]
            params = params.unwrap() if isinstance(params, LocalNonpersistentObject) else params
            new = dict(_hyperparameters(match), params=params)
            if not self.per_param_step:
                new["step"] = step
            out.append(new)
        return out


def _single(optimizer):
    """The one megatron optimizer inside a ChainedOptimizer (ours hold one: no MoE experts)."""
    (inner,) = getattr(optimizer, "chained_optimizers", [optimizer])
    return inner


def _saved_step_and_groups(kind: str, common_optimizer: dict):
    """(step count, param groups without params) from a checkpoint's non-tensor optimizer part."""
    if kind == DISTRIBUTED:
        groups = common_optimizer["optimizer"]["param_groups"]
        steps = {g["step"] for g in groups if "step" in g}
    else:
        inner = common_optimizer["optimizer"] if kind == FP32_MASTER else common_optimizer
        groups = inner["param_groups"]
        common_step = inner["state"].get("common_step")  # absent: never stepped, or TE
        steps = ({float(common_step)} if common_step is not None
                 else {g["step"] for g in groups if "step" in g})
    if len(steps) > 1:
        raise ValueError(f"cannot switch the optimizer: its param groups disagree on the step "
                         f"count ({sorted(steps)}); {NO_LOAD_OPTIM}")
    return (steps.pop() if steps else 0.0), groups


def _hyperparameters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "step")}


def _identity(group: dict) -> tuple:
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys)


def _grad_scaler(common_optimizer: dict) -> dict:
    """Both mixed-precision layouts keep a loss scaler's state (fp16 / --loss-scale) the same
    way; bf16 runs have none."""
    scaler = common_optimizer.get("grad_scaler")
    return {"grad_scaler": scaler} if scaler is not None else {}


def _sharded_slots(tree, path: tuple = ()):
    """(path to container, container, key or index, value) for every ShardedTensor(Factory) in
    a nested dict/list."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for slot, value in list(items):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            yield path, tree, slot, value
        elif isinstance(value, (dict, list)):
            yield from _sharded_slots(value, path + (slot,))


def _key_prefixes(keys) -> Dict[str, None]:
    """Every saved key and each of its dotted prefixes: a factory's request key `K` is saved
    as parts `K.<part>`."""
    prefixes: Dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        for end in range(1, len(parts) + 1):
            prefixes[".".join(parts[:end])] = None
    return prefixes
