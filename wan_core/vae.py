"""Wan 2.1 causal 3D VAE: video ``[B, 3, 4n+1, H, W]`` in -1..1 <-> latents ``[B, 16, n+1, H/8, W/8]``.

Every temporal operation is causal (an output frame sees only input frames at or before it),
so a video can be pushed through in chunks. What a layer needs from earlier chunks lives in a
:class:`FeatureCache` that the caller creates for one stream (one encode, one decode, later one
spatial tile) and passes down with every chunk; the modules themselves hold no state, so one
module can serve several streams at once and a stream can be paused between chunks.

Without a cache a layer treats its input as the whole stream from frame 0. Streaming the same
frames in chunks through a cache gives the same numbers (``tests/unit/test_vae_cache.py``);
the official code's chunking (encode 1, 4, 4, ... frames; decode one latent frame at a time)
is what :meth:`WanVAE.encode` and :meth:`WanVAE.decode` use. The layers themselves
(:class:`FeatureCache`, :class:`CausalConv3d`, :class:`RMSNorm`) live in :mod:`wan_core.vae_layers`.

Parameter names are those of the official ``Wan2.1_VAE.pth`` (``encoder.conv1.weight``,
``encoder.downsamples.0.residual.0.gamma``, ``conv1.weight``, ``decoder.head.2.bias``, ...).

Every chunk an encode or decode produces is checked for NaN/Inf (one sum, ``all_finite``,
per chunk) and refused with a :class:`~wan_core.errors.NonFiniteError` naming the likely cause.

Precision policy: everything runs in the dtype of the parameters (official: fp32; bf16/fp16
work). The only exception is the RMS-norm statistic, reduced in fp32 for 16-bit inputs.
"""
from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import VAE_LATENT_MEAN, VAE_LATENT_STD, VAE_SPACE_STRIDE, VAE_TIME_STRIDE, VAEConfig
from .errors import NonFiniteError, all_finite, describe_nonfinite_weights
from .vae_layers import CACHE_T, CausalConv3d, FeatureCache, RMSNorm, conv3d, norm_silu_conv

if TYPE_CHECKING:
    from .checkpoint import LoadReport

TIME_STRIDE = VAE_TIME_STRIDE       # pixel frames per latent frame after the first
SPATIAL_STRIDE = VAE_SPACE_STRIDE


# --------------------------------------------------------------------------- blocks

class ResidualBlock(nn.Module):
    """``x + residual(x)`` with residual = RMSNorm, SiLU, CConv3, RMSNorm, SiLU, Dropout,
    CConv3 (indices 0..6 as in the checkpoint) and a 1x1x1 ``shortcut`` when C changes."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # in-place SiLU: its input is always the fresh output of the RMSNorm before it
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(inplace=True), nn.Dropout(0.0),  # Wan trains with dropout 0
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        # the residual branch ends in a conv, so its output is fresh and can take the sum
        return _run(self.residual, x, cache).add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately (so it
    needs no temporal state), with 1x1 conv projections ``to_qkv`` and ``proj``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
        # a 1x1 conv is a linear map over channels; q, k, v are its three channel blocks
        q, k, v = F.linear(tokens, self.to_qkv.weight.flatten(1), self.to_qkv.bias).chunk(3, -1)
        y = F.linear(F.scaled_dot_product_attention(q, k, v),
                     self.proj.weight.flatten(1), self.proj.bias)
        return x + y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Resample(nn.Module):
    """Spatial x2 down/up-sampling of every frame, optionally with x2 in time.

    - ``downsample2d/3d``: pad right and bottom by one, Conv2d(k3, s2) (C -> C). 3d then runs
      ``time_conv`` (kernel 3, stride 2, no padding) over the stream: frame 0 passes as is,
      then one frame per window of frames (0,1,2), (2,3,4), ...
    - ``upsample2d/3d``: nearest x2, Conv2d(k3, C -> C/2). 3d first runs ``time_conv``
      (C -> 2C, causal) on frames 1.. (frame 0 is not doubled, official 'Rep') and
      interleaves its two halves: t frames -> 2t.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        self.upsampling = mode.startswith("up")
        conv = (nn.Conv2d(dim, dim // 2, 3, padding=1) if self.upsampling
                else nn.Conv2d(dim, dim, 3, stride=2))
        # index 0 is the parameterless resize (done in _spatial); the conv must be resample.1
        self.resample = nn.Sequential(nn.Identity(), conv)
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        x = self._spatial(x)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x

    def _spatial(self, x: Tensor) -> Tensor:
        # a (1,3,3) conv3d applies the 2D conv frame by frame without a (B*T) reshuffle copy
        conv = self.resample[1]
        if self.upsampling:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")
        else:
            x = F.pad(x, (0, 1, 0, 1))  # right and bottom only, as the checkpoint was trained
        return conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, *conv.stride), padding=(0, *conv.padding))

    def _time_downsample(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        slot = cache.claim() if cache is not None else None
        pending = slot.frames if slot is not None else None
        if pending is None:  # stream start: frame 0 is kept, windows start at frame 0
            parts, history = [x[:, :, :1]], x
        else:
            parts, history = [], torch.cat([pending, x], dim=2)
        windows = (history.shape[2] - 1) // 2
        if windows:
            parts.append(self.time_conv(history[:, :, :2 * windows + 1]))
        if slot is not None:  # the next window starts at the last frame used
            slot.frames = history[:, :, 2 * windows:].clone()
        if not parts:  # an odd chunk left too few frames for a window (encode avoids this)
            return history[:, :, :0]
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _time_upsample(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        slot = cache.claim() if cache is not None else None
        past = slot.frames if slot is not None else None
        if past is None:  # stream start: frame 0 stays single; time_conv's stream begins at 1
            parts, rest = [x[:, :, :1]], x[:, :, 1:]
            b, c, _, h, w = x.shape
            past = x.new_zeros(b, c, 0, h, w)  # "started, zero history"
        else:
            parts, rest = [], x
        if rest.shape[2]:
            y, past = self.time_conv.step(rest, past)
            b, c2, t, h, w = y.shape
            # channels are (2, C): frame 2j from the first half, frame 2j+1 from the second
            parts.append(y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5)
                         .reshape(b, c2 // 2, 2 * t, h, w))
        if slot is not None:
            slot.frames = past
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


# Blocks whose forward takes (x, cache); anything else in a Sequential is a plain x -> x map.
_STREAMING = (CausalConv3d, ResidualBlock, AttentionBlock, Resample)


def _run(layers: Iterable[nn.Module], x: Tensor, cache: FeatureCache | None) -> Tensor:
    layers = list(layers)
    i = 0
    while i < len(layers):
        conv_at = _norm_silu_conv_at(layers, i)
        if conv_at is not None:  # RMSNorm, SiLU[, Dropout(0)], causal conv: one buffer where in_place_ok
            x = norm_silu_conv(layers[i], layers[conv_at], x, cache)
            i = conv_at + 1
            continue
        layer = layers[i]
        x = layer(x, cache) if isinstance(layer, _STREAMING) else layer(x)
        i += 1
    return x


def _norm_silu_conv_at(layers: list[nn.Module], i: int) -> int | None:
    """Index of the causal conv when ``layers[i:]`` starts with RMSNorm, SiLU, an optional
    ``Dropout(0.0)`` (the identity) and a :class:`CausalConv3d`; else None."""
    if not (isinstance(layers[i], RMSNorm) and i + 2 < len(layers) and isinstance(layers[i + 1], nn.SiLU)):
        return None
    j = i + 2
    if isinstance(layers[j], nn.Dropout) and layers[j].p == 0.0 and j + 1 < len(layers):
        j += 1
    return j if isinstance(layers[j], CausalConv3d) else None


def residual_stage(in_dim: int, out_dim: int, count: int, resample: str | None = None,
                   resample_class: type[Resample] = Resample) -> list[nn.Module]:
    """``count`` residual blocks (the first maps ``in_dim`` -> ``out_dim``), then a
    ``resample_class(out_dim, resample)`` unless ``resample`` is None; created in this order."""
    blocks: list[nn.Module] = []
    for _ in range(count):
        blocks.append(ResidualBlock(in_dim, out_dim))
        in_dim = out_dim
    if resample is not None:
        blocks.append(resample_class(out_dim, resample))
    return blocks


def middle_blocks(dim: int) -> nn.Sequential:
    """The ``middle`` of an encoder or decoder: residual, attention, residual."""
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def head_blocks(dim: int, out_dim: int) -> nn.Sequential:
    """The ``head`` of an encoder or decoder: RMSNorm, SiLU, causal 3x3x3 conv."""
    return nn.Sequential(RMSNorm(dim), nn.SiLU(inplace=True), CausalConv3d(dim, out_dim, 3, padding=1))


# --------------------------------------------------------------------------- encoder / decoder

class Encoder3d(nn.Module):
    """Pixels ``[B, 3, t, H, W]`` -> ``[B, 2*z, t', H/8, W/8]`` (mean and log-variance,
    before the top-level ``conv1``). Stage i: ``num_res_blocks`` residual blocks, then a
    downsample (3d where ``temporal_downsample[i]``) except after the last stage."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            down = None if i == len(config.dim_mult) - 1 else (
                "downsample3d" if config.temporal_downsample[i] else "downsample2d")
            blocks += residual_stage(in_dim, out_dim, config.num_res_blocks, down)
        self.downsamples = nn.Sequential(*blocks)
        self.middle = middle_blocks(dims[-1])
        self.head = head_blocks(dims[-1], config.z_dim * 2)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if cache is not None:
            cache.begin_chunk(self)
        return _run(chain([self.conv1], self.downsamples, self.middle, self.head), x, cache)


class Decoder3d(nn.Module):
    """Latents ``[B, z, t, h, w]`` (after ``conv2``) -> pixels ``[B, 3, t_out, 8h, 8w]``,
    unclamped. Stage i: ``num_res_blocks + 1`` residual blocks, then an upsample (3d where
    the reversed ``temporal_downsample[i]``) except after the last stage; each upsample
    halves the channels, so every stage after the first starts from half the width."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
        temporal_upsample = config.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0])
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = None if i == len(config.dim_mult) - 1 else (
                "upsample3d" if temporal_upsample[i] else "upsample2d")
            blocks += residual_stage(in_dim // 2 if i > 0 else in_dim, out_dim, config.num_res_blocks + 1, up)
        self.upsamples = nn.Sequential(*blocks)
        self.head = head_blocks(dims[-1], 3)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if cache is not None:
            cache.begin_chunk(self)
        return _run(chain([self.conv1], self.middle, self.upsamples, self.head), x, cache)


# --------------------------------------------------------------------------- latent scaling

def _latent_stats(z: Tensor, mean: tuple[float, ...] = VAE_LATENT_MEAN, std: tuple[float, ...] = VAE_LATENT_STD,
                  label: str = "latent") -> tuple[Tensor, Tensor]:
    """The published per-channel ``mean``/``std`` as tensors broadcasting over ``z``'s channels."""
    if z.shape[1] != len(mean):
        raise ValueError(f"{label} normalisation is published for {len(mean)} channels; "
                         f"got {z.shape[1]} (use normalize=False for a custom VAE)")
    shape = (1, -1) + (1,) * (z.dim() - 2)
    return (torch.tensor(mean, device=z.device, dtype=z.dtype).view(shape),
            torch.tensor(std, device=z.device, dtype=z.dtype).view(shape))


def normalize_latents(z: Tensor) -> Tensor:
    """Raw VAE latents ``[B, 16, T', h, w]`` -> the normalised space the DiT works in."""
    mean, std = _latent_stats(z)
    return (z - mean) / std


def denormalize_latents(z: Tensor) -> Tensor:
    """Inverse of :func:`normalize_latents`."""
    mean, std = _latent_stats(z)
    return z * std + mean


# --------------------------------------------------------------------------- the VAE

class CausalVAE(nn.Module):
    """What the Wan 2.1 and 2.2 VAEs share: ``encoder``, the 1x1x1 ``conv1`` (to mean and
    log-variance) and ``conv2``, ``decoder`` (in this order, as in the checkpoints), chunked
    encode/decode through a :class:`FeatureCache`, NaN/Inf checks and the input checks.
    Subclasses name their encoder/decoder classes, latent normalisation and the pixel <->
    network-input maps (identity for Wan 2.1, patchify for Wan 2.2). No buffers."""

    # Precision policy as data: parameter-name fragments kept in fp32 whatever the storage
    # dtype. None: the VAE computes in its parameters' dtype (RMSNorm reduces in fp32).
    _keep_in_fp32_modules: tuple[str, ...] = ()
    checkpoint_report: LoadReport | None   # what the loader read (None when built directly)
    encoder_class: type[nn.Module]
    decoder_class: type[nn.Module]
    time_stride: int = TIME_STRIDE
    space_stride: int = SPATIAL_STRIDE
    _label = "VAE"                         # NonFiniteError messages
    _frames_hint = ""                      # ValueError message details
    _size_hint = ""

    def __init__(self, config) -> None:
        super().__init__()
        if len(config.temporal_downsample) != len(config.dim_mult) - 1:
            raise ValueError(f"{type(config).__name__}: temporal_downsample needs {len(config.dim_mult) - 1} "
                             f"entries for dim_mult={config.dim_mult}")
        self.config = config
        self.checkpoint_report = None
        self.encoder = self.encoder_class(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = self.decoder_class(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents -> the DiT's normalised space (published mean/std)."""
        return normalize_latents(z)

    def denormalize(self, z: Tensor) -> Tensor:
        return denormalize_latents(z)

    def _to_network(self, video: Tensor) -> Tensor:
        return video

    def _from_network(self, pixels: Tensor) -> Tensor:
        return pixels

    def _channel_hint(self, channels: int) -> str:
        return ""

    # ---- one chunk of a stream (the building blocks for tiling and streaming)

    def encode_chunk(self, video: Tensor, cache: FeatureCache) -> Tensor:
        """Next pixel frames of a stream ``[B, 3, t, H, W]`` -> raw latent means
        ``[B, z, t', H/s, W/s]``. The first chunk of a stream has 4k+1 frames (k+1 latent
        frames), later chunks 4k frames (k latent frames). Raises
        :class:`~wan_core.errors.NonFiniteError` when the latents hold NaN/Inf."""
        video = video.to(self.device, self.dtype)
        mu, _log_var = self.conv1(self.encoder(self._to_network(video), cache)).chunk(2, dim=1)
        if not all_finite(mu):  # NaN latents would condition the whole run on garbage
            cause = self._nonfinite_cause(video, "video or image given to the encoder")
            raise NonFiniteError(f"{self._label} encode, chunk {cache.chunks}: the latents contain NaN/Inf. "
                                 f"Likely cause: {cause}.")
        return mu

    def decode_chunk(self, latents: Tensor, cache: FeatureCache) -> Tensor:
        """Next raw (denormalised) latent frames of a stream ``[B, z, t, h, w]`` -> pixel
        frames ``[B, 3, t_out, s*h, s*w]``, unclamped; t_out = 4t-3 for the first chunk of a
        stream, 4t after. Raises :class:`~wan_core.errors.NonFiniteError` (with the likely cause)
        when the frames hold NaN/Inf, so a broken VAE never yields a black video."""
        latents = latents.to(self.device, self.dtype)
        pixels = self._from_network(self.decoder(self.conv2(latents), cache))
        # checked before any clamp: clamping keeps NaN, which a video writer turns into black
        if not all_finite(pixels):
            raise NonFiniteError(f"{self._label} decode, chunk {cache.chunks}: the decoded frames contain NaN/Inf. "
                                 f"Likely cause: {self._nonfinite_cause(latents, 'latents given to the decoder')}.")
        return pixels

    def _nonfinite_cause(self, inputs: Tensor, what: str) -> str:
        """Why a chunk came out non-finite; runs only after a failed check (reads every weight)."""
        if not all_finite(inputs):
            return f"the {what} already contain NaN/Inf (check the step that produced them)"
        weights = describe_nonfinite_weights(self, "VAE")
        if weights is not None:
            return weights
        if self.dtype == torch.float16:
            return "fp16 overflows in the Wan VAE: load it in bf16 or fp32"
        return (f"the {what} are far outside the range the VAE was trained on (an extreme cfg or shift, "
                "or a latent from another model)")

    # ---- whole videos

    @torch.no_grad()
    def encode(self, video: Tensor, normalize: bool = True, *, chunk_frames: int = 4) -> Tensor:
        """Video ``[B, 3, T, H, W]`` in -1..1 (T = 4n+1; H, W multiples of the space stride)
        -> latent means ``[B, z, n+1, H/s, W/s]``, normalised with the published mean/std when
        ``normalize``.

        Frame 0 is encoded alone, then ``chunk_frames`` (a multiple of 4; official 4) at a
        time, so memory is bounded by one chunk. Input is moved to the parameters' device
        and dtype chunk by chunk.
        """
        name = type(self).__name__
        b, c, t, h, w = _check_5d(video, "video", name)
        ts, ss = self.time_stride, self.space_stride
        if c != 3 or (t - 1) % ts or h % ss or w % ss:
            raise ValueError(
                f"{name}.encode: video has shape {tuple(video.shape)}; expected [B, 3, T, H, W] "
                f"with T = {ts}n+1{self._frames_hint} and H, W multiples of {ss}{self._size_hint}. "
                "Trim or pad the frames and resize before encoding.")
        if chunk_frames < ts or chunk_frames % ts:
            raise ValueError(f"chunk_frames must be a positive multiple of {ts}; got {chunk_frames}")
        cache = FeatureCache()
        bounds = [0, *range(1, t, chunk_frames), t]  # [0, 1, 1+c, 1+2c, ..., t]
        mu = torch.cat([self.encode_chunk(video[:, :, start:stop], cache)
                        for start, stop in zip(bounds[:-1], bounds[1:])], dim=2)
        return self.normalize(mu) if normalize else mu

    @torch.no_grad()
    def iter_decode(self, latents: Tensor, normalized: bool = True, *,
                    latent_frames_per_chunk: int = 1) -> Iterator[Tensor]:
        """Yield decoded pixel frames ``[B, 3, n, s*h, s*w]`` in -1..1, one chunk per
        ``latent_frames_per_chunk`` latent frames (official: 1; n = 1 for the first latent
        frame, 4 per later one). Only one chunk and the feature cache live at a time; the
        generator can be paused between chunks and several can run side by side."""
        name = type(self).__name__
        _b, c, t, _h, _w = _check_5d(latents, "latents", name)
        if c != self.config.z_dim:
            raise ValueError(f"{name}.decode: latents have {c} channels; this VAE has "
                             f"z_dim={self.config.z_dim}" + self._channel_hint(c))
        if latent_frames_per_chunk < 1:
            raise ValueError(f"latent_frames_per_chunk must be >= 1; got {latent_frames_per_chunk}")
        cache = FeatureCache()
        for start in range(0, t, latent_frames_per_chunk):
            z = latents[:, :, start:start + latent_frames_per_chunk].to(self.device, self.dtype)
            if normalized:
                z = self.denormalize(z)
            yield self.decode_chunk(z, cache).clamp_(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, latents: Tensor, normalized: bool = True,
               on_frame: Callable[[int, int], None] | None = None) -> Tensor:
        """Latents ``[B, z, T', h, w]`` (normalised when ``normalized``) -> video
        ``[B, 3, 4T'-3, s*h, s*w]`` clamped to -1..1, on the parameters' device and dtype.
        Decodes one latent frame at a time and calls ``on_frame(done, total)`` after each
        (done = 1..T'); raising from it aborts the decode."""
        b, _c, t, h, w = _check_5d(latents, "latents", type(self).__name__)
        ts, ss = self.time_stride, self.space_stride
        out = torch.empty(b, 3, ts * (t - 1) + 1, h * ss, w * ss, device=self.device, dtype=self.dtype)
        filled = 0
        for done, frames in enumerate(self.iter_decode(latents, normalized), start=1):
            out[:, :, filled:filled + frames.shape[2]] = frames
            filled += frames.shape[2]
            if on_frame is not None:
                on_frame(done, t)
        return out


class WanVAE(CausalVAE):
    """The Wan 2.1 VAE, built from a :class:`VAEConfig` (constructible on the meta device,
    no buffers). Stride (4, 8, 8): ``4n+1`` pixel frames <-> ``n+1`` latent frames."""

    encoder_class = Encoder3d
    decoder_class = Decoder3d
    _frames_hint = " (1, 5, 9, ...)"


def _check_5d(x: Tensor, name: str, owner: str = "WanVAE") -> tuple[int, int, int, int, int]:
    if x.dim() != 5 or x.shape[2] == 0:
        raise ValueError(f"{owner}: {name} must be [B, C, T, H, W] with T >= 1; "
                         f"got shape {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    return b, c, t, h, w


__all__ = ["WanVAE", "CausalVAE", "FeatureCache", "CausalConv3d", "Resample", "normalize_latents",
           "denormalize_latents", "CACHE_T"]
