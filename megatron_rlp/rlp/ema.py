"""The EMA teacher p_phi: the no-thought baseline of the information-gain reward.

    phi <- tau * phi + (1 - tau) * theta        after every optimizer step, tau = --rlp-ema-decay

phi is a separate model of the same shape and TP layout, kept in fp32 (a bf16 teacher would lose
updates of relative size 1 - tau = 1e-3 to rounding). It is initialised lazily from theta when
training starts (after --load has put the pretrained weights in place), unless a checkpoint gave
us phi. It rides along in checkpoints under the keys `ext_ema_teacher.*`.
"""
from __future__ import annotations

from typing import Callable

import torch

from megatron_rlp.models.hybrid import unwrap_model

# checkpoint.py detects a component by tensor keys starting with "ext_<component name>".
PREFIX = "ext_ema_teacher."


@torch.no_grad()
def ema_update(teacher_params, student_params, decay: float) -> None:
    """phi <- decay * phi + (1 - decay) * theta, in place, parameter by parameter."""
    for phi, theta in zip(teacher_params, student_params):
        phi.mul_(decay).add_(theta.detach().to(phi.dtype), alpha=1 - decay)


class EMATeacher:
    def __init__(self, build: Callable[[], torch.nn.Module], decay: float):
        self.model = build().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.initialised = False
        self.updates = 0

    def _pairs(self, student: torch.nn.Module):
        ours = dict(self.model.named_parameters())
        theirs = dict(unwrap_model(student).named_parameters())
        if ours.keys() != theirs.keys():
            raise RuntimeError("EMA teacher and student have different parameters")
        return [ours[k] for k in ours], [theirs[k] for k in ours]

    @torch.no_grad()
    def init_from(self, student: torch.nn.Module) -> None:
        for phi, theta in zip(*self._pairs(student)):
            phi.copy_(theta.detach().to(phi.dtype))
        self.initialised = True

    def update(self, student: torch.nn.Module) -> None:
        if not self.initialised:
            self.init_from(student)
        ema_update(*self._pairs(student), self.decay)
        self.updates += 1

    # -------------------------------------------------------- checkpoint component protocol
    def sharded_state_dict(self) -> dict:
        return self.model.sharded_state_dict(prefix=PREFIX)

    def load_sharded_state_dict(self, state: dict) -> None:
        self.model.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, strict=True)
        self.initialised = True
