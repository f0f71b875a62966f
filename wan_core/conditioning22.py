"""Wan 2.2 conditioning: I2V-A14B's image input without CLIP tokens.

Wan 2.2 I2V-A14B (official ``image2video.py``) conditions exactly like Wan 2.1 I2V on the
channel side (4 mask channels marking the given first frame + the 16 normalised VAE latents
of a guide video holding the image then mid-grey frames: ``y`` ``[20, T', H/8, W/8]``,
:func:`~wan_core.conditioning.i2v_mask`, :func:`~wan_core.conditioning.guide_video`) but its
DiTs have no CLIP branch: no image encoder runs and ``clip_fea`` is None.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .conditioning import ImageEmbeds, check_video_size, guide_video, i2v_mask
from .errors import NonFiniteError, all_finite

__all__ = ["encode_image_latents"]


@torch.no_grad()
def encode_image_latents(vae, image: Tensor, frames: int, width: int, height: int, *,
                         vae_tile: int | str | None = None) -> ImageEmbeds:
    """I2V-A14B conditioning: ``image`` ``[3, H, W]`` in -1..1 -> :class:`ImageEmbeds` with
    ``y`` = mask + latents ``[20, T', height/8, width/8]`` and ``clip_fea`` None.

    vae: the Wan 2.1 VAE (A14B uses it). vae_tile: as in
    :func:`~wan_core.conditioning.encode_image_conditioning`.
    """
    check_video_size(width, height, frames)
    if not all_finite(image):
        raise NonFiniteError("the start image contains NaN/Inf; give an image with values in -1..1.")
    stride = getattr(vae, "space_stride", 8)
    guide = guide_video(image, frames, height, width)
    if vae_tile is None:
        latents = vae.encode(guide[None])[0].float().cpu()
    else:
        from .vae_tiling import encode_tiled

        latents = encode_tiled(vae, guide[None], tile=vae_tile)[0].float().cpu()
    mask = i2v_mask(frames, height // stride, width // stride)
    return ImageEmbeds(y=torch.cat([mask, latents]), clip_fea=None, width=width, height=height, frames=frames)
