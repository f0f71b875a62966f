"""Wan's 3D rotary position embedding (RoPE) of the DiT's self-attention, and RIFLEx.

Facts (official ``wan/modules/model.py``: ``rope_params`` / ``rope_apply``): head_dim 128 is
split (44, 42, 42) real dims over (time, height, width) (:func:`rope_axis_dims`); each axis has
its own inverse frequencies ``10000^(-2i/d_axis)`` over patch-grid positions from 0; adjacent
feature pairs ``(x0, x1)`` of q and k rotate by the angle: ``(x0 cos - x1 sin, x0 sin + x1 cos)``.
The official tables and rotation are float64 (complex); ours are built in float64 and applied
in ``ROPE_DTYPE`` (float32, settable per model as ``WanDiT.rope_dtype``; see :mod:`wan_core.dit`
for the measured difference). Tables are computed per call from the grid: no buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ROPE_DTYPE: torch.dtype = torch.float32
ROPE_THETA = 10000.0


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims given to (t, h, w) by the official split: (44, 42, 42) for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


RIFLEX_K = 6   # published intrinsic temporal frequency index for Wan 2.1 (1-based; Wan2GP, WanVideoWrapper)
RIFLEX_MARGIN = 0.9   # RIFLEx keeps the extrapolated length below 90 % of one period


@dataclass(frozen=True)
class RopeOptions:
    """How one DiT call places its tokens in RoPE space (explicit per-call data).

    time_offset: latent-frame position of the first frame (0 = the clip starts at 0; a
        context window with global positions passes its start frame).
    riflex_k: RIFLEx (Zhao et al. 2025, arXiv 2502.15894): 1-based index of the temporal
        frequency to lower (0 = off; published for Wan 2.1: :data:`RIFLEX_K` = 6).
    riflex_length: L' in latent frames (the whole video); that frequency becomes
        ``0.9 * 2 pi / L'`` so the positions 0..L'-1 stay within 90 % of one period.
    """

    time_offset: int = 0
    riflex_k: int = 0
    riflex_length: int = 0

    def __post_init__(self) -> None:
        if self.time_offset < 0:
            raise ValueError(f"time_offset must be >= 0 latent frames; got {self.time_offset}")
        if self.riflex_k < 0 or (self.riflex_k and self.riflex_length < 1):
            raise ValueError(f"RIFLEx needs k >= 1 and the video length in latent frames >= 1; got "
                             f"k={self.riflex_k}, length={self.riflex_length} (k=0 turns it off)")


def rope_frequencies(d: int, device: torch.device | None = None, riflex_k: int = 0,
                     riflex_length: int = 0) -> Tensor:
    """Inverse frequencies ``theta^(-2i/d)`` ``[d/2]`` float64 of one axis; with RIFLEx
    (``riflex_k`` >= 1) entry ``k-1`` becomes ``0.9 * 2 pi / riflex_length``."""
    inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    if riflex_k:
        if riflex_k > inv.numel():
            raise ValueError(f"RIFLEx index k={riflex_k} is beyond the {inv.numel()} temporal frequencies")
        inv[riflex_k - 1] = RIFLEX_MARGIN * 2 * math.pi / riflex_length
    return inv


def rope_tables(grid: tuple[int, int, int], head_dim: int, device: torch.device,
                dtype: torch.dtype = ROPE_DTYPE, options: RopeOptions | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[L, 1, head_dim/2]`` for a patch grid ``(F', H', W')``, L = F'H'W'.

    Positions are patch-grid indices from 0 on each axis (time from ``options.time_offset``);
    each axis has its own frequencies ``theta^(-2i/d_axis)`` (time: RIFLEx may lower one, see
    :class:`RopeOptions`). Built in float64 (official), returned in ``dtype``.
    """
    opt = options if options is not None else RopeOptions()
    angles = []
    for axis, (n, d) in enumerate(zip(grid, rope_axis_dims(head_dim))):
        inv = rope_frequencies(d, device, *((opt.riflex_k, opt.riflex_length) if axis == 0 else (0, 0)))
        start = opt.time_offset if axis == 0 else 0
        angles.append(torch.outer(torch.arange(start, start + n, dtype=torch.float64, device=device), inv))
    f, h, w = grid
    a = torch.cat([angles[0][:, None, None].expand(f, h, w, -1),
                   angles[1][None, :, None].expand(f, h, w, -1),
                   angles[2][None, None, :].expand(f, h, w, -1)], dim=-1)
    a = a.reshape(f * h * w, 1, head_dim // 2)
    return a.cos().to(dtype), a.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent feature pairs of ``x`` ``[B, L, H, D]``; a new tensor in ``cos.dtype``:
    pair ``(x0, x1)`` -> ``(x0 cos - x1 sin, x0 sin + x1 cos)``."""
    return apply_rope_(x.to(cos.dtype, copy=True), cos, sin)


def apply_rope_(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`apply_rope` in place on ``x`` (``cos.dtype``, a tensor the caller owns). The same
    products, difference and sum, each rounded once as in the out-of-place form (bit-identical),
    with two half-size temporaries instead of six plus the interleaving copy (~2x faster)."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    x1_sin, x0_sin = x1 * sin, x0 * sin
    x0.mul_(cos).sub_(x1_sin)
    x1.mul_(cos).add_(x0_sin)
    return x


__all__ = ["RopeOptions", "RIFLEX_K", "RIFLEX_MARGIN", "ROPE_DTYPE", "ROPE_THETA", "rope_axis_dims", "rope_frequencies",
           "rope_tables", "apply_rope", "apply_rope_"]
