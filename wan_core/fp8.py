"""fp8 weight storage: formats, per-tensor quantisation, exact dequantisation, fp8 matmul gate.

Storage contract (docs/DEVELOPING.md): a :class:`~wan_core.layers.CastLinear` whose ``weight``
is float8_e4m3fn / float8_e5m2 stores the real weight as

- plain fp8 (Kijai / Comfy-Org ``*_fp8_e4m3fn``): ``weight.float()``;
- scaled fp8 (ComfyUI ``*_fp8_scaled``): ``weight.float() * scale_weight``, with
  ``scale_weight`` a float32 0-d parameter on the same layer.

Quantising a bf16/fp16/fp32 weight at load time always produces *scaled* fp8 with a
per-tensor scale ``absmax / fp8_max`` (448 for e4m3fn, 57344 for e5m2), computed in float32
exactly like ComfyUI's scaled files, so the whole fp8 range is used. Plain casting would
flush most of a Wan weight (|w| ~ 1/sqrt(5120) ~ 0.014, below e4m3fn's smallest normal
2^-6) into subnormals: on randn/sqrt(fan_in) weights the relative error of plain e4m3fn
is 4.2 % at fan_in 5120 and 6.6 % at 13824 against 2.6 % scaled (e5m2: 5.3 % either way;
tests/unit/test_fp8_storage.py).

Compute: weights are upcast per call (:func:`dequantize`), which is exact: the result equals
``(weight.float() * scale).to(dtype)``, the value a model stored with the dequantised float32
weights would use. ``torch._scaled_mm`` (true fp8 matmul) is opt-in through
:func:`wan_core.layers.enable_fp8_matmul` and only on CUDA devices with compute capability >= 8.9 (Ada,
Hopper and newer); it changes the numbers (the activations are quantised too), so it is
never the default.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FP8_DTYPES", "WEIGHT_DTYPES", "parse_weight_dtype", "is_fp8", "quantize", "dequantize", "all_finite",
           "fp8_matmul_supported", "scaled_mm_linear", "fp8_stats"]

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
# Names accepted for ``weight_dtype`` by the loaders.
WEIGHT_DTYPES: dict[str, torch.dtype | None] = {
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "keep": None,
}
# Explicit mantissa bits of each format (torch.finfo does not give them).
_MANTISSA_BITS: dict[torch.dtype, int] = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}
# _scaled_mm needs dims that are multiples of 16.
_MM_ALIGN = 16
_WARNED: set[str] = set()


def parse_weight_dtype(value: str | torch.dtype | None) -> str | None:
    """Normalise a loader ``weight_dtype``: None, "keep", "fp8_e4m3fn" or "fp8_e5m2"."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for name, dt in WEIGHT_DTYPES.items():
            if dt == value:
                return name
        raise ValueError(f"weight_dtype {value} is not an fp8 storage dtype; use one of "
                         f"{', '.join(WEIGHT_DTYPES)} (or dtype= for bf16/fp16/fp32 storage)")
    name = str(value).lower().replace("float8_", "fp8_")
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight_dtype {value!r}; valid: None, {', '.join(WEIGHT_DTYPES)}")
    return name


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is an fp8 storage dtype (float8_e4m3fn / float8_e5m2)."""
    return dtype in FP8_DTYPES


def quantize(weight: Tensor, fmt: torch.dtype = torch.float8_e4m3fn, scaled: bool = True,
             stochastic_seed: int | None = None) -> tuple[Tensor, Tensor | None]:
    """One tensor -> (fp8 tensor, float32 0-d scale or None).

    scaled: ``q = clamp(w / s).to(fmt)`` with ``s = absmax(w) / max(fmt)`` (1.0 for an all-zero
    tensor), so ``q.float() * s`` approximates ``w``; unscaled: ``clamp(w).to(fmt)`` (fp8
    casts do not saturate, hence the clamp). Computed in float32 on ``weight``'s device.

    Rounding is to nearest unless ``stochastic_seed`` is given: then each value rounds up or
    down with probability proportional to its distance (unbiased), reproducibly for a seed
    (:func:`_stochastic_round`; the LoRA merge into fp8 weights uses it).
    """
    if not is_fp8(fmt):
        raise ValueError(f"{fmt} is not an fp8 dtype")
    big = torch.finfo(fmt).max
    w = weight.to(torch.float32, copy=True)   # a copy: the in-place ops below must not touch weight
    scale = None
    if scaled:
        amax = w.abs().max()
        scale = (amax / big if amax > 0 else torch.ones((), device=w.device)).to(torch.float32).reshape(())
        w.div_(scale)
    w.clamp_(-big, big)
    if stochastic_seed is not None:
        w = _stochastic_round(w, fmt, stochastic_seed)
    return w.to(fmt), scale


def _stochastic_round(w: Tensor, fmt: torch.dtype, seed: int) -> Tensor:
    """float32 ``w`` (within ``fmt``'s range) -> float32 values that cast to ``fmt`` exactly,
    rounded stochastically: uniform noise below the fp8 mantissa is added to the float32 bits,
    which are then truncated (sign-magnitude bits, so the magnitude rounds, either sign). In
    the fp8 subnormal range the final cast still rounds to nearest."""
    drop = 23 - _MANTISSA_BITS[fmt]           # float32 mantissa bits below the fp8 mantissa
    gen = torch.Generator(device=w.device).manual_seed(seed)
    noise = torch.randint(0, 1 << drop, w.shape, generator=gen, device=w.device, dtype=torch.int32)
    bits = (w.contiguous().view(torch.int32) + noise) & ~((1 << drop) - 1)
    big = torch.finfo(fmt).max
    return bits.view(torch.float32).clamp(-big, big)


def dequantize(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The real weight in ``dtype``: ``(weight.float() * scale).to(dtype)`` (exact upcast, one
    rounding at the end; fp8 -> float32 is exact). Never modifies ``weight``; without a scale
    a float32 ``weight`` asked for in float32 is returned as it is (not copied)."""
    w = weight.to(torch.float32, copy=scale is not None)   # the scale is applied in place below
    if scale is not None:
        w = w.mul_(scale.to(device=w.device, dtype=torch.float32))
    return w if dtype == torch.float32 else w.to(dtype)


# Smallest non-finite bit pattern with the sign bit clear: e4m3fn has no Inf and one NaN
# (S.1111.111); e5m2 is IEEE-like (exponent 11111 is Inf or NaN). Every larger 7-bit pattern
# is non-finite too.
_NON_FINITE_BITS: dict[torch.dtype, int] = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def all_finite(weight: Tensor, scale: Tensor | None = None) -> bool:
    """Whether the real weight ``weight.float() * scale`` holds no NaN/Inf (fp8 ``weight``).

    Reads the bytes, without a temporary (used by the loader's finiteness check; ~40x faster
    than an upcast on CPU): a positive non-finite value is an int8 >= the pattern, a negative
    one a uint8 >= 0x80 | pattern. Then the scale: finite fp8 values times a finite scale
    overflow only when ``max(fmt) * |scale|`` does, and only then is the weight dequantised.
    """
    if weight.numel() == 0:
        return scale is None or bool(torch.isfinite(scale).all())
    pattern = _NON_FINITE_BITS[weight.dtype]
    raw = weight.view(torch.uint8)
    if int(raw.view(torch.int8).amax()) >= pattern or int(raw.amax()) >= 0x80 | pattern:
        return False
    if scale is None:
        return True
    s = scale.detach().to(torch.float32)
    if not bool(torch.isfinite(s).all()):
        return False
    if bool(torch.isfinite(s.abs().max() * torch.finfo(weight.dtype).max)):
        return True
    return bool(torch.isfinite(dequantize(weight, scale, torch.float32)).all())


# --------------------------------------------------------------------------- fp8 matmul


def fp8_matmul_supported(device: torch.device | str) -> tuple[bool, str]:
    """(supported, reason): ``torch._scaled_mm`` needs CUDA with compute capability >= 8.9."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"fp8 matmul needs a CUDA GPU (device is {device.type})"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"this PyTorch ({torch.__version__}) has no torch._scaled_mm"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, (f"{name} has compute capability {major}.{minor}; fp8 matmul needs >= 8.9 "
                       "(RTX 40xx / Ada, H100 / Hopper or newer). fp8 weights still work: they are "
                       "upcast per layer")
    return True, "ok"


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def scaled_mm_linear(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """``x @ W^T + b`` with ``torch._scaled_mm`` (x quantised per tensor to e4m3fn), or None
    when this call cannot use it (wrong device/shape; one warning), so the caller upcasts."""
    ok, reason = fp8_matmul_supported(x.device)
    k, n = x.shape[-1], weight.shape[0]
    if not ok or k % _MM_ALIGN or n % _MM_ALIGN or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        _warn_once(f"mm:{x.device}:{k}:{n}", f"fp8 matmul unavailable for this layer ({reason if not ok else 'shape'}); "
                   "using the exact per-layer upcast")
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    pad = (-m) % _MM_ALIGN
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    big = torch.finfo(torch.float8_e4m3fn).max
    amax = x2.abs().max().float()
    sx = torch.where(amax > 0, amax / big, torch.ones_like(amax)).reshape(())
    xq = (x2.float() / sx).clamp_(-big, big).to(torch.float8_e4m3fn)
    sw = (scale if scale is not None else torch.ones((), device=x.device)).to(device=x.device, dtype=torch.float32)
    out_dtype = x.dtype if x.dtype != torch.float32 else torch.bfloat16
    out = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=sw.reshape(()), out_dtype=out_dtype)
    if isinstance(out, tuple):  # older PyTorch returned (out, amax)
        out = out[0]
    out = out[:m]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*lead, n)


def fp8_stats(model: nn.Module) -> dict[str, int]:
    """Parameter bytes of ``model`` by storage kind: fp8 weights, their scales, everything else."""
    out = {"fp8": 0, "scales": 0, "other": 0}
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if is_fp8(p.dtype):
            out["fp8"] += nbytes
        elif name.endswith("scale_weight"):
            out["scales"] += nbytes
        else:
            out["other"] += nbytes
    return out
