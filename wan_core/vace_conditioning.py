"""The VACE context of a run, built exactly as the official ``wan/vace.py`` builds it.

Official functions (Wan-Video/Wan2.1 ``WanVace``): ``vace_encode_frames``,
``vace_encode_masks``, ``vace_latent``, ``prepare_source`` (reference image fitting) and
``decode_latent`` (reference frames trimmed). Per run, with ``F`` pixel frames (4n+1) at
``H x W`` (multiples of 16), ``T' = (F-1)/4 + 1`` latent frames and ``R`` reference images:

1. control video ``[3, F, H, W]`` in -1..1 (none: zeros, i.e. mid-grey) and mask
   ``[F, H, W]`` in 0..1 (none: ones = generate everything under the control). The mask is
   binarised at 0.5 for the split only: inactive = frames x (1 - m) (what is kept),
   reactive = frames x m (what is regenerated / the control signal); each is VAE-encoded
   (normalised latents) -> ``[16, T', H/8, W/8]`` twice.
2. mask channels: each 8 x 8 pixel patch becomes 64 channels (channel ``8*i + j`` = pixel
   ``(8y+i, 8x+j)``), then the F frames are resampled to T' with ``nearest-exact`` (the
   official quirk: latent frame 0 reads pixel frame 1 at 81 frames) -> ``[64, T', H/8, W/8]``;
   the raw 0..1 mask values, not the binarised ones (as the official code does).
3. reference images: each fitted into the frame (scaled to fit, bilinear, centred on white,
   as ``prepare_source``), VAE-encoded alone (one latent frame each), given zero reactive
   latents and zero mask channels, and prepended in time.
4. the context = ``cat[inactive 16, reactive 16, mask 64]`` = ``[96, R + T', H/8, W/8]``; the
   noise has ``R + T'`` frames too, and the first R latent frames are cut from the result.

The sampler takes a :class:`VaceEmbeds`; its strength (the official ``context_scale``, 1.0)
can be limited to a range of the steps.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import SIZE_MULTIPLE, SPACE_STRIDE, TIME_STRIDE, check_video_size, image_to_tensor
from .configs import LATENT_CHANNELS
from .errors import all_finite
from .vace import check_strength

__all__ = ["VaceEmbeds", "encode_vace", "split_control", "pack_mask", "fit_reference", "check_vace",
           "vace_model_call", "VaceModelCall", "VACE_CHANNELS", "MAX_REFERENCE_IMAGES"]

MASK_CHANNELS = SPACE_STRIDE * SPACE_STRIDE                       # 64
VACE_CHANNELS = 2 * LATENT_CHANNELS + MASK_CHANNELS               # 96 = vace_patch_embedding input
MAX_REFERENCE_IMAGES = 16    # the published workflows use 1-3; each adds one latent frame to every step


@dataclass(frozen=True)
class VaceEmbeds:
    """VACE context of one run (shared by the conditional and unconditional passes).

    latents: ``[96, R + T', H/8, W/8]`` float32 = inactive latents 16 + reactive latents 16 +
        mask 64 (see the module docstring); reference_frames: R, the leading latent frames that
        are reference images (cut from the sampled latents). strength: the context scale
        (official 1.0; 0 = the plain T2V model); start / end: fractions of the steps between
        which the branch runs (step i runs it when ``start * steps <= i < end * steps``).
    """

    latents: Tensor
    reference_frames: int
    width: int
    height: int
    frames: int
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        lat = self.latents
        if lat.ndim != 4 or lat.shape[0] != VACE_CHANNELS:
            raise ValueError(f"VACE latents must be [{VACE_CHANNELS}, frames, H/8, W/8]; got {tuple(lat.shape)}")
        if not 0 <= self.reference_frames < lat.shape[1]:
            raise ValueError(f"reference_frames {self.reference_frames} must leave video frames in the "
                             f"{lat.shape[1]} latent frames")
        check_strength(self.strength)
        if not (0.0 <= self.start < self.end <= 1.0):
            raise ValueError(f"VACE start/end must satisfy 0 <= start < end <= 1 (fractions of the steps); "
                             f"got start={self.start}, end={self.end}")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Shape of the noise / sampled latents, reference frames included: ``(16, R + T', h, w)``."""
        _, t, h, w = self.latents.shape
        return LATENT_CHANNELS, t, h, w

    def strength_at(self, step: int, total: int) -> float:
        """The strength at 0-based ``step`` of ``total`` (0 outside ``[start, end)``)."""
        return self.strength if self.start * total <= step < self.end * total else 0.0

    def with_strength(self, strength: float, start: float = 0.0, end: float = 1.0) -> VaceEmbeds:
        return replace(self, strength=strength, start=start, end=end)

    def trim(self, latents: Tensor) -> Tensor:
        """Sampled latents ``[..., 16, R + T', h, w]`` -> the video's ``[..., 16, T', h, w]``."""
        return latents[..., self.reference_frames:, :, :]


def split_control(video: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Official split: ``video`` ``[3, F, H, W]`` (-1..1), ``mask`` ``[F, H, W]`` (0..1) ->
    (inactive, reactive) ``[3, F, H, W]`` with the mask binarised at 0.5."""
    m = (mask > 0.5).to(video.dtype)[None]
    return video * (1 - m), video * m


def pack_mask(mask: Tensor) -> Tensor:
    """``[F, H, W]`` mask (0..1, H and W multiples of 16) -> ``[64, T', H/8, W/8]``: 8 x 8 pixels
    to channels (``8*i + j``), then F frames -> T' = (F+3)//4 by ``nearest-exact``."""
    f, h, w = mask.shape
    s = SPACE_STRIDE
    packed = mask.float().reshape(f, h // s, s, w // s, s).permute(2, 4, 0, 1, 3).reshape(s * s, f, h // s, w // s)
    t = (f + TIME_STRIDE - 1) // TIME_STRIDE
    return F.interpolate(packed[None], size=(t, h // s, w // s), mode="nearest-exact")[0]


def fit_reference(image: Tensor, height: int, width: int) -> Tensor:
    """A reference image ``[3, h, w]`` (-1..1) -> ``[3, height, width]``: scaled to fit (bilinear,
    no antialias), centred on white (official ``prepare_source``); unchanged at the frame size."""
    _, h, w = image.shape
    if (h, w) == (height, width):
        return image.float()
    scale = min(height / h, width / w)
    nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
    resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, height, width)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = resized
    return canvas


def _video(control_video: Tensor, frames: int, height: int, width: int) -> Tensor:
    v = control_video
    if v.ndim != 4 or v.shape[-1] not in (3, 4):
        raise ValueError(f"control_video must be frames [F, H, W, 3] in 0..1 (ComfyUI IMAGE); got {tuple(v.shape)}")
    if tuple(v.shape[:3]) != (frames, height, width):
        raise ValueError(f"control_video is {v.shape[0]} frames of {v.shape[2]}x{v.shape[1]}; the run is {frames} "
                         f"frames of {width}x{height}. Resize / trim the control video (or set the size and "
                         "frame count to match it).")
    v = v[..., :3].float()
    if not all_finite(v) or v.min() < 0 or v.max() > 1:
        raise ValueError("control_video values must be finite and in 0..1")
    return v.permute(3, 0, 1, 2).mul(2).sub(1)


def _mask(control_mask: Tensor, frames: int, height: int, width: int) -> Tensor:
    m = control_mask
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or tuple(m.shape[1:]) != (height, width) or m.shape[0] not in (1, frames):
        raise ValueError(f"control_mask must be [F={frames} or 1, H={height}, W={width}] (ComfyUI MASK); "
                         f"got {tuple(control_mask.shape)}")
    m = m.float()
    if not all_finite(m) or m.min() < 0 or m.max() > 1:
        raise ValueError("control_mask values must be finite and in 0..1 (1 = generate, 0 = keep)")
    return m.expand(frames, height, width)


@torch.no_grad()
def encode_vace(vae, width: int, height: int, frames: int, *, control_video: Tensor | None = None,
                control_mask: Tensor | None = None, reference_images: Sequence[Tensor] = (),
                strength: float = 1.0, start: float = 0.0, end: float = 1.0,
                vae_tile: int | None = None) -> VaceEmbeds:
    """Build the VACE context of a run (see the module docstring).

    control_video: ``[F, H, W, 3]`` in 0..1 at the run's size and frame count (None: no control,
        mid-grey); control_mask: ``[F, H, W]`` or ``[1, H, W]`` in 0..1, 1 = regenerate (None: ones);
    reference_images: ``[h, w, 3]`` images in 0..1 of any size (fitted onto white);
    vae: a :class:`~wan_core.vae.WanVAE`; vae_tile: tiled encode (latent px) or None.
    Sizes, frame counts and value ranges are checked before the VAE runs (ValueError).
    """
    check_video_size(width, height, frames)
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:   # check_video_size says so too; the packing needs it
        raise ValueError(f"VACE needs width and height multiples of {SIZE_MULTIPLE}")
    refs = list(reference_images)
    if len(refs) > MAX_REFERENCE_IMAGES:
        raise ValueError(f"{len(refs)} reference images; at most {MAX_REFERENCE_IMAGES} are supported")
    embeds_args = dict(strength=check_strength(strength), start=start, end=end)
    if not (0.0 <= start < end <= 1.0):
        raise ValueError(f"VACE start/end must satisfy 0 <= start < end <= 1; got {start}, {end}")
    video = _video(control_video, frames, height, width) if control_video is not None else \
        torch.zeros(3, frames, height, width)
    mask = _mask(control_mask, frames, height, width) if control_mask is not None else \
        torch.ones(frames, height, width)
    ref_pixels = []
    for i, img in enumerate(refs):
        pix = image_to_tensor(img)                     # [3, h, w] in -1..1; refuses odd shapes
        if not all_finite(pix) or pix.min() < -1 or pix.max() > 1:
            raise ValueError(f"reference image {i} must hold finite values in 0..1")
        ref_pixels.append(fit_reference(pix, height, width))

    def encode(v: Tensor) -> Tensor:     # [3, F, H, W] -> normalised latents [16, F', h, w]
        if vae_tile is None:
            return vae.encode(v[None])[0].float().cpu()
        from .vae_tiling import encode_tiled

        return encode_tiled(vae, v[None], tile=vae_tile)[0].float().cpu()

    inactive, reactive = split_control(video, mask)
    latents = torch.cat([encode(inactive), encode(reactive)])                  # [32, T', h, w]
    packed = pack_mask(mask)                                                    # [64, T', h, w]
    if ref_pixels:
        ref_lat = torch.cat([encode(r[:, None]) for r in ref_pixels], dim=1)    # [16, R, h, w]
        latents = torch.cat([torch.cat([ref_lat, torch.zeros_like(ref_lat)]), latents], dim=1)
        packed = torch.cat([packed.new_zeros(MASK_CHANNELS, len(ref_pixels), *packed.shape[2:]), packed], dim=1)
    return VaceEmbeds(torch.cat([latents, packed]), len(ref_pixels), width, height, frames, **embeds_args)


def check_vace(cfg, vace: VaceEmbeds, shape: tuple[int, ...] | None, image=None,
               init_latents: Tensor | None = None) -> tuple[int, ...]:
    """The latent shape of a VACE run (reference frames included), or ValueError when the
    model, the other conditioning or ``shape`` do not fit ``vace``."""
    if not getattr(cfg, "vace_layers", ()):
        raise ValueError(f"VACE conditioning needs a VACE model; {cfg.variant} has no VACE blocks "
                         "(load Wan2.1-VACE-1.3B or -14B)")
    if image is not None or init_latents is not None:
        raise ValueError("VACE conditioning replaces image and video-to-video inputs; give only the VACE embeds "
                         "(start frames go in as control frames with a mask)")
    c, t, h, w = vace.latent_shape
    if shape is not None and tuple(shape) not in ((c, t, h, w), (c, t - vace.reference_frames, h, w)):
        raise ValueError(f"latent shape {tuple(shape)} does not match the VACE context {vace.latent_shape} "
                         f"({vace.reference_frames} reference frames included)")
    if not all_finite(vace.latents):
        raise ValueError("the VACE context contains NaN/Inf; check the VAE and the control inputs")
    return vace.latent_shape


def vace_model_call(runner, vace: VaceEmbeds) -> VaceModelCall:
    """The sampler's model call for a VACE run (see :class:`VaceModelCall`)."""
    return VaceModelCall(runner, vace)


class VaceModelCall:
    """``runner`` with the VACE strength of the current step (``runner.step`` of
    ``runner.total_steps``): steps outside ``[start, end)`` run the plain model (no context),
    bit for bit. Everything else (``dit``, ``step`` ...) is the runner's."""

    def __init__(self, runner, vace: VaceEmbeds) -> None:
        self.runner = runner
        self.vace = vace

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None = None,
                 y: Tensor | None = None, *args, **kwargs) -> Tensor:
        s = self.vace.strength_at(self.runner.step, self.runner.total_steps)
        if s == 0.0:
            return self.runner(x, t, context, clip_fea, None, *args, **kwargs)
        return self.runner(x, t, context, clip_fea, y, *args, vace_strength=s, **kwargs)
