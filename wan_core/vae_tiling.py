"""Spatially tiled VAE decode and encode, on top of the temporal feature cache.

The Wan VAE already streams in time (one latent frame per chunk, a :class:`FeatureCache`
carrying what the causal layers need), so its memory grows with the frame *area* only.
Tiling bounds that too: the latent frame is cut into overlapping rectangles, each rectangle
is streamed through time with its own cache (one tile alive at a time), and the decoded
tiles are blended with feathered weights: a linear ramp across every overlap with a
neighbour, 1 elsewhere, each tile's weight divided by the summed weights of all tiles at
that pixel. A tile sees less context than the whole frame (zero padding at its cut edges,
and the decoder's mid-block attention spans the tile, not the frame), so tiled output is
close to untiled but not equal; a plan of one tile *is* the untiled path, bit for bit.

Sizes here are in latent pixels (one latent pixel = 8 x 8 video pixels). ``tile="auto"``
picks the largest tile whose estimated activation memory fits a byte budget (untiled when
the whole frame fits). An out-of-memory error during a tile halves the tile and starts the
decode again (the sampled latents are kept), down to ``min_tile``; every retry is logged.

Activation estimates (CPU, fp32, real config dim 96, 2 latent frames = 5 video frames):
``bench/memory_vae.py --fit`` measures the VmRSS -> VmHWM growth of a fresh process over
one untiled decode / encode of 8x8, 16x16 and 24x24 latent pixels and fits a line:
decode 64 / 231 / 822 MiB -> 1.59 MB per latent pixel; encode 51 / 328 / 498 MiB -> 0.88
MB per latent pixel. At 832x480 (60x104 latent) the untiled decode grew by 7650 MiB
(1.29 MB per latent pixel), so the fitted constants below over-estimate a little, the safe
side. They scale with the VAE width (``dim / 96``) and the element size of the VAE dtype.
GPU allocators and conv workspaces differ: check on a GPU before trusting them there.

Measured at 832x480 x 5 frames, dim 96, random weights, fp32 CPU (``bench/memory_vae.py``):
peak RSS untiled 8698 MiB, tiled 40x40 / overlap 8 (2x3 tiles) 3099 MiB (0.36 x); tiled vs
untiled max abs 0.21, mean abs 0.012 on outputs in -1..1.
"""
from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from .offload import meminfo_bytes
from .vae import FeatureCache, WanVAE
from .vae22 import vae_normalize, vae_strides

__all__ = ["DECODE_BYTES_PER_LATENT_PIXEL", "DEFAULT_OVERLAP", "ENCODE_BYTES_PER_LATENT_PIXEL", "MIN_TILE",
           "TilePlan", "auto_tile", "decode_activation_bytes", "decode_tiled", "default_budget",
           "encode_activation_bytes", "encode_tiled", "is_out_of_memory", "plan_tiles"]

LOG = logging.getLogger(__name__)

DEFAULT_OVERLAP = 8      # latent pixels (64 px); about the decoder's convolutional reach at latent scale
MIN_TILE = 16            # latent pixels (128 px); the OOM retry stops halving here
# fp32 bytes of peak activation per latent pixel of a tile (steady-state chunk incl. the
# feature cache), dim-96 Wan VAE on CPU; measured, see the module docstring.
DECODE_BYTES_PER_LATENT_PIXEL = 1_600_000
DECODE_BYTES_FIXED = 64 * 2**20
ENCODE_BYTES_PER_LATENT_PIXEL = 900_000
ENCODE_BYTES_FIXED = 64 * 2**20

Progress = Callable[[int, int], None]
TileArg = tuple[int, int] | int | str | None


# --------------------------------------------------------------------------- plans

def _axis(size: int, tile: int, overlap: int) -> tuple[tuple[int, int], ...]:
    """Evenly spread ``[start, stop)`` ranges of length ``tile`` covering ``0..size`` with at
    least ``overlap`` shared between neighbours (rounding only ever adds overlap)."""
    if tile >= size:
        return ((0, size),)
    n = math.ceil((size - overlap) / (tile - overlap))
    starts = [round(i * (size - tile) / (n - 1)) for i in range(n)]
    return tuple((s, s + tile) for s in starts)


@dataclass(frozen=True)
class TilePlan:
    """Tiles of a ``height x width`` latent frame: ``rows x cols`` ranges in latent pixels."""

    height: int
    width: int
    tile: tuple[int, int]           # effective tile (h, w), at most the frame
    overlap: int                    # effective overlap, latent pixels
    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]

    @property
    def n_tiles(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def single(self) -> bool:
        return self.n_tiles == 1

    def __str__(self) -> str:
        if self.single:
            return f"untiled {self.height}x{self.width} latent"
        return (f"{len(self.rows)}x{len(self.cols)} tiles of {self.tile[0]}x{self.tile[1]} latent "
                f"(overlap {self.overlap}) over {self.height}x{self.width}")


def plan_tiles(height: int, width: int, tile: tuple[int, int] | int | None, overlap: int = DEFAULT_OVERLAP) -> TilePlan:
    """Tile plan for a latent frame. ``tile``: (h, w) or one int for both, None for untiled.
    The overlap is capped at half the tile so a tile always advances by at least half itself."""
    if tile is None:
        tile = (height, width)
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    if th < 1 or tw < 1 or overlap < 0:
        raise ValueError(f"VAE tiling: tile must be >= 1 and overlap >= 0 latent pixels; got tile "
                         f"{tile}, overlap {overlap}")
    th, tw = min(th, height), min(width, tw)
    caps = [overlap] + [t // 2 for t, size in ((th, height), (tw, width)) if t < size]
    eff = min(caps)
    return TilePlan(height, width, (th, tw), eff, _axis(height, th, eff), _axis(width, tw, eff))


def _ramp(ranges: tuple[tuple[int, int], ...], i: int, scale: int) -> Tensor:
    """1-D feather of range ``i`` at ``scale`` output pixels per latent pixel: rises linearly
    over the overlap with the previous range, falls over the overlap with the next, else 1.
    Never 0, so every pixel has weight from some tile."""
    start, stop = ranges[i]
    n = (stop - start) * scale
    w = torch.ones(n, dtype=torch.float64)
    pos = torch.arange(n, dtype=torch.float64) + 0.5
    if i > 0:
        left = (ranges[i - 1][1] - start) * scale
        if left > 0:
            w = torch.minimum(w, pos / left)
    if i + 1 < len(ranges):
        right = (stop - ranges[i + 1][0]) * scale
        if right > 0:
            w = torch.minimum(w, (n - pos) / right)
    return w


def _blend_weights(plan: TilePlan, scale: int) -> list[list[Tensor]]:
    """Per tile ``[h*scale, w*scale]`` float64 weights, already divided by the weight sum."""
    ry = [_ramp(plan.rows, i, scale) for i in range(len(plan.rows))]
    rx = [_ramp(plan.cols, j, scale) for j in range(len(plan.cols))]
    total_y = torch.zeros(plan.height * scale, dtype=torch.float64)
    total_x = torch.zeros(plan.width * scale, dtype=torch.float64)
    for (a, b), r in zip(plan.rows, ry):
        total_y[a * scale:b * scale] += r
    for (a, b), r in zip(plan.cols, rx):
        total_x[a * scale:b * scale] += r
    # the weight of a tile is a product of a row and a column ramp, so the sum factorises
    return [[(r[:, None] / total_y[a * scale:b * scale, None]) * (c[None] / total_x[p * scale:q * scale][None])
             for (p, q), c in zip(plan.cols, rx)] for (a, b), r in zip(plan.rows, ry)]


# --------------------------------------------------------------------------- memory estimates

# The Wan 2.2 VAE (wan_core.vae22, 16x16 pixels per latent pixel) relative to the Wan 2.1 VAE, per
# latent pixel on the simulated GPU (wan_core.planner.VAE22_FIGURES): decode 4,316,928 / 1,169,920 B,
# encode 1,643,904 / 874,112 B, at its published widths (encoder 160, decoder 256).
_VAE22_DECODE_SCALE = 3.69
_VAE22_ENCODE_SCALE = 1.88


def _scale(config, dtype: torch.dtype, decoder: bool = False) -> float:
    bytes_scale = torch.empty((), dtype=dtype).element_size() / 4
    if hasattr(config, "dec_dim"):   # Wan 2.2 VAE: measured at the published widths, scaled by width
        if decoder:
            return _VAE22_DECODE_SCALE * (config.dec_dim / 256) * bytes_scale
        return _VAE22_ENCODE_SCALE * (config.dim / 160) * bytes_scale
    return (config.dim / 96) * bytes_scale


def decode_activation_bytes(config, tile: tuple[int, int], dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak bytes of decoder activations for one latent-frame chunk of a ``tile``
    (latent pixels), feature cache included; weights and the output video not included."""
    return int(DECODE_BYTES_FIXED + DECODE_BYTES_PER_LATENT_PIXEL * _scale(config, dtype, decoder=True)
               * tile[0] * tile[1])


def encode_activation_bytes(config, tile: tuple[int, int], dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak bytes of encoder activations for one 4-frame chunk of a ``tile``
    (latent pixels; the pixel tile is 8x that), feature cache included."""
    return int(ENCODE_BYTES_FIXED + ENCODE_BYTES_PER_LATENT_PIXEL * _scale(config, dtype) * tile[0] * tile[1])


def default_budget(device: torch.device | str) -> int:
    """Bytes the VAE activations may use when no budget is given: 80% of the free memory of
    a CUDA device, or half of the available RAM (``MemAvailable``) for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    available = meminfo_bytes("MemAvailable")
    return available // 2 if available is not None else 8 * 2**30


def auto_tile(height: int, width: int, budget: int, config, dtype: torch.dtype = torch.float32, *,
              encode: bool = False, min_tile: int = MIN_TILE) -> tuple[int, int]:
    """Largest tile (latent pixels, at most the frame) whose estimated activations fit
    ``budget`` bytes: the whole frame when it fits, else as square as the frame allows,
    never below ``min_tile`` (which may then exceed the budget)."""
    estimate = encode_activation_bytes if encode else decode_activation_bytes
    if estimate(config, (height, width), dtype) <= budget:
        return height, width
    per_pixel = estimate(config, (1, 1), dtype) - estimate(config, (0, 0), dtype)
    pixels = max(0, budget - estimate(config, (0, 0), dtype)) // max(1, per_pixel)
    side = math.isqrt(pixels)
    th = max(min(min_tile, height), min(height, side))
    tw = max(min(min_tile, width), min(width, pixels // max(1, th)))
    return th, tw


def _resolve(tile: TileArg, height: int, width: int, vae: WanVAE, budget: int | None, encode: bool,
             min_tile: int) -> tuple[int, int]:
    if tile is None:
        return height, width
    if isinstance(tile, str):
        if tile != "auto":
            raise ValueError(f"VAE tiling: tile must be (h, w) latent pixels, an int, None or 'auto'; got {tile!r}")
        budget = default_budget(vae.device) if budget is None else budget
        return auto_tile(height, width, budget, vae.config, vae.dtype, encode=encode, min_tile=min_tile)
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    return min(int(th), height), min(int(tw), width)


# --------------------------------------------------------------------------- OOM handling

def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA/CPU allocation failure (``torch.OutOfMemoryError`` or a RuntimeError saying so)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _with_retry(run: Callable[[tuple[int, int]], Tensor], tile: tuple[int, int], min_tile: int,
                what: str, device: torch.device) -> Tensor:
    """Call ``run(tile)``; on out-of-memory halve the tile (not below ``min_tile`` per axis)
    and call again, logging each retry; re-raise when the tile cannot shrink further."""
    while True:
        try:
            return run(tile)
        except Exception as err:
            smaller = tuple(max(min(min_tile, t), (t + 1) // 2) for t in tile)
            if not is_out_of_memory(err) or smaller == tile:
                raise
            message = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        # outside the except block, so the failed attempt's frames (and tensors) can be freed
        _release(device)
        LOG.warning("VAE %s ran out of memory with %dx%d latent tiles (%s); retrying with %dx%d tiles",
                    what, tile[0], tile[1], message, smaller[0], smaller[1])
        tile = smaller  # type: ignore[assignment]


# --------------------------------------------------------------------------- decode

@torch.no_grad()
def decode_tiled(vae: WanVAE, latents: Tensor, normalized: bool = True, *, tile: TileArg = "auto",
                 overlap: int = DEFAULT_OVERLAP, budget: int | None = None, min_tile: int = MIN_TILE,
                 latent_frames_per_chunk: int = 1, output_device: torch.device | str | None = None,
                 on_progress: Progress | None = None) -> Tensor:
    """Latents ``[B, 16, T', h, w]`` (normalised when ``normalized``) -> video
    ``[B, 3, 4T'-3, 8h, 8w]`` in -1..1, dtype of the VAE, on ``output_device`` (default the
    VAE's device), decoded tile by tile, each tile streamed in time with its own cache.

    tile: ``(h, w)`` latent pixels, an int for square tiles, None for untiled, or "auto"
    (largest tile whose activations fit ``budget`` bytes; default :func:`default_budget`).
    overlap: latent pixels shared by neighbouring tiles (capped at half a tile).
    on_progress(done, total): after every chunk of every tile, total = tiles x chunks; an
    out-of-memory retry starts the count again with the new total. Raising from it aborts.
    A one-tile plan calls :meth:`WanVAE.decode` (bit-identical to the untiled decode).
    """
    if latents.dim() != 5 or latents.shape[2] == 0:
        raise ValueError(f"decode_tiled: latents must be [B, 16, T', h, w]; got shape {tuple(latents.shape)}")
    _b, _c, t, h, w = latents.shape
    out_device = torch.device(output_device) if output_device is not None else vae.device
    first = _resolve(tile, h, w, vae, budget, encode=False, min_tile=min_tile)
    chunks = math.ceil(t / latent_frames_per_chunk)

    def run(tile_hw: tuple[int, int]) -> Tensor:
        plan = plan_tiles(h, w, tile_hw, overlap)
        LOG.info("VAE decode: %s", plan)
        total = plan.n_tiles * chunks
        if plan.single and latent_frames_per_chunk == 1:
            report = None if on_progress is None else (lambda done, _n: on_progress(done, total))
            return vae.decode(latents, normalized, on_frame=report).to(out_device)
        return _decode_plan(vae, latents, normalized, plan, latent_frames_per_chunk, out_device, on_progress, total)

    return _with_retry(run, first, min_tile, "decode", vae.device)


def _decode_plan(vae: WanVAE, latents: Tensor, normalized: bool, plan: TilePlan, per_chunk: int,
                 out_device: torch.device, on_progress: Progress | None, total: int) -> Tensor:
    b, _c, t, h, w = latents.shape
    ts, s = vae_strides(vae)   # (4, 8) Wan 2.1, (4, 16) Wan 2.2
    weights = _blend_weights(plan, s)
    # float32 accumulator: blending 16-bit tiles in 16 bits would add rounding at every seam
    out = torch.zeros(b, 3, ts * (t - 1) + 1, h * s, w * s, device=out_device, dtype=torch.float32)
    done = 0
    for i, (y0, y1) in enumerate(plan.rows):
        for j, (x0, x1) in enumerate(plan.cols):
            weight = weights[i][j].to(out_device, torch.float32)
            frame = 0
            # iter_decode gives the tile its own FeatureCache: memory is one tile, one chunk
            for pixels in vae.iter_decode(latents[:, :, :, y0:y1, x0:x1], normalized,
                                          latent_frames_per_chunk=per_chunk):
                n = pixels.shape[2]
                out[:, :, frame:frame + n, y0 * s:y1 * s, x0 * s:x1 * s] += pixels.to(out_device, torch.float32) * weight
                frame += n
                del pixels
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
    return out.clamp_(-1.0, 1.0).to(vae.dtype)


# --------------------------------------------------------------------------- encode

@torch.no_grad()
def encode_tiled(vae: WanVAE, video: Tensor, normalize: bool = True, *, tile: TileArg = "auto",
                 overlap: int = DEFAULT_OVERLAP, budget: int | None = None, min_tile: int = MIN_TILE,
                 chunk_frames: int = 4, output_device: torch.device | str | None = None,
                 on_progress: Progress | None = None) -> Tensor:
    """Video ``[B, 3, T, H, W]`` in -1..1 (T = 4n+1; H, W multiples of 8) -> latent means
    ``[B, 16, n+1, H/8, W/8]`` (normalised when ``normalize``), encoded tile by tile in space,
    each tile streamed in time (1, then ``chunk_frames`` frames) with its own cache, tiles
    blended in latent space. ``tile``/``overlap``/``budget`` in latent pixels / bytes as in
    :func:`decode_tiled`. A one-tile plan calls :meth:`WanVAE.encode` (bit-identical)."""
    ts, ss = vae_strides(vae)
    if video.dim() != 5 or (video.shape[2] - 1) % ts or video.shape[3] % ss or video.shape[4] % ss:
        raise ValueError(f"encode_tiled: video must be [B, 3, T, H, W] with T = {ts}n+1 and H, W multiples of "
                         f"{ss}; got shape {tuple(video.shape)}")
    if chunk_frames < 4 or chunk_frames % 4:
        raise ValueError(f"chunk_frames must be a positive multiple of 4; got {chunk_frames}")
    _b, _c, t, hp, wp = video.shape
    h, w = hp // ss, wp // ss
    out_device = torch.device(output_device) if output_device is not None else vae.device
    first = _resolve(tile, h, w, vae, budget, encode=True, min_tile=min_tile)
    bounds = [0, *range(1, t, chunk_frames), t]

    def run(tile_hw: tuple[int, int]) -> Tensor:
        plan = plan_tiles(h, w, tile_hw, overlap)
        LOG.info("VAE encode: %s", plan)
        total = plan.n_tiles * (len(bounds) - 1)
        if plan.single:
            mu = vae.encode(video, normalize=normalize, chunk_frames=chunk_frames).to(out_device)
            if on_progress is not None:
                on_progress(total, total)
            return mu
        return _encode_plan(vae, video, normalize, plan, bounds, out_device, on_progress, total)

    return _with_retry(run, first, min_tile, "encode", vae.device)


def _encode_plan(vae: WanVAE, video: Tensor, normalize: bool, plan: TilePlan, bounds: list[int],
                 out_device: torch.device, on_progress: Progress | None, total: int) -> Tensor:
    b, _c, t, _hp, _wp = video.shape
    ts, s = vae_strides(vae)
    weights = _blend_weights(plan, 1)
    out = torch.zeros(b, vae.config.z_dim, (t - 1) // ts + 1, plan.height, plan.width, device=out_device,
                      dtype=torch.float32)
    done = 0
    for i, (y0, y1) in enumerate(plan.rows):
        for j, (x0, x1) in enumerate(plan.cols):
            weight = weights[i][j].to(out_device, torch.float32)
            cache, frame = FeatureCache(), 0
            for start, stop in pairwise(bounds):
                mu = vae.encode_chunk(video[:, :, start:stop, y0 * s:y1 * s, x0 * s:x1 * s], cache)
                n = mu.shape[2]
                out[:, :, frame:frame + n, y0:y1, x0:x1] += mu.to(out_device, torch.float32) * weight
                frame += n
                del mu
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
    out = out.to(vae.dtype)
    return vae_normalize(vae, out) if normalize else out

