"""What travels between the Wan Core nodes, and the names ComfyUI knows it by.

Models travel as the ``wan_core`` objects the loaders return, embeddings as the frozen
dataclasses of :mod:`wan_core.conditioning`; the one shape that has no ``wan_core`` type,
the size of a text-to-video run, is :class:`VideoSize` here. Type names are a contract of
saved workflows: never rename one.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DIT", "VAE", "TEXT_ENCODER", "CLIP_VISION", "TEXT_EMBEDS", "VIDEO_EMBEDS", "VideoSize",
           "MAX_SIZE", "MAX_FRAMES", "MAX_SEED", "check_size"]

DIT = "WANCORE_DIT"                    # wan_core.dit.WanDiT
VAE = "WANCORE_VAE"                    # wan_core.vae.WanVAE
TEXT_ENCODER = "WANCORE_TEXT_ENCODER"  # wan_core.TextEncoder
CLIP_VISION = "WANCORE_CLIP_VISION"    # wan_core.clip_vision.CLIPVisionTower
TEXT_EMBEDS = "WANCORE_TEXT_EMBEDS"    # wan_core.TextEmbeds
VIDEO_EMBEDS = "WANCORE_VIDEO_EMBEDS"  # VideoSize (T2V) or wan_core.ImageEmbeds (I2V / FLF2V)

MAX_SIZE = 4096           # pixels per side; Wan was trained up to 1280x720
MAX_FRAMES = 1025         # 4n+1; Wan was trained on 81
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class VideoSize:
    """Size of a text-to-video run: ``width`` x ``height`` pixels (multiples of 16), ``frames`` (4n+1)."""

    width: int
    height: int
    frames: int


def check_size(width=None, height=None, frames=None) -> bool | str:
    """``VALIDATE_INPUTS`` body for width / height / frames widgets: True or the error text.

    A linked (not yet computed) value arrives as None and is checked at run time instead.
    ComfyUI skips its own min/max checks for inputs a VALIDATE_INPUTS names, so the upper
    bounds are checked here too.
    """
    from ..wan_core import check_video_size

    if width is None or height is None or frames is None:
        return True
    try:
        check_video_size(int(width), int(height), int(frames))
    except ValueError as err:
        return str(err)
    too_big = [f"{n} {v} is above {m}" for n, v, m in (("width", width, MAX_SIZE), ("height", height, MAX_SIZE),
                                                         ("frames", frames, MAX_FRAMES)) if int(v) > m]
    return "; ".join(too_big) + "." if too_big else True
