"""Layers shared by the networks: the one Linear every Wan network computes with.

``CastLinear`` stores its weight in any dtype (fp32, bf16, fp16, fp8) and casts it to the
input's dtype at the point of use, so storage and compute dtypes are independent: this is
how fp8 weights are upcast per call and how bf16 weights run under an fp32 compute dtype.

fp8 storage (see :mod:`wan_core.fp8`): an fp8 ``weight`` may come with a float32 0-d
``scale_weight`` parameter (ComfyUI scaled fp8); the real weight is
``weight.float() * scale_weight``. The upcast is exact, so an fp8-stored layer computes the
same numbers as a layer holding the dequantised weight. With ``fp8_matmul`` set (only by
:func:`wan_core.fp8.enable_fp8_matmul`, CUDA compute capability >= 8.9) the layer uses
``torch._scaled_mm`` instead. Non-fp8 weights take exactly the path they always took.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fp8

__all__ = ["CastLinear", "COMPUTE_DTYPES"]

# Dtypes a network may compute in; anything else (fp8) is storage only.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CastLinear(nn.Linear):
    """``nn.Linear`` that computes in the input's dtype, casting weight and bias at use."""

    fp8_matmul: bool = False   # class default; set per layer by fp8.enable_fp8_matmul

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        w = self.weight
        if w.dtype in fp8.FP8_DTYPES:
            scale = self._parameters.get("scale_weight")
            if self.fp8_matmul:
                out = fp8.scaled_mm_linear(x, w, scale, self.bias)
                if out is not None:
                    return out
            return F.linear(x, fp8.dequantize(w, scale, x.dtype), bias)
        return F.linear(x, w.to(x.dtype), bias)
