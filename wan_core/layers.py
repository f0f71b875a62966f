"""What the Wan networks share: the one Linear they compute with and the precision policy.

``CastLinear`` stores its weight in any dtype (fp32, bf16, fp16, fp8) and casts it to the
input's dtype at the point of use, so storage and compute dtypes are independent: this is
how fp8 weights are upcast per call and how bf16 weights run under an fp32 compute dtype.

fp8 storage (see :mod:`wan_core.fp8`): an fp8 ``weight`` may come with a float32 0-d
``scale_weight`` parameter (ComfyUI scaled fp8); the real weight is
``weight.float() * scale_weight``. The upcast is exact, so an fp8-stored layer computes the
same numbers as a layer holding the dequantised weight. With ``fp8_matmul`` set (only by
:func:`enable_fp8_matmul`, CUDA compute capability >= 8.9) the layer uses
``torch._scaled_mm`` instead. Non-fp8 weights take exactly the path they always took.

:class:`PrecisionPolicy` is each network's precision policy written once as data: which
parameters stay float32 in storage whatever the rest is stored in, and how the compute
dtype follows the storage dtype when none is given. The DiT, umT5 and CLIP each declare one
(``WanDiT.precision`` ...); the checkpoint loader honours it through its ``keep_fp32`` hook
(``load_module(..., keep_fp32=policy.keeps_fp32)``), the planner through the same method.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fp8

__all__ = ["CastLinear", "COMPUTE_DTYPES", "PrecisionPolicy", "enable_fp8_matmul", "weight_storage"]

_X86 = platform.machine().lower() in ("x86_64", "amd64")   # where linear()'s oneDNN route was measured

# Dtypes a network may compute in; anything else (fp8) is storage only.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, but float32 CPU operands that record no gradient take oneDNN's matmul.

    PyTorch sends a CPU float32 ``F.linear`` to MKL's sgemm; oneDNN's matmul on the same
    operands is 5-10 % faster at the DiT's shapes on this machine's AVX-512 cores (1,950 x
    1536 -> 8960: 308 -> 284 ms; 8960 -> 1536: 283 -> 263 ms; 2 threads). Same maths; results
    differ only by float summation order (~5e-6 absolute on unit-scale outputs). Products
    autograd records, GPUs, other dtypes and non-x86 CPUs (not measured) keep ``F.linear``
    (the op has no backward)."""
    if (_X86 and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and not _records_grad(x, weight, bias) and torch.backends.mkldnn.is_available()):
        try:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        except (RuntimeError, NotImplementedError):  # a build without it: the generic path below
            pass
    return F.linear(x, weight, bias)


def _records_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class CastLinear(nn.Linear):
    """``nn.Linear`` that computes in the input's dtype, casting weight and bias at use."""

    fp8_matmul: bool = False   # class default; set per layer by enable_fp8_matmul

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        w = self.weight
        if fp8.is_fp8(w.dtype):
            scale = self._parameters.get("scale_weight")
            if self.fp8_matmul:
                out = fp8.scaled_mm_linear(x, w, scale, self.bias)
                if out is not None:
                    return out
            return linear(x, fp8.dequantize(w, scale, x.dtype), bias)
        return linear(x, w.to(x.dtype), bias)


def weight_storage(model: nn.Module) -> str:
    """How ``model``'s Linear weights are stored: "gguf" (GGML blocks as uint8 bytes), "fp8"
    (fp8, possibly with ``scale_weight``) or "float" (fp32 / bf16 / fp16). Code outside the
    engine that rewrites weights in place (a host's LoRA patcher) is only correct for "float"."""
    kinds = {m.weight.dtype for m in model.modules() if isinstance(m, CastLinear)}
    if torch.uint8 in kinds:
        return "gguf"
    if any(fp8.is_fp8(d) for d in kinds):
        return "fp8"
    return "float"


def enable_fp8_matmul(model: nn.Module, device: torch.device | str, enabled: bool = True) -> int:
    """Let the fp8-stored CastLinears of ``model`` use ``torch._scaled_mm`` on ``device``.

    Raises ``RuntimeError`` with the reason when ``device`` cannot do fp8 matmul (never
    silently on an RTX 30xx; see :func:`wan_core.fp8.fp8_matmul_supported`). Returns the
    number of layers switched. ``enabled=False`` switches back to the exact per-call upcast.
    """
    if enabled:
        ok, reason = fp8.fp8_matmul_supported(device)
        if not ok:
            raise RuntimeError(f"cannot enable fp8 matmul: {reason}.")
    n = 0
    for m in model.modules():
        if isinstance(m, CastLinear) and fp8.is_fp8(m.weight.dtype):
            m.fp8_matmul = enabled
            n += 1
    return n


@dataclass(frozen=True)
class PrecisionPolicy:
    """A network's precision policy.

    keep_fp32: parameter-name fragments; a parameter whose (official) name contains one is
        stored float32 whatever dtype the rest of the model is stored in, and never fp8.
        What the module does with it in forward (compute in float32 or cast to the compute
        dtype) is the module's own, documented in its docstring.
    """

    keep_fp32: tuple[str, ...]

    def keeps_fp32(self, name: str) -> bool:
        """Whether parameter ``name`` is stored in float32 (the loaders' ``keep_fp32`` hook)."""
        return any(fragment in name for fragment in self.keep_fp32)

    def storage_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype parameter ``name`` is stored in when the model is stored in ``dtype``."""
        return torch.float32 if self.keeps_fp32(name) else dtype

    def cast_storage(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Store ``model``'s parameters in ``dtype``, the float32 ones excepted, in place.

        Refuses an fp8-stored model: casting its weights without their ``scale_weight`` would
        change the model (reload it with the wanted ``dtype`` instead).
        """
        if any(fp8.is_fp8(p.dtype) for p in model.parameters()):
            raise ValueError(f"cast_storage: this {type(model).__name__} stores fp8 weights; reload it with its "
                             "loader's dtype=... to change the storage dtype.")
        if any(p.dtype == torch.uint8 for p in model.parameters()):     # wan_core.quant: GGUF blocks
            raise ValueError(f"cast_storage: this {type(model).__name__} stores GGUF-quantized weights, which stay "
                             "quantized; load a bf16/fp16 file of the model to store it in another dtype.")
        for name, p in model.named_parameters():
            p.data = p.data.to(self.storage_dtype(name, dtype))

    @staticmethod
    def compute_dtype(requested: torch.dtype | None, weight: Tensor, *blocks: Tensor) -> torch.dtype:
        """The dtype a network computes in: ``requested`` or, when None, the storage dtype of
        its Linear ``weight``; for storage-only formats, bf16 on CUDA and float32 elsewhere
        (on ``weight``'s device: pass one that stays on the compute device under block swap).

        Storage-only: fp8 ``weight``, or GGML blocks (uint8, :mod:`wan_core.quant`) in
        ``weight`` or in any of ``blocks`` (Linear weights of the network's blocks). A GGUF file
        quantizes the blocks but keeps small layers such as the DiT's text embedding in F16,
        which must not make the whole network compute in fp16 (it overflows in Wan's
        attention / FFN, and CPU fp16 matmul is slow).
        """
        if requested is not None:
            return requested
        if weight.dtype in COMPUTE_DTYPES and all(b.dtype != torch.uint8 for b in blocks):
            return weight.dtype
        return torch.bfloat16 if weight.device.type == "cuda" else torch.float32
