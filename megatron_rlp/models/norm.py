"""RMSNorm with megatron's norm constructor signature, usable in layer specs on any device.

megatron's `WrappedTorchNorm` refuses sequence parallelism, and `TENorm` needs TransformerEngine.
This one takes `(config, hidden_size, eps)` like both and marks its weight `sequence_parallel` when
SP is on: megatron all-reduces the grads of such params over the TP group. Without the mark, each TP
rank would only see the norm-weight gradient of its own sequence shard (a silent ~1e-4 error).
"""
import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        dtype = getattr(config, "params_dtype", torch.float32)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype: bf16 mean-of-squares loses ~3 digits.
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)
