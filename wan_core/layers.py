"""Layers shared by the networks: the one Linear every Wan network computes with.

``CastLinear`` stores its weight in any dtype (fp32, bf16, fp16, fp8) and casts it to the
input's dtype at the point of use, so storage and compute dtypes are independent: this is
how fp8 weights are upcast per call and how bf16 weights run under an fp32 compute dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CastLinear", "COMPUTE_DTYPES"]

# Dtypes a network may compute in; anything else (fp8) is storage only.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CastLinear(nn.Linear):
    """``nn.Linear`` that computes in the input's dtype, casting weight and bias at use."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)
