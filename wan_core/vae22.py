"""Wan 2.2 causal 3D VAE (TI2V-5B): video ``[B, 3, 4n+1, H, W]`` in -1..1 <-> latents
``[B, 48, n+1, H/16, W/16]``.

What differs from the Wan 2.1 VAE (:mod:`wan_core.vae`, whose layers,
:class:`~wan_core.vae.FeatureCache` and chunked encode/decode in :class:`~wan_core.vae.CausalVAE`
this module reuses):

- a 2x2 **patchify** of the pixels into 12 channels before the encoder (and the inverse after
  the decoder), so the network's three spatial x2 resamples give 16x16 in all;
- **residual stages**: each encoder stage is ``x + AvgDown3D(x)``-shaped (the main path's
  residual blocks and resample, plus a parameter-free shortcut that averages channel groups
  of the space/time-folded input); each decoder stage adds a ``DupUp3D`` shortcut that
  repeats channels and unfolds them into space/time. The decoder's upsamples keep the width
  (Wan 2.1 halves it) and the decoder has its own base width (256; encoder 160);
- 48 latent channels with their own published mean/std (:data:`VAE22_LATENT_MEAN`).

Chunking is as for Wan 2.1: encode frame 0 alone then 4 frames at a time, decode one latent
frame at a time. The shortcuts are stateless per chunk: ``AvgDown3D`` pads a chunk's front to
a whole time group (only the 1-frame first chunk needs it) and ``DupUp3D`` drops the frames
before frame 0 at the start of a stream; with the official chunk sizes this gives the same
numbers as one pass over the whole video (``tests/unit/test_vae22_parity.py``).

Parameter names are those of the official ``Wan2.2_VAE.pth`` / ComfyUI
``wan2.2_vae.safetensors`` (``encoder.downsamples.0.downsamples.1.residual.2.weight``,
``decoder.upsamples.0.upsamples.3.time_conv.weight``, ...). No buffers; constructible on
the meta device. Precision policy as :class:`~wan_core.vae.WanVAE`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .vae import (CausalConv3d, CausalVAE, FeatureCache, Resample, _latent_stats, _run, head_blocks, middle_blocks,
                  residual_stage)

PATCH = 2               # pixels per latent-network input position, each way (2x2 patchify)
VAE22_TIME_STRIDE = 4
VAE22_SPACE_STRIDE = 16
VAE22_LATENT_CHANNELS = 48

# Latent normalisation of the Wan 2.2 VAE (per channel), published with the model
# (official wan/modules/vae2_2.py, Wan2_2_VAE: z = (mu - mean) / std).
VAE22_LATENT_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
VAE22_LATENT_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclass(frozen=True)
class VAE22Config:
    """Wan 2.2 VAE (stride 4 in time, 16 in space). Defaults: the published TI2V-5B VAE."""

    dim: int = 160              # encoder base width
    dec_dim: int = 256          # decoder base width
    z_dim: int = VAE22_LATENT_CHANNELS
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def variant(self) -> str:
        return "Wan2.2-VAE" if self == VAE22Config() else (
            f"custom-VAE22(dim={self.dim}, dec_dim={self.dec_dim}, z={self.z_dim})")

    @property
    def time_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def space_stride(self) -> int:
        return PATCH * 2 ** (len(self.dim_mult) - 1)

    @property
    def stride(self) -> tuple[int, int, int]:
        return (self.time_stride, self.space_stride, self.space_stride)


# --------------------------------------------------------------------------- patchify

def patchify(x: Tensor) -> Tensor:
    """``[B, C, T, 2h, 2w]`` -> ``[B, 4C, T, h, w]``; channel ``4c + 2r + q`` holds the pixel at
    row offset q, column offset r (the official ``b c f (h q) (w r) -> b (c r q) f h w``)."""
    b, c, t, hh, ww = x.shape
    x = x.view(b, c, t, hh // PATCH, PATCH, ww // PATCH, PATCH)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, t, hh // PATCH, ww // PATCH)


def unpatchify(x: Tensor) -> Tensor:
    """Inverse of :func:`patchify`."""
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (PATCH * PATCH), PATCH, PATCH, t, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (PATCH * PATCH), t, h * PATCH, w * PATCH)


# --------------------------------------------------------------------------- shortcuts

class AvgDown3D(nn.Module):
    """Parameter-free shortcut ``[B, C, T, H, W]`` -> ``[B, C', T/ft, H/fs, W/fs]``: fold each
    ft x fs x fs neighbourhood into channels (order c, t, y, x) and average consecutive groups
    of ``C * ft * fs * fs / C'`` of them. A chunk whose length is not a multiple of ft gets
    zero frames in front (the first, 1-frame chunk of a stream)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.factor_t, self.factor_s, self.out_channels = factor_t, factor_s, out_channels
        factor = factor_t * factor_s * factor_s
        if in_channels * factor % out_channels:
            raise ValueError(f"AvgDown3D: {in_channels} x {factor} channels do not split into {out_channels} groups")
        self.group = in_channels * factor // out_channels

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        pad = (-x.shape[2]) % ft
        if pad:
            x = torch.cat([x.new_zeros(*x.shape[:2], pad, *x.shape[3:]), x], dim=2)
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut ``[B, C, T, H, W]`` -> ``[B, C', T*ft, H*fs, W*fs]``: repeat each
    channel ``C' * ft * fs * fs / C`` times and unfold the copies into time and space (inverse
    layout of :class:`AvgDown3D`). At a stream's start the ``ft - 1`` frames before frame 0
    are dropped, as the causal main path yields one frame, not ft, for frame 0."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.factor_t, self.factor_s, self.out_channels = factor_t, factor_s, out_channels
        factor = factor_t * factor_s * factor_s
        if out_channels * factor % in_channels:
            raise ValueError(f"DupUp3D: {out_channels} x {factor} channels are not a multiple of {in_channels}")
        self.repeats = out_channels * factor // in_channels

    def forward(self, x: Tensor, stream_start: bool) -> Tensor:
        ft, fs, co = self.factor_t, self.factor_s, self.out_channels
        b, _c, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, co, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, co, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if stream_start and ft > 1 else x


class Resample22(Resample):
    """:class:`~wan_core.vae.Resample` whose spatial upsample keeps the width (C -> C; the Wan
    2.1 one halves it). Downsamples are unchanged."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__(dim, mode)
        if self.upsampling:
            self.resample[1] = nn.Conv2d(dim, dim, 3, padding=1)


class DownResidualBlock(nn.Module):
    """Encoder stage: ``downsamples`` (residual blocks, then a resample unless last) plus the
    :class:`AvgDown3D` shortcut of the stage input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        mode = ("downsample3d" if temporal else "downsample2d") if down else None
        self.downsamples = nn.Sequential(*residual_stage(in_dim, out_dim, num_res_blocks, mode, Resample22))

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        return _run(self.downsamples, x, cache).add_(self.avg_shortcut(x))


class UpResidualBlock(nn.Module):
    """Decoder stage: ``upsamples`` (residual blocks, then a resample unless last) plus, where
    it upsamples, the :class:`DupUp3D` shortcut of the stage input."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        mode = ("upsample3d" if temporal else "upsample2d") if up else None
        self.upsamples = nn.Sequential(*residual_stage(in_dim, out_dim, num_blocks, mode, Resample22))

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        y = _run(self.upsamples, x, cache)
        if self.avg_shortcut is None:
            return y
        return y.add_(self.avg_shortcut(x, stream_start=cache is None or cache.chunks == 1))


class Encoder3d(nn.Module):
    """Patchified pixels ``[B, 12, t, H/2, W/2]`` -> ``[B, 2*z, t', H/16, W/16]`` (mean and
    log-variance, before the top-level ``conv1``)."""

    def __init__(self, config: VAE22Config) -> None:
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        last = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownResidualBlock(cin, cout, config.num_res_blocks,
                              temporal=i < last and config.temporal_downsample[i], down=i < last)
            for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))))
        self.middle = middle_blocks(dims[-1])
        self.head = head_blocks(dims[-1], config.z_dim * 2)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if cache is not None:
            cache.begin_chunk(self)
        x = self.conv1(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache)
        return _run(self.head, _run(self.middle, x, cache), cache)


class Decoder3d(nn.Module):
    """Latents ``[B, z, t, h, w]`` (after ``conv2``) -> patchified pixels
    ``[B, 12, t_out, 8h, 8w]``, unclamped."""

    def __init__(self, config: VAE22Config) -> None:
        super().__init__()
        dims = [config.dec_dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
        temporal_upsample = config.temporal_downsample[::-1]
        last = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0])
        self.upsamples = nn.Sequential(*(
            UpResidualBlock(cin, cout, config.num_res_blocks + 1,
                            temporal=i < last and temporal_upsample[i], up=i < last)
            for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))))
        self.head = head_blocks(dims[-1], 3 * PATCH * PATCH)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if cache is not None:
            cache.begin_chunk(self)
        x = _run(self.middle, self.conv1(x, cache), cache)
        for stage in self.upsamples:
            x = stage(x, cache)
        return _run(self.head, x, cache)


# --------------------------------------------------------------------------- latent scaling

def normalize_latents22(z: Tensor) -> Tensor:
    """Raw Wan 2.2 VAE latents ``[B, 48, T', h, w]`` -> the normalised space the DiT works in."""
    mean, std = _latent_stats(z, VAE22_LATENT_MEAN, VAE22_LATENT_STD, "Wan 2.2 latent")
    return (z - mean) / std


def denormalize_latents22(z: Tensor) -> Tensor:
    """Inverse of :func:`normalize_latents22`."""
    mean, std = _latent_stats(z, VAE22_LATENT_MEAN, VAE22_LATENT_STD, "Wan 2.2 latent")
    return z * std + mean


# --------------------------------------------------------------------------- the VAE

class WanVAE22(CausalVAE):
    """The Wan 2.2 VAE, built from a :class:`VAE22Config`; the methods of
    :class:`~wan_core.vae.CausalVAE` / :class:`~wan_core.vae.WanVAE` (encode/decode whole
    videos, ``encode_chunk`` / ``decode_chunk`` / ``iter_decode`` for streaming and tiling)
    with stride (4, 16, 16), 48 latent channels and a 2x2 patchify around the network.
    ``time_stride`` / ``space_stride`` say which."""

    encoder_class = Encoder3d
    decoder_class = Decoder3d
    _label = "Wan 2.2 VAE"
    _size_hint = " (the Wan 2.2 VAE compresses 16x16)"

    def __init__(self, config: VAE22Config) -> None:
        super().__init__(config)
        self.time_stride = config.time_stride
        self.space_stride = config.space_stride

    def normalize(self, z: Tensor) -> Tensor:
        return normalize_latents22(z)

    def denormalize(self, z: Tensor) -> Tensor:
        return denormalize_latents22(z)

    def _to_network(self, video: Tensor) -> Tensor:
        return patchify(video)

    def _from_network(self, pixels: Tensor) -> Tensor:
        return unpatchify(pixels)

    def _channel_hint(self, channels: int) -> str:
        return (" (16-channel latents come from a Wan 2.1 model: decode them with the Wan 2.1 VAE)"
                if channels == 16 else "")


__all__ = ["WanVAE22", "VAE22Config", "VAE22_LATENT_MEAN", "VAE22_LATENT_STD", "VAE22_LATENT_CHANNELS",
           "VAE22_TIME_STRIDE", "VAE22_SPACE_STRIDE", "AvgDown3D", "DupUp3D", "patchify", "unpatchify",
           "normalize_latents22", "denormalize_latents22"]


# --------------------------------------------------------------------------- either VAE

def vae_strides(vae: nn.Module) -> tuple[int, int]:
    """``(time, space)`` stride of a :class:`~wan_core.vae.WanVAE` (4, 8) or a
    :class:`WanVAE22` (4, 16): what tiling, conditioning and planning divide sizes by."""
    return getattr(vae, "time_stride", VAE22_TIME_STRIDE), getattr(vae, "space_stride", 8)


def vae_normalize(vae: nn.Module, z: Tensor) -> Tensor:
    """Raw latents -> the DiT's normalised space, with ``vae``'s published mean/std."""
    if isinstance(vae, WanVAE22):
        return normalize_latents22(z)
    from .vae import normalize_latents
    return normalize_latents(z)


__all__ += ["vae_strides", "vae_normalize"]
