"""Wan 2.2 TI2V-5B: text-to-video and text-image-to-video in one 48-channel model.

TI2V-5B samples latents ``[48, T', H/16, W/16]`` of the Wan 2.2 VAE (:mod:`wan_core.vae22`)
with an ordinary t2v-shaped DiT (no image branch). Text-to-video is a plain :func:`sample`
on that shape. Image-to-video (official ``textimage2video.py``, ``masks_like(zero=True)``)
keeps the first latent frame at the image's latents ``z`` for the whole run and tells the DiT
so through **per-token timesteps**: the tokens of that frame get timestep 0, all others the
step's timestep (``temp_ts``). :class:`FirstFrameRunner` does both around any runner: each
call sees ``z`` in the first frame and the per-token timesteps; ``sample(...,
known_latents=z)`` makes the solver's estimate of that frame ``z`` (its velocity
``(x - z) / sigma``), so the returned first frame is ``z``.

Official defaults (``wan/configs/wan_ti2v_5B.py``): 50 steps, shift 5, guidance 5, 121
frames at 24 fps, 1280x704 / 704x1280.

Image-to-video size (official ``textimage2video.py`` ``i2v``): the video size is
:func:`best_output_size` of the image's aspect within ``max_area`` (default 704 x 1280) in
steps of 32 (VAE 16 x patch 2), then the image is scaled (Lanczos) to cover that size and
center-cropped to it (:func:`fit_image`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .conditioning import image_to_tensor
from .limits import check_max_area
from .runner import DiTRunner

__all__ = ["TI2V_DEFAULTS", "TI2V_SIZE_STEP", "ti2v_latent_shape", "first_frame_timesteps", "FirstFrameRunner",
           "encode_ti2v_image", "best_output_size", "ti2v_size", "fit_image"]

TI2V_DEFAULTS = {"steps": 50, "shift": 5.0, "cfg": 5.0, "frames": 121, "fps": 24, "width": 1280, "height": 704,
                 "max_area": 704 * 1280}
TI2V_SIZE_STEP = 32   # pixels: the VAE's 16x16 times the DiT's 2x2 patches


def ti2v_latent_shape(width: int, height: int, frames: int) -> tuple[int, int, int, int]:
    """``(48, (frames-1)//4+1, height/16, width/16)``; sizes must be multiples of 32 (VAE 16,
    then the DiT's 2x2 patches) and frames 4n+1."""
    if width % 32 or height % 32 or width < 32 or height < 32:
        raise ValueError(f"TI2V-5B needs width and height multiples of 32 (16x16 VAE, 2x2 patches); "
                         f"got {width}x{height}. Nearest: {max(32, width // 32 * 32)}x{max(32, height // 32 * 32)}.")
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4n+1 (1, 5, ..., 121); got {frames}")
    return 48, (frames - 1) // 4 + 1, height // 16, width // 16


def first_frame_timesteps(t: Tensor, grid: tuple[int, int, int], known_frames: int = 1) -> Tensor:
    """Per-token timesteps ``[B, F*H*W]`` for a token grid ``(F, H, W)``: 0 for the tokens of
    the first ``known_frames`` latent frames, ``t`` (``[B]`` or a scalar) for all others; the
    official ``(mask[:, :, ::2, ::2] * t).flatten()`` with tokens in (f, h, w) order."""
    f, h, w = grid
    t = t.reshape(-1).float()
    mask = torch.ones(f, h * w, device=t.device)
    mask[:known_frames] = 0
    return mask.flatten()[None] * t[:, None]


class FirstFrameRunner:
    """Runner for TI2V image-to-video: the first ``z.shape[1]`` latent frames of every call's
    ``x`` are replaced by ``z`` (normalised image latents ``[48, K, h, w]``) and their tokens
    get timestep 0. Wraps a :class:`~wan_core.runner.DiTRunner` (block swap, step cache).
    ``sample`` refuses context windows with it (``pins_first_frame``): a window away from
    frame 0 would get the image pinned in its own first frame."""

    pins_first_frame = True

    def __init__(self, inner: DiTRunner, z: Tensor) -> None:
        self.inner, self.z = inner, z
        self.dit = inner.dit

    @property
    def cfg(self):
        return self.dit.cfg

    def begin_run(self, total_steps: int) -> None:
        self.inner.begin_run(total_steps)

    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)

    def __call__(self, x: Tensor, t: Tensor, *args, **kwargs) -> Tensor:
        k = self.z.shape[1]
        x = torch.cat([self.z.to(x.device, x.dtype)[None].expand(x.shape[0], -1, -1, -1, -1), x[:, :, k:]], dim=2)
        grid = tuple(n // p for n, p in zip(x.shape[2:], self.dit.cfg.patch_size))
        if math.prod(grid) and t.dim() <= 1:
            t = first_frame_timesteps(t.to(x.device), grid, k)  # type: ignore[arg-type]
        return self.inner(x, t, *args, **kwargs)


@torch.no_grad()
def encode_ti2v_image(vae, image: Tensor) -> Tensor:
    """Image ``[3, H, W]`` in -1..1, already at the video size -> normalised latents
    ``[48, 1, H/16, W/16]`` for :class:`FirstFrameRunner` and ``sample(known_latents=...)``."""
    if getattr(vae, "space_stride", 8) != 16:
        raise ValueError("TI2V-5B needs the Wan 2.2 VAE (wan2.2_vae.safetensors, 48 channels); this is the "
                         "Wan 2.1 VAE.")
    return vae.encode(image[None, :, None].float())[0].float().cpu()


# --------------------------------------------------------------------------- image-to-video size

def best_output_size(width: int, height: int, step_w: int, step_h: int, max_area: int) -> tuple[int, int]:
    """``(width, height)``, multiples of ``step_w`` / ``step_h`` with ``w * h <= max_area``,
    whose aspect is closest to ``width / height`` (official ``wan/utils/utils.py``): the
    float size of that aspect and area is rounded down once width-first and once
    height-first (the other side then filling the area, rounded down), and the candidate
    with the smaller aspect error wins (height-first on a tie). Raises ``ValueError`` when
    ``max_area`` cannot hold one step at this aspect."""
    if width <= 0 or height <= 0:
        raise ValueError(f"the image must have a positive size; got {width}x{height}")
    aspect = width / height
    fw = (max_area * aspect) ** 0.5
    fh = max_area / fw
    w1 = int(fw // step_w * step_w)
    w2_h = int(fh // step_h * step_h)
    if w1 < step_w or w2_h < step_h:
        raise ValueError(f"max_area {max_area} is too small for a {width}x{height} image: at its aspect one side "
                         f"falls below {max(step_w, step_h)} px. Raise max_area or crop the image closer to square.")
    h1 = int(max_area / w1 // step_h * step_h)
    w2 = int(max_area / w2_h // step_w * step_w)
    if h1 < step_h or w2 < step_w:
        raise ValueError(f"max_area {max_area} is too small for a {width}x{height} image: at its aspect one side "
                         f"falls below {max(step_w, step_h)} px. Raise max_area or crop the image closer to square.")
    r1, r2 = w1 / h1, w2 / w2_h
    if max(aspect / r1, r1 / aspect) < max(aspect / r2, r2 / aspect):
        return w1, h1
    return w2, w2_h


def ti2v_size(image_width: int, image_height: int, max_area: int = TI2V_DEFAULTS["max_area"]) -> tuple[int, int]:
    """The official TI2V-5B video size ``(width, height)`` for an image: :func:`best_output_size`
    in steps of 32 within ``max_area`` pixels (at the default 704 x 1280: a 1280x704 image
    -> 1280x704, a 1920x1080 one -> 1248x704, a square one -> 960x928)."""
    check_max_area(max_area)
    return best_output_size(image_width, image_height, TI2V_SIZE_STEP, TI2V_SIZE_STEP, max_area)


def fit_image(image: Tensor, width: int, height: int) -> Tensor:
    """One image ``[H, W, C]`` (0..1 float or uint8; grayscale / RGBA as
    :func:`~wan_core.conditioning.image_to_tensor`) -> ``[3, height, width]`` in -1..1, as the
    official TI2V code prepares its PIL image: scaled by ``max(width / W, height / H)`` to
    ``(round(W s), round(H s))`` with PIL's Lanczos filter, center-cropped (offsets rounded
    down). The official code only sees 8-bit images, so the image is rounded to 8 bits and
    filtered by PIL's 8-bit path (which clips between its two passes): the official pixels
    exactly, for any 8-bit source. An image already at the size is converted as it is."""
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ValueError(f"fit_image: width and height must be positive whole pixels; got {width!r} x {height!r}")
    rgb = image_to_tensor(image)   # [3, H, W] in -1..1
    ih, iw = rgb.shape[1:]
    scale = max(width / iw, height / ih)
    size = (round(iw * scale), round(ih * scale))
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    box = (left, top, left + width, top + height)
    if size == (iw, ih) and box == (0, 0, iw, ih):   # already the size: PIL returns a copy
        return rgb
    levels = rgb.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    fitted = Image.fromarray(levels.numpy(), "RGB").resize(size, Image.LANCZOS).crop(box)
    out = torch.from_numpy(np.asarray(fitted).astype(np.float32) / np.float32(255.0))   # TF.to_tensor's values
    return out.permute(2, 0, 1).sub(0.5).div(0.5).contiguous()
