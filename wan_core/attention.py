"""Scaled dot-product attention with interchangeable kernels.

One entry point, :func:`attention`, over ``[B, L, H, D]`` tensors (the layout the DiT
produces after splitting heads, and the one flash-attn and sageattention take natively).

Backends
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``. Always available, CPU
  included; the fallback, and the reference every other backend is compared with.
- ``"sage"``: ``sageattention.sageattn`` (int8 QK, CUDA only, optional package).
- ``"flash"``: ``flash_attn.flash_attn_func`` (CUDA only, optional package).
- ``"auto"`` (default of :func:`attention`; the loaders default to ``"sdpa"``): the first of :func:`available_backends` for the tensors' device
  (sage, then flash, then sdpa); on CPU that is always SDPA.

A backend that is not installed, cannot run on the device, or raises falls back to SDPA
with one warning per (backend, reason) for the whole process, so a long sampling run does
not print the same line once per block and step. Optional packages are imported only when
their backend is first used.
"""
from __future__ import annotations

import importlib.util
import warnings
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

# The one list of choices (loaders, CLI, nodes). The loaders' default comes first: the
# loader node offers this list in this order, and saved workflows keep the order.
BACKENDS: tuple[str, ...] = ("sdpa", "auto", "sage", "flash")
# Preference order for "auto": fastest first.
_AUTO_ORDER: tuple[str, ...] = ("sage", "flash", "sdpa")
# Package each optional backend needs (import name).
_PACKAGE: dict[str, str] = {"sage": "sageattention", "flash": "flash_attn"}
_HALF = (torch.float16, torch.bfloat16)

# Process-wide on purpose: the user should read each fallback once per session, not once
# per attention call (40 blocks x 3 calls x steps).
_WARNED: set[tuple[str, str]] = set()


@cache
def _installed(package: str) -> bool:
    """Whether ``package`` can be found, without importing it (imports can take seconds)."""
    return importlib.util.find_spec(package) is not None


def _unusable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None when it can be tried."""
    if backend == "sdpa":
        return None
    if device.type != "cuda":
        return f"needs a CUDA device (tensors are on {device.type})"
    if not _installed(_PACKAGE[backend]):
        return f"the '{_PACKAGE[backend]}' package is not installed"
    return None


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can be tried on ``device``, best first; always ends with ``"sdpa"``."""
    device = torch.device(device)
    return [b for b in _AUTO_ORDER if _unusable_reason(b, device) is None]


def _warn_once(backend: str, reason: str, detail: str = "") -> None:
    if (backend, reason) in _WARNED:
        return
    _WARNED.add((backend, reason))
    warnings.warn(f"attention backend '{backend}' unavailable ({reason}{detail}); "
                  "falling back to PyTorch SDPA", RuntimeWarning, stacklevel=3)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # SDPA wants heads before length; the transposes are views, SDPA handles the strides.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _as_half(x: Tensor) -> Tensor:
    # The CUDA kernels only take fp16/bf16; like the official flash path, fp32 runs in bf16.
    return x if x.dtype in _HALF else x.to(torch.bfloat16)


def _sage(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from sageattention import sageattn

    out = sageattn(_as_half(q), _as_half(k), _as_half(v), tensor_layout="NHD", is_causal=False)
    return out.to(q.dtype)


def _flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn import flash_attn_func

    out = flash_attn_func(_as_half(q), _as_half(k), _as_half(v), dropout_p=0.0, causal=False)
    return out.to(q.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """Softmax(Q K^T / sqrt(D)) V per head, without masking.

    Args:
        q: ``[B, Lq, H, D]``.
        k, v: ``[B, Lk, H, D]`` (same dtype and device as ``q``).
        backend: one of ``BACKENDS``; see the module docstring.

    Returns:
        ``[B, Lq, H, D]`` in ``q.dtype`` (may be a non-contiguous view; use ``reshape``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid names: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = available_backends(q.device)[0]
    if backend == "sdpa":
        return _sdpa(q, k, v)

    reason = _unusable_reason(backend, q.device)
    if reason is not None:
        _warn_once(backend, reason)
        return _sdpa(q, k, v)
    kernel = _sage if backend == "sage" else _flash  # looked up per call so tests can patch
    try:
        return kernel(q, k, v)
    except Exception as exc:  # noqa: BLE001 - any kernel failure must degrade, not crash
        _warn_once(backend, f"failed with {type(exc).__name__}", f": {exc}")
        return _sdpa(q, k, v)


__all__ = ["attention", "available_backends", "BACKENDS"]
