"""Wan2.1-Fun Control and Fun InP (VideoX-Fun, alibaba-pai): their conditioning, as VideoX-Fun builds it.

Facts from aigc-apps/VideoX-Fun (``videox_fun/models/wan_transformer3d.py``,
``videox_fun/pipeline/pipeline_wan_fun_control.py`` / ``pipeline_wan_fun_inpaint.py``,
``examples/wan2.1_fun/predict_*.py``). Both families are I2V-shaped DiTs (``img_emb`` and the
image cross-attention, no ``emb_pos``) whose ``patch_embedding`` takes the noise plus ``y``:

- **Fun InP** (1.3B / 14B, in_dim 36): ``y`` = 4 mask channels (1 = known frame, the first pixel
  frame repeated 4 times and regrouped per latent frame; trilinear at latent size, exact for
  whole-frame masks) + the 16 normalised latents of the masked video (the start image at frame
  0, the end image at the last frame, zeros elsewhere). That is exactly the official I2V /
  FLF2V ``y`` (:func:`wan_core.conditioning.image_embeds_from`), and InP-14B has exactly the
  I2V-14B tensors, so InP runs as an I2V model; the difference is the CLIP input: VideoX-Fun
  encodes the start image only, also with an end image (:func:`fit_image_embeds` keeps the
  start image's tokens of first+last embeds). Without any image it is text-to-video with
  zero ``y`` and zero CLIP features (:func:`encode_fun_inpaint`). Images of another size than
  the video are fitted as the official I2V / FLF2V code does (VideoX-Fun stretches each with
  PIL; identical for images already at the video size).
- **Fun Control** (1.3B / 14B, in_dim 48): ``y`` = the control video's 16 normalised latents
  (VAE means; zeros without a control video) + the start image's 16 latents at latent frame 0
  (zeros elsewhere, and everywhere without a start image or when the video is one latent
  frame: VideoX-Fun's ``if latents.size()[2] != 1``). CLIP tokens come from the reference
  image, else the start image (as given: CLIP resizes it itself), else they are zeros
  (``torch.zeros_like`` of the encoder output). **V1.1** adds ``ref_conv`` (Conv2d 16 -> dim,
  kernel = stride = 2x2): the reference image's latent (first latent frame of its own VAE
  encode; zeros without one) becomes one frame of tokens before the video's (RoPE frame 0, the
  video 1..F'), cut after the head (:meth:`wan_core.dit.WanDiT.prepare` ``full_ref``).

Images and control frames are given in 0..1 (ComfyUI IMAGE); VideoX-Fun resizes images to the
video size with PIL (bicubic, antialiased): done here with an antialiased bicubic resize; the
control video must already be ``frames`` images of the video size (as for VACE). Defaults of
the published examples: 50 steps, guidance 6.0 (:data:`FUN_DEFAULTS`), with UniPC shift 3 at
480p and 5 at 720p (their default "Flow" Euler scheduler uses shift 5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import ImageEmbeds, check_video_size, image_embeds_from, image_to_tensor
from .configs import LATENT_CHANNELS, VAE_SPACE_STRIDE, VAE_TIME_STRIDE, CLIPVisionConfig
from .errors import NonFiniteError, all_finite

__all__ = ["FunControlEmbeds", "encode_fun_control", "encode_fun_inpaint", "check_fun_control", "fun_model_call",
           "FunModelCall", "fit_image_embeds", "clip_features", "reference_tokens", "prepend_reference",
           "FUN_CONTROL_CHANNELS", "FUN_CLIP_TOKENS", "FUN_DEFAULTS"]

FUN_CONTROL_CHANNELS = 2 * LATENT_CHANNELS   # y of Fun Control: control latents 16 + start-image latents 16
FUN_CLIP_TOKENS = 257                        # ViT-H/14 at 224 px: 16 x 16 patches + the class token
# examples/wan2.1_fun/predict_v2v_control.py / predict_i2v.py: 50 steps, guidance 6; the shift they
# recommend for UniPC (3 at 480p, 5 at 720p) is default_settings' I2V rule, so it is not repeated here
FUN_DEFAULTS = {"steps": 50, "cfg": 6.0}


@dataclass(frozen=True)
class FunControlEmbeds:
    """Fun Control conditioning of one run (shared by the conditional and unconditional passes).

    y: ``[32, T', H/8, W/8]`` float32 = control latents 16 + start-image latents 16 (normalised).
    clip_fea: ``[257, 1280]`` CLIP penultimate tokens of the reference (else start) image, or
        None: no image, VideoX-Fun's zero features (made at the DiT's CLIP width when sampling).
    reference: ``[16, H/8, W/8]`` normalised latent of the reference image (V1.1 models; None:
        no reference image, zeros for a V1.1 model).
    """

    y: Tensor
    clip_fea: Tensor | None
    reference: Tensor | None
    width: int
    height: int
    frames: int

    def __post_init__(self) -> None:
        if self.y.ndim != 4 or self.y.shape[0] != FUN_CONTROL_CHANNELS:
            raise ValueError(f"Fun Control y must be [{FUN_CONTROL_CHANNELS}, T', H/8, W/8]; got {tuple(self.y.shape)}")
        if self.reference is not None and tuple(self.reference.shape) != (LATENT_CHANNELS, *self.y.shape[2:]):
            raise ValueError(f"the Fun Control reference latent must be [16, {self.y.shape[2]}, {self.y.shape[3]}]; "
                             f"got {tuple(self.reference.shape)}")
        if self.clip_fea is not None and self.clip_fea.ndim != 2:
            raise ValueError(f"clip_fea must be [tokens, width]; got {tuple(self.clip_fea.shape)}")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Shape of the noise / sampled latents: ``(16, T', H/8, W/8)``."""
        return (LATENT_CHANNELS, *self.y.shape[1:])


def _fit(image: Tensor, height: int, width: int) -> Tensor:
    """``[3, h, w]`` in -1..1 -> ``[3, height, width]``: unchanged at the size, else bicubic with
    antialiasing and clamped (PIL's ``resize`` on 8-bit images, as VideoX-Fun resizes)."""
    if tuple(image.shape[1:]) == (height, width):
        return image.float()
    out = F.interpolate(image[None].float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp(-1.0, 1.0)


def _pixels(image: Tensor, which: str) -> Tensor:
    """An image ``[H, W, C]`` in 0..1 -> ``[3, H, W]`` in -1..1, refusing NaN/Inf and other ranges."""
    x = image_to_tensor(image)
    if not all_finite(x) or x.min() < -1 or x.max() > 1:
        raise ValueError(f"the {which} image must hold finite values in 0..1")
    return x


def _control_video(video: Tensor, frames: int, height: int, width: int) -> Tensor:
    if video.ndim != 4 or video.shape[-1] not in (3, 4):
        raise ValueError(f"control_video must be frames [F, H, W, 3] in 0..1 (ComfyUI IMAGE); got {tuple(video.shape)}")
    if tuple(video.shape[:3]) != (frames, height, width):
        raise ValueError(f"control_video is {video.shape[0]} frames of {video.shape[2]}x{video.shape[1]}; the run is "
                         f"{frames} frames of {width}x{height}. Resize / trim the control video (or set the size and "
                         "frame count to match it).")
    v = video[..., :3].float()
    if not all_finite(v) or v.min() < 0 or v.max() > 1:
        raise ValueError("control_video values must be finite and in 0..1")
    return v.permute(3, 0, 1, 2).mul(2).sub(1)


def _encoder(vae, vae_tile):
    def encode(v: Tensor) -> Tensor:     # [3, F, H, W] in -1..1 -> normalised latents [16, F', h, w]
        if vae_tile is None:
            return vae.encode(v[None])[0].float().cpu()
        from .vae_tiling import encode_tiled

        return encode_tiled(vae, v[None], tile=vae_tile)[0].float().cpu()
    return encode


def _clip_tokens(clip_vision, image: Tensor) -> Tensor:
    from .clip_vision import encode_image

    feats = encode_image(clip_vision, image[None])[0].float().cpu()
    if not all_finite(feats):
        raise NonFiniteError("the CLIP vision features of the image contain NaN/Inf; load CLIP vision in bf16 or fp32 "
                             "and check its file.")
    return feats


@torch.no_grad()
def encode_fun_control(vae, width: int, height: int, frames: int, *, control_video: Tensor | None = None,
                       start_image: Tensor | None = None, reference_image: Tensor | None = None,
                       clip_vision=None, vae_tile: int | str | None = None) -> FunControlEmbeds:
    """Build the Fun Control conditioning of a run (see the module docstring).

    control_video: ``[F, H, W, 3]`` in 0..1, exactly ``frames`` images of ``width x height``
    (depth, pose, edges ... from any preprocessor; None: no control, zero latents).
    start_image: ``[H, W, C]`` in 0..1, any size (resized): the first frame of the video.
    reference_image: ``[H, W, C]`` in 0..1 (Fun V1.1 Control): subject / style reference.
    clip_vision: a :class:`~wan_core.clip_vision.CLIPVisionTower`, needed when an image is given.
    vae: a :class:`~wan_core.vae.WanVAE`; vae_tile: tiled encode (latent px, "auto") or None.
    Sizes, frame counts and value ranges are checked before the VAE runs (ValueError).
    """
    check_video_size(width, height, frames)
    video = _control_video(control_video, frames, height, width) if control_video is not None else None
    start_px = _pixels(start_image, "start") if start_image is not None else None
    ref_px = _pixels(reference_image, "reference") if reference_image is not None else None
    start = _fit(start_px, height, width) if start_px is not None else None
    ref = _fit(ref_px, height, width) if ref_px is not None else None
    clip_image = ref_px if ref_px is not None else start_px     # VideoX-Fun: the image as loaded (CLIP resizes)
    if clip_image is not None and clip_vision is None:
        raise ValueError("Fun Control with a start or reference image needs clip_vision (CLIP ViT-H/14): VideoX-Fun "
                         "feeds the image's CLIP tokens to the model.")
    encode = _encoder(vae, vae_tile)
    t, h, w = (frames - 1) // VAE_TIME_STRIDE + 1, height // VAE_SPACE_STRIDE, width // VAE_SPACE_STRIDE
    control = encode(video) if video is not None else torch.zeros(LATENT_CHANNELS, t, h, w)
    start_lat = torch.zeros(LATENT_CHANNELS, t, h, w)
    if start is not None and t > 1:     # VideoX-Fun leaves it out of a one-latent-frame video
        start_lat[:, :1] = encode(start[:, None])
    reference = encode(ref[:, None])[:, 0] if ref is not None else None
    clip = _clip_tokens(clip_vision, clip_image) if clip_image is not None else None
    return FunControlEmbeds(torch.cat([control, start_lat]), clip, reference, width, height, frames)


@torch.no_grad()
def encode_fun_inpaint(vae, width: int, height: int, frames: int, *, image: Tensor | None = None,
                       end_image: Tensor | None = None, clip_vision=None,
                       vae_tile: int | str | None = None) -> ImageEmbeds:
    """Fun InP conditioning (an I2V-shaped :class:`~wan_core.conditioning.ImageEmbeds`).

    image / end_image: ``[H, W, C]`` in 0..1: the first / last frame (resized as the official
    I2V / FLF2V code does); CLIP tokens of the start image only ``[257, width]``. No image at
    all: text-to-video, ``y`` zeros and zero CLIP features (width of ``clip_vision``, else 1280).
    """
    check_video_size(width, height, frames)
    if end_image is not None and image is None:
        raise ValueError("end_image needs a start image too (Fun InP: first-last-frame to video).")
    if image is None:
        t, h, w = (frames - 1) // VAE_TIME_STRIDE + 1, height // VAE_SPACE_STRIDE, width // VAE_SPACE_STRIDE
        clip_width = clip_vision.config.width if clip_vision is not None else CLIPVisionConfig().width
        return ImageEmbeds(y=torch.zeros(4 + LATENT_CHANNELS, t, h, w), width=width, height=height, frames=frames,
                           clip_fea=torch.zeros(FUN_CLIP_TOKENS, clip_width))
    if clip_vision is None:
        raise ValueError("Fun InP with a start image needs clip_vision (CLIP ViT-H/14).")
    first = _pixels(image, "start")
    last = _pixels(end_image, "end") if end_image is not None else None
    return image_embeds_from(first, _clip_tokens(clip_vision, first), frames, width, height, _encoder(vae, vae_tile),
                             end_image=last)


def fit_image_embeds(cfg, image: ImageEmbeds | None) -> ImageEmbeds | None:
    """The image conditioning an I2V-shaped model takes: for Fun InP / I2V given first+last-frame
    embeds (FLF2V-style, two CLIP images), the start image's tokens only, as VideoX-Fun's InP
    pipeline encodes them; everything else unchanged."""
    if image is None or getattr(cfg, "model_type", "") != "i2v" or getattr(cfg, "fun", "") or image.clip_fea is None:
        return image
    n = image.clip_fea.shape[0]
    end = image.y.shape[1] > 1 and bool(image.y[:4, -1].eq(1).any())
    if not end or n % 2:
        return image
    return ImageEmbeds(y=image.y, clip_fea=image.clip_fea[: n // 2], width=image.width, height=image.height,
                       frames=image.frames)


def check_fun_control(cfg, fun: FunControlEmbeds | None, shape: tuple[int, ...] | None, image=None,
                      init_latents: Tensor | None = None) -> tuple[int, ...] | None:
    """The latent shape of a Fun Control run, or ValueError when the model, the other
    conditioning or ``shape`` do not fit ``fun`` (a Fun Control model without ``fun`` too)."""
    if fun is None:
        if getattr(cfg, "fun", "") == "control":
            raise ValueError(f"{cfg.variant} is a Fun Control model: give its conditioning "
                             "(wan_core.encode_fun_control; in ComfyUI WanCore Fun Control Encode), even without "
                             "a control video.")
        return shape
    if getattr(cfg, "fun", "") != "control":
        raise ValueError(f"Fun Control conditioning needs a Wan2.1-Fun Control model; {cfg.variant} is not one")
    if image is not None:
        raise ValueError("Fun Control conditioning carries its own start image; give only the Fun Control embeds")
    if fun.reference is not None and not cfg.ref_in_dim:
        raise ValueError(f"{cfg.variant} (Fun Control V1.0) takes no reference image; use a Wan2.1-Fun-V1.1 Control "
                         "model or leave reference_image out")
    if fun.clip_fea is not None and fun.clip_fea.shape[1] != cfg.clip_dim:
        raise ValueError(f"the CLIP tokens are {fun.clip_fea.shape[1]} wide; {cfg.variant} takes {cfg.clip_dim}")
    if shape is not None and tuple(shape) != fun.latent_shape:
        raise ValueError(f"latent shape {tuple(shape)} does not match the Fun Control conditioning {fun.latent_shape}")
    if init_latents is not None and tuple(init_latents.shape) != fun.latent_shape:
        raise ValueError(f"the input latents {tuple(init_latents.shape)} do not match the Fun Control conditioning "
                         f"{fun.latent_shape}: make them the same size")
    for tensor in (fun.y, fun.clip_fea, fun.reference):
        if tensor is not None and not all_finite(tensor):
            raise NonFiniteError("the Fun Control conditioning contains NaN/Inf; check the VAE, CLIP vision and "
                                 "the control inputs")
    return fun.latent_shape


def fun_model_call(runner, fun: FunControlEmbeds) -> FunModelCall:
    """The sampler's model call for a Fun Control run (see :class:`FunModelCall`)."""
    return FunModelCall(runner, fun)


class FunModelCall:
    """``runner`` given the run's reference latent as ``full_ref`` on every call (V1.1 models:
    zeros without a reference image, as VideoX-Fun); V1.0 models are called unchanged.
    Everything else (``dit``, ``step`` ...) is the runner's."""

    def __init__(self, runner, fun: FunControlEmbeds) -> None:
        self.runner = runner
        self.reference = None
        if runner.dit.cfg.ref_in_dim:
            ref = fun.reference if fun.reference is not None else torch.zeros(LATENT_CHANNELS, *fun.y.shape[2:])
            self.reference = ref.float()[None]

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def __call__(self, x: Tensor, t: Tensor, *args, **kwargs) -> Tensor:
        if self.reference is None:
            return self.runner(x, t, *args, **kwargs)
        return self.runner(x, t, *args, full_ref=self.reference.to(x.device), **kwargs)


def prepend_reference(ref_conv, cfg, tokens: Tensor, grid: tuple[int, ...],
                      full_ref: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """VideoX-Fun ``full_ref`` in the DiT (:meth:`wan_core.dit.WanDiT.prepare`): ``ref_conv`` (a
    Conv2d, computed in float32 like patch_embedding) of the reference latent ``[B, ref_in_dim, H, W]``
    -> ``H/2 * W/2`` tokens before the video tokens ``[B, L, dim]``; the patch grid gains one
    frame, so the video takes RoPE frames 1..F'."""
    (f, h, w), (ph, pw) = grid, cfg.patch_size[1:]
    want = (tokens.shape[0], cfg.ref_in_dim, h * ph, w * pw)
    if ref_conv is None or tuple(full_ref.shape) != want:
        raise ValueError(f"full_ref needs a Fun V1.1 Control model and the reference latent {list(want)}; "
                         f"{cfg.variant} got {tuple(full_ref.shape)}")
    wt, b = ref_conv.weight, ref_conv.bias
    ref = F.conv2d(full_ref.to(tokens.device).float(), wt.float(), b.float(), stride=(ph, pw))
    return torch.cat([ref.flatten(2).transpose(1, 2), tokens], dim=1), (f + 1, h, w)


def reference_tokens(cfg, latent_hw: tuple[int, int]) -> int:
    """DiT tokens a Fun V1.1 reference adds to every evaluation (one latent frame: ``h/2 * w/2``),
    0 for other models; the memory plan counts them (832x480: 1,560 on top of 32,760)."""
    if not getattr(cfg, "ref_in_dim", 0):
        return 0
    _, ph, pw = cfg.patch_size
    return (latent_hw[0] // ph) * (latent_hw[1] // pw)


def clip_features(cfg, fun: FunControlEmbeds) -> Tensor:
    """The CLIP tokens a Fun Control run feeds the DiT ``[257, clip_dim]``: the image's, or zeros."""
    return fun.clip_fea if fun.clip_fea is not None else torch.zeros(FUN_CLIP_TOKENS, cfg.clip_dim)
