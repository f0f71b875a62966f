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
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .runner import DiTRunner

__all__ = ["TI2V_DEFAULTS", "ti2v_latent_shape", "first_frame_timesteps", "FirstFrameRunner",
           "encode_ti2v_image"]

TI2V_DEFAULTS = {"steps": 50, "shift": 5.0, "cfg": 5.0, "frames": 121, "fps": 24, "width": 1280, "height": 704}


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
    get timestep 0. Wraps a :class:`~wan_core.runner.DiTRunner` (block swap, step cache)."""

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
