"""Inputs of a sampling run, built exactly as the official Wan 2.1 pipelines build them.

Sizes are checked here once, before any model runs; noise is drawn here; the image
conditioning of I2V / FLF2V (mask, guide video, CLIP tokens) is assembled here. Everything
is a plain function of tensors and models, so the nodes, the CLI and the tests share it.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .configs import LATENT_CHANNELS, VAE_SPACE_STRIDE, VAE_TIME_STRIDE
from .errors import NonFiniteError, all_finite, describe_nonfinite_weights
from .limits import check_size_limits

__all__ = [
    "NEGATIVE_PROMPT", "NEGATIVE_PROMPT_I2V", "NEGATIVE_PROMPT_FLF2V", "TextEmbeds", "ImageEmbeds",
    "check_video_size", "latent_shape", "make_noise", "i2v_size", "image_to_tensor",
    "i2v_mask", "guide_video", "encode_image_conditioning", "ConditioningError", "check_conditioning",
]

TIME_STRIDE, SPACE_STRIDE = VAE_TIME_STRIDE, VAE_SPACE_STRIDE   # configs.VAE_STRIDE (4, 8, 8)
SIZE_MULTIPLE = 16                                               # VAE stride 8 x DiT patch (1, 2, 2)

# Official default negative prompt (used when the negative prompt is empty).
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
NEGATIVE_PROMPT_I2V = "镜头晃动，" + NEGATIVE_PROMPT
NEGATIVE_PROMPT_FLF2V = "镜头切换，" + NEGATIVE_PROMPT_I2V


@dataclass(frozen=True)
class TextEmbeds:
    """umT5 output for one run: ``[L, text_dim]`` each, trimmed to the real tokens."""

    positive: Tensor
    negative: Tensor


@dataclass(frozen=True)
class ImageEmbeds:
    """I2V / FLF2V conditioning, shared by the conditional and unconditional passes.

    y: ``[20, T', H/8, W/8]`` = 4 mask channels (1 = known frame) + 16 normalised VAE
        latents of the guide video; clip_fea: ``[N, clip_width]`` CLIP penultimate tokens
        (257 for one image, 514 for first + last frame); None for Wan 2.2 I2V-A14B, which
        takes no CLIP tokens (:func:`wan_core.conditioning22.encode_image_latents`).
    """

    y: Tensor
    clip_fea: Tensor | None
    width: int
    height: int
    frames: int


def _nearest(value: int, multiple: int, offset: int = 0) -> tuple[int, int]:
    below = max(multiple + offset, (value - offset) // multiple * multiple + offset)
    return below, below + multiple


def check_video_size(width: int, height: int, frames: int) -> None:
    """Refuse sizes Wan cannot sample, naming the nearest valid values or the limit.

    Width and height must be multiples of 16 (VAE /8, then 2x2 patches) from 16 to
    ``MAX_SIZE`` (4096); frames must be 4n+1 (1, 5, ..., 81), the VAE's temporal stride, at
    most ``MAX_FRAMES`` (1025); see :mod:`wan_core.limits`. Nothing is rounded silently: a
    saved workflow must mean the same video everywhere. Checks numbers only: no allocation.
    """
    problems = []
    for name, v in (("width", width), ("height", height)):
        if not _whole(v):
            problems.append(f"{name} must be a whole number of pixels; got {v!r}")
        elif v < SIZE_MULTIPLE or v % SIZE_MULTIPLE:
            a, b = _nearest(v, SIZE_MULTIPLE)
            problems.append(f"{name} {v} is not a multiple of 16 (at least 16); use {a} or {b}")
    if not _whole(frames):
        problems.append(f"frames must be a whole number; got {frames!r}")
    elif frames < 1 or (frames - 1) % TIME_STRIDE:
        a, b = _nearest(frames, TIME_STRIDE, 1) if frames > 5 else (1, 5)
        problems.append(f"frames {frames} is not 4n+1 (1, 5, 9, ..., 81); use {a} or {b}")
    problems += check_size_limits(*(v if _whole(v) else 0 for v in (width, height, frames)))
    if problems:
        raise ValueError("; ".join(problems) + ".")


def _whole(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def latent_shape(width: int, height: int, frames: int) -> tuple[int, int, int, int]:
    """``(16, (frames-1)//4+1, height/8, width/8)`` after :func:`check_video_size`."""
    check_video_size(width, height, frames)
    return LATENT_CHANNELS, (frames - 1) // TIME_STRIDE + 1, height // SPACE_STRIDE, width // SPACE_STRIDE


def make_noise(seed: int, shape: tuple[int, ...]) -> Tensor:
    """The official ``torch.randn(shape, float32, generator.manual_seed(seed))`` drawn on a CPU
    generator, so a seed gives the same video on every device (the official code draws on
    CUDA, whose stream differs from the CPU one)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randn(shape, dtype=torch.float32, generator=g)


def i2v_size(image_height: int, image_width: int, max_area: int) -> tuple[int, int]:
    """Official I2V pixel size ``(width, height)`` from a pixel budget and the image aspect.

    ``lat = floor(floor(sqrt(area * aspect) / 8) / 2) * 2`` per axis (numpy float64, as in
    image2video.py), pixels = lat * 8; e.g. a 1280x720 image with max_area 832*480 -> 832x464,
    and, through float rounding (sqrt gives 479.99999999999994), so does an 832x480 image.
    Give width/height explicitly to override.
    """
    aspect = image_height / image_width
    lat_h = round(math.sqrt(max_area * aspect) // SPACE_STRIDE // 2 * 2)
    lat_w = round(math.sqrt(max_area / aspect) // SPACE_STRIDE // 2 * 2)
    if lat_h < 2 or lat_w < 2:
        raise ValueError(f"max_area {max_area} is too small for a {image_width}x{image_height} image.")
    return lat_w * SPACE_STRIDE, lat_h * SPACE_STRIDE


def image_to_tensor(image: Tensor) -> Tensor:
    """One image ``[H, W, C]`` (ComfyUI IMAGE layout, 0..1 float or uint8) -> ``[3, H, W]`` in -1..1.

    Grayscale (C = 1 or a 2-D tensor) is repeated to RGB. An alpha channel (C = 4) is
    dropped with a warning: Wan conditions on RGB only, so flatten transparent images onto
    the background you want first. Any other shape raises ``ValueError``.
    """
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be [H, W, C] with C = 1 (grayscale), 3 (RGB) or 4 (RGBA); "
                         f"got shape {tuple(image.shape)}.")
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if x.shape[-1] == 4:
        warnings.warn("the image has an alpha channel; it is ignored (Wan uses RGB). Flatten the "
                      "image onto a background first if its transparency matters.", stacklevel=2)
        x = x[..., :3]
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:2], 3)
    return x.permute(2, 0, 1).mul(2.0).sub(1.0).contiguous()


def i2v_mask(frames: int, lat_h: int, lat_w: int, last_frame: bool = False) -> Tensor:
    """Mask ``[4, T', lat_h, lat_w]``: 1 where a frame is given (first, and last for FLF2V).

    Official construction: per-pixel-frame mask, the first frame repeated 4 times, time
    regrouped into (T', 4) and the 4 moved to channels.
    """
    m = torch.zeros(1, frames, lat_h, lat_w)
    m[:, 0] = 1
    if last_frame:
        m[:, -1] = 1
    m = torch.cat([m[:, :1].repeat_interleave(TIME_STRIDE, dim=1), m[:, 1:]], dim=1)
    return m.view(1, m.shape[1] // TIME_STRIDE, TIME_STRIDE, lat_h, lat_w).transpose(1, 2)[0].contiguous()


def guide_video(first: Tensor, frames: int, height: int, width: int, last: Tensor | None = None) -> Tensor:
    """``[3, frames, height, width]``: the image(s) resized bicubic (no crop, no clamp), zeros
    (mid-grey) elsewhere, as the official I2V / FLF2V code feeds its VAE."""
    def fit(img: Tensor) -> Tensor:
        return F.interpolate(img[None].float(), size=(height, width), mode="bicubic")[0]

    out = torch.zeros(3, frames, height, width)
    out[:, 0] = fit(first)
    if last is not None:
        out[:, -1] = fit(last)
    return out


def _match_last_frame(first: Tensor, last: Tensor) -> Tensor:
    """Official FLF2V: a last frame of another size is scaled to cover the first frame's size
    (bilinear, antialiased) and centre-cropped to it."""
    (_, h1, w1), (_, h2, w2) = first.shape, last.shape
    if (h1, w1) == (h2, w2):
        return last
    r = max(w1 / w2, h1 / h2)
    nh, nw = round(h2 * r), round(w2 * r)
    scaled = F.interpolate(last[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - h1) // 2, (nw - w1) // 2
    return scaled[:, top:top + h1, left:left + w1]


@torch.no_grad()
def encode_image_conditioning(vae, clip_vision, image: Tensor, frames: int, width: int, height: int,
                              end_image: Tensor | None = None, *, vae_tile: int | str | None = None) -> ImageEmbeds:
    """Build the I2V (or, with ``end_image``, FLF2V) conditioning.

    image / end_image: ``[3, H, W]`` in -1..1 at full resolution (see :func:`image_to_tensor`).
    vae: a :class:`~wan_core.vae.WanVAE`; clip_vision: a :class:`~wan_core.clip_vision.CLIPVisionTower`.
    vae_tile: encode the guide video in tiles of this side (latent px; the memory plan's
    ``vae_encode_tile``, needed at 720p on 12 GB: the run plan's image-encode stage gives it),
    "auto" (:func:`~wan_core.vae_tiling.encode_tiled`'s own rule; one tile is the whole
    encode, bit for bit), or None: encode it whole.
    Raises :class:`~wan_core.errors.NonFiniteError` when an image, the CLIP features or the VAE
    latents hold NaN/Inf (the VAE checks every chunk it encodes).
    """
    from .clip_vision import encode_image

    check_video_size(width, height, frames)
    for img, which in ((image, "start"), (end_image, "end")):
        if img is not None and not all_finite(img):
            raise NonFiniteError(f"the {which} image contains NaN/Inf; give an image with values in -1..1.")
    images = [image] if end_image is None else [image, _match_last_frame(image, end_image)]
    feats = torch.cat([encode_image(clip_vision, img[None]) for img in images], dim=1)[0]
    if not all_finite(feats):
        cause = describe_nonfinite_weights(clip_vision, "CLIP vision") or (
            "fp16 overflow in CLIP vision: load it in bf16 or fp32")
        raise NonFiniteError(f"the CLIP vision features of the image contain NaN/Inf. Likely cause: {cause}.")
    if vae_tile is None:
        def encode_guide(guide: Tensor) -> Tensor:
            return vae.encode(guide[None])[0]
    else:
        from .vae_tiling import encode_tiled

        def encode_guide(guide: Tensor) -> Tensor:
            return encode_tiled(vae, guide[None], tile=vae_tile)[0]
    return image_embeds_from(images[0], feats, frames, width, height, encode_guide,
                             end_image=images[1] if end_image is not None else None)


def image_embeds_from(image: Tensor, clip_fea: Tensor, frames: int, width: int, height: int,
                      encode_guide: Callable[[Tensor], Tensor], end_image: Tensor | None = None) -> ImageEmbeds:
    """I2V / FLF2V conditioning from CLIP tokens computed elsewhere (ours or a host's CLIP
    vision) and an encoder of the guide video, as the official code builds it.

    image / end_image: ``[3, H, W]`` in -1..1 (an end image of another size is fitted to the
    start image as the official FLF2V code does). clip_fea: ``[257 or 514, 1280]``.
    encode_guide: guide video ``[3, frames, height, width]`` in -1..1 -> normalised latents
    ``[16, T', height/8, width/8]``.
    """
    check_video_size(width, height, frames)
    last = _match_last_frame(image, end_image) if end_image is not None else None
    guide = guide_video(image, frames, height, width, last)
    latents = encode_guide(guide).float().cpu()
    mask = i2v_mask(frames, height // SPACE_STRIDE, width // SPACE_STRIDE, last_frame=last is not None)
    return ImageEmbeds(y=torch.cat([mask, latents]), clip_fea=clip_fea.float().cpu(), width=width, height=height,
                       frames=frames)


class ConditioningError(ValueError):
    """The conditioning does not fit the model (an image for a T2V model, no end image for
    FLF2V, input latents of another size); the message says which and what to give instead."""


def _has_end_image(image: ImageEmbeds) -> bool:
    """Whether ``image`` carries a last frame: the mask of the last latent frame is set (FLF2V)."""
    return image.y.shape[1] > 1 and bool(image.y[:4, -1].eq(1).any())


def _pixels(shape) -> str:
    return f"{shape[-1] * SPACE_STRIDE}x{shape[-2] * SPACE_STRIDE}, {(shape[-3] - 1) * TIME_STRIDE + 1} frames"


def check_conditioning(cfg, image: ImageEmbeds | bool | None = None, *, end_image: bool | None = None,
                       shape: tuple[int, ...] | None = None,
                       init_shape: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """Check that a DiT of ``cfg`` can run on this conditioning; return the latent shape
    ``(16, T', H/8, W/8)`` it implies (None when nothing gives one).

    image: the I2V / FLF2V :class:`ImageEmbeds` (or True when a start image is still to be
    encoded); end_image: whether a last frame is given (default: read from ``image``'s mask);
    shape: the T2V latent shape; init_shape: the shape of V2V input latents, which must equal
    the shape of the run. Raises :class:`ConditioningError`.
    """
    v = cfg.variant
    has_image = image is not None and image is not False
    has_end = bool(end_image) if end_image is not None else (
        isinstance(image, ImageEmbeds) and _has_end_image(image))
    if has_end and not has_image:
        raise ConditioningError("end_image needs a start image too (first-last-frame to video).")
    if getattr(cfg, "fun", ""):   # Fun Control: an optional start image, encoded with the control (wan_core.fun)
        if isinstance(image, ImageEmbeds) or has_end:
            raise ConditioningError(f"{v} is a Fun Control model: it takes no end image, and its start image goes "
                                    "in with encode_fun_control (WanCore Fun Control Encode), not as I2V embeds.")
        has_image = False
    needs_image = getattr(cfg, "needs_image", cfg.has_image_input)   # + Wan 2.2 I2V-A14B (no CLIP)
    if needs_image and not has_image:
        raise ConditioningError(f"{v} is an image-to-video model: pass image=... to give it a start image.")
    if not needs_image and has_image:
        raise ConditioningError(f"{v} is a text-to-video model; it takes no image. Use an I2V model, or run "
                                "without a start image.")
    if has_end and cfg.model_type not in ("flf2v", "i2v"):   # i2v: Fun InP (wan_core.fun) takes an end frame
        raise ConditioningError(f"{v} is not a first-last-frame model: end_image needs an FLF2V or Fun InP model.")
    if not has_end and cfg.model_type == "flf2v" and has_image:
        raise ConditioningError(f"{v} is a first-last-frame (FLF2V) model: give it an end image too (end_image).")
    if isinstance(image, ImageEmbeds):
        shape = (LATENT_CHANNELS, *image.y.shape[-3:])
    elif shape is None and init_shape is not None:
        shape = tuple(init_shape)
    if init_shape is not None and shape is not None and tuple(init_shape) != tuple(shape):
        raise ConditioningError(f"the input latents are {_pixels(init_shape)} but the run is {_pixels(shape)}: "
                                "make them the same size.")
    return None if shape is None else tuple(shape)
