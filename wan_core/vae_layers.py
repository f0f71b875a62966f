"""The Wan VAEs' causal building blocks: the per-stream :class:`FeatureCache`, the causal
:class:`CausalConv3d` (and the oneDNN-routed :func:`conv3d` every VAE convolution goes
through) and the channel :class:`RMSNorm`. Shared by :mod:`wan_core.vae` (Wan 2.1) and
:mod:`wan_core.vae22`; re-exported by :mod:`wan_core.vae`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CACHE_T = 2           # frames of history a kernel-3 causal conv needs (official name)


# --------------------------------------------------------------------------- feature cache

@dataclass
class _Slot:
    """The state of one causal layer: the last input frames it saw (or, for a temporal
    downsample, the frames its next stride-2 window starts from)."""

    frames: Tensor | None = None


class FeatureCache:
    """Temporal state of one encode or decode stream (the official "feature cache").

    Each causal layer claims one slot per chunk, in the fixed order the network runs; a slot
    holds at most ``CACHE_T`` frames, so memory does not grow with the video length. Create
    a new cache per stream (per video, per spatial tile); never share one between the
    encoder and the decoder. The network calls :meth:`begin_chunk` before every chunk.
    """

    def __init__(self) -> None:
        self._slots: list[_Slot] = []
        self._cursor = 0
        self._owner: object | None = None
        self.chunks = 0  # chunks begun so far

    def begin_chunk(self, owner: object | None = None) -> None:
        """Start the next chunk; ``owner`` is the network running it (the encoder or the
        decoder), checked so that one cache is never fed to two networks."""
        if self.chunks and (owner is not self._owner or self._cursor != len(self._slots)):
            raise RuntimeError(
                "FeatureCache: this cache was filled by another network or an interrupted "
                "chunk; a cache belongs to one network and one stream (create a new one)")
        self._owner = owner
        self._cursor = 0
        self.chunks += 1

    def claim(self) -> _Slot:
        """The next layer's slot in this chunk (created during the first chunk)."""
        if self.chunks == 0:
            raise RuntimeError("FeatureCache.claim() before begin_chunk()")
        if self._cursor == len(self._slots):
            if self.chunks > 1:
                raise RuntimeError(
                    "FeatureCache: more causal layers than in the first chunk; a cache belongs "
                    "to one network and one stream (create a new one)")
            self._slots.append(_Slot())
        slot = self._slots[self._cursor]
        self._cursor += 1
        return slot

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached frames."""
        return sum(s.frames.numel() * s.frames.element_size()
                   for s in self._slots if s.frames is not None)


# --------------------------------------------------------------------------- layers


def conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...] = (1, 1, 1),
           padding: tuple[int, ...] = (0, 0, 0)) -> Tensor:
    """``F.conv3d``, but float32 CPU inputs always take oneDNN.

    For batch 1 PyTorch only picks oneDNN when ``C * T * H > 20480`` and otherwise runs its
    naive ``slow_conv3d``, which is 1.3-10x slower on the VAE's small-frame convolutions
    (measured on 2 cores: 96ch 3x64x64 30 ms vs 11 ms). Same maths; results differ only by
    float summation order (~2e-6 relative).
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        try:
            return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, list(padding), list(stride),
                                                      [1, 1, 1], 1)
        except (RuntimeError, NotImplementedError):  # a build without it: the generic path below
            pass
    return F.conv3d(x, weight, bias, stride=stride, padding=padding)


@dataclass
class History:
    """The input of a causal conv for one chunk: ``buffer`` holds ``front`` zero frames, the
    stream's cached frames, then the chunk's new frames (``new``, a view into ``buffer``
    written by whoever produces them); ``tap`` is the first kernel tap used (taps that would
    only see zero frames are left out)."""

    buffer: Tensor
    new: Tensor
    front: int
    tap: int


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding all goes before frame 0, so output frame t depends only
    on input frames <= t. ``padding=(p_t, p_h, p_w)`` as in the official layer: the time axis
    gets ``2 * p_t`` zero frames in front (or cached frames from the previous chunk)."""

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1,
                 padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        pad_t, pad_h, pad_w = self.padding  # normalised to a tuple by nn.Conv3d
        self.time_pad = 2 * pad_t
        self.padding = (0, pad_h, pad_w)  # spatial zero padding stays inside the conv
        if self.time_pad > CACHE_T:
            raise ValueError(f"causal padding {self.time_pad} exceeds CACHE_T={CACHE_T}")

    def history(self, past: Tensor | None, like: Tensor) -> History:
        """An input buffer for the next frames (shaped like ``like`` ``[B, C, t, H, W]``) of a
        stream whose previous input frames end with ``past`` (None or empty: stream start);
        the caller writes the new frames into :attr:`History.new`.

        Where the history is shorter than ``time_pad`` the missing frames are zeros. For a
        single new frame (every stream's first chunk: the first decoded latent frame, the
        first encoded pixel frame) the kernel's taps over those zeros contribute exactly
        nothing, so they are left out instead of convolving zero frames: a third of the work
        and no zero frames (same numbers, ``tests/unit/test_vae_speed_paths.py``)."""
        known = 0 if past is None else past.shape[2]
        b, c, t, h, w = like.shape
        front, tap = self._layout(known, t)
        buffer = like.new_empty(b, c, front + known + t, h, w)
        if front:
            buffer[:, :, :front].zero_()
        if known:
            buffer[:, :, front:front + known].copy_(past)
        return History(buffer, buffer[:, :, front + known:], front, tap)

    def _layout(self, known: int, t: int) -> tuple[int, int]:
        """(zero frames in front, first kernel tap) for ``t`` new frames after ``known`` cached ones."""
        missing = self.time_pad - known
        return (0, missing) if missing and t == 1 else (missing, 0)

    def run(self, history: History) -> tuple[Tensor, Tensor]:
        """Convolve a filled :class:`History`: the output frames and the new ``past`` (the last
        ``time_pad`` input frames of the stream, a copy: a view would keep the chunk alive)."""
        buffer = history.buffer
        keep = buffer[:, :, max(history.front, buffer.shape[2] - self.time_pad):].clone()
        weight = self.weight[:, :, history.tap:] if history.tap else self.weight
        return conv3d(buffer, weight, self.bias, self.stride, self.padding), keep

    def step(self, x: Tensor, past: Tensor | None) -> tuple[Tensor, Tensor]:
        """Convolve the next frames ``x [B, C, t, H, W]`` of a stream whose previous input frames
        end with ``past`` (None or empty: stream start, zero history). Returns the output
        frames and the new ``past`` (see :meth:`history` and :meth:`run`)."""
        known = 0 if past is None else past.shape[2]
        front, tap = self._layout(known, x.shape[2])
        if known == front == 0:  # the input is x itself: no buffer, no copy
            return self.run(History(x, x, 0, tap))
        history = self.history(past, x)
        history.new.copy_(x)
        return self.run(history)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if self.time_pad == 0:
            return conv3d(x, self.weight, self.bias, self.stride, self.padding)
        if cache is None:
            return self.step(x, None)[0]
        slot = cache.claim()
        y, slot.frames = self.step(x, slot.frames)
        return y


class RMSNorm(nn.Module):
    """``x / ||x||_channels * sqrt(C) * gamma`` (official ``RMS_norm``). ``gamma`` is
    ``(C, 1, 1, 1)`` in residual blocks and ``(C, 1, 1)`` in attention (``images=True``),
    as stored in the checkpoint; both apply to ``[B, C, T, H, W]``."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Normalise ``x``; with ``out`` (CPU without gradients, see :func:`in_place_ok`) the
        result is written there (a view into a conv's :class:`History`) and returned."""
        gamma = self.gamma.view(-1, *([1] * (x.dim() - 2)))
        reuse = in_place_ok(x)
        if x.dtype in (torch.float32, torch.float64):
            # sum of squares over the channel planes: 5-15x faster than vector_norm's strided
            # reduction on [B, C, T, H, W] (CPU, measured: 192ch 6x64x64 52 -> 11 ms) and closer
            # to the float64 norm (max rel. error 1.6e-7 vs 4.3e-7)
            squares = torch.mul(x, x, out=out) if out is not None and reuse else x.square()
            norm = squares.sum(dim=1, keepdim=True).sqrt_()
        else:
            # fp32 reduction without an fp32 copy of the activation (16-bit sums lose precision)
            squares, norm = None, torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        # x / n * s * g in that order (bit-identical); CPU, no grad: in the squares' buffer (one fewer)
        y = torch.div(x, norm.clamp_min(1e-12).to(x.dtype), out=squares if reuse else None).mul_(self.scale)
        y = y.mul_(gamma) if gamma.dtype == y.dtype else y * gamma
        if out is not None and y is not out:
            y = out.copy_(y)
        return y


def in_place_ok(x: Tensor) -> bool:
    """Whether the VAE may write into buffers it is handed or reuse its temporaries for ``x``:
    on the CPU without gradients. Elsewhere every layer allocates its output (the GPU memory
    planner's VAE figures are simulated on that path)."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def norm_silu_conv(norm: RMSNorm, conv: CausalConv3d, x: Tensor, cache: FeatureCache | None) -> Tensor:
    """``conv(silu(norm(x)))`` with the normalised frames written straight into the conv's
    :class:`History` behind the cached frames, so the conv's input is never concatenated
    (a copy of the whole chunk per conv). Same numbers as the layers run one by one; only
    where :func:`in_place_ok`, else the layers run one by one (``Dropout(0)`` between them,
    the identity, is not called)."""
    if not in_place_ok(x):
        return conv(F.silu(norm(x), inplace=True), cache)
    slot = cache.claim() if cache is not None and conv.time_pad else None
    history = conv.history(slot.frames if slot is not None else None, x)
    F.silu(norm(x, out=history.new), inplace=True)
    y, keep = conv.run(history)
    if slot is not None:
        slot.frames = keep
    return y
