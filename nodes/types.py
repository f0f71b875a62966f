"""What travels between the Wan Core nodes, and the names ComfyUI knows it by.

Models travel as the ``wan_core`` objects the loaders return, embeddings as the frozen
dataclasses of :mod:`wan_core.conditioning`; the one shape that has no ``wan_core`` type,
the size of a text-to-video run, is :class:`VideoSize` here. Type names are a contract of
saved workflows: never rename one.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLIP_VISION", "COMPILE", "DIT", "LORAS", "MAX_FRAMES", "MAX_SEED", "MAX_SIZE", "MEMORY_OPTIONS",
           "STEP_CACHE", "TEXT_EMBEDS", "TEXT_ENCODER", "VAE", "VIDEO_EMBEDS", "CompileOptions", "MemoryOptions",
           "StepCacheOptions", "VideoSize", "check_size"]

DIT = "WANCORE_DIT"                    # wan_core.dit.WanDiT
VAE = "WANCORE_VAE"                    # wan_core.vae.WanVAE
TEXT_ENCODER = "WANCORE_TEXT_ENCODER"  # wan_core.TextEncoder
CLIP_VISION = "WANCORE_CLIP_VISION"    # wan_core.clip_vision.CLIPVisionTower
TEXT_EMBEDS = "WANCORE_TEXT_EMBEDS"    # wan_core.TextEmbeds
VIDEO_EMBEDS = "WANCORE_VIDEO_EMBEDS"  # VideoSize (T2V) or wan_core.ImageEmbeds (I2V / FLF2V)
MEMORY_OPTIONS = "WANCORE_MEMORY_OPTIONS"  # MemoryOptions
LORAS = "WANCORE_LORAS"                # tuple of wan_core.LoraSpec, applied in order
STEP_CACHE = "WANCORE_STEP_CACHE"      # StepCacheOptions
COMPILE = "WANCORE_COMPILE"            # CompileOptions

MAX_SIZE = 4096           # pixels per side; Wan was trained up to 1280x720
MAX_FRAMES = 1025         # 4n+1; Wan was trained on 81
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class VideoSize:
    """Size of a text-to-video run: ``width`` x ``height`` pixels (multiples of 16), ``frames`` (4n+1)."""

    width: int
    height: int
    frames: int


@dataclass(frozen=True)
class MemoryOptions:
    """Memory settings of a run (WanCore Memory Options); the defaults are "auto" everywhere.

    vram_budget_gb: GPU memory the run may use, GiB; 0 = the free VRAM when the stage starts.
    resident_blocks: DiT blocks kept on the GPU while sampling (the rest are streamed in one
        block ahead); -1 = the planner's choice for the budget.
    text_encoder_on_cpu: "auto" (when umT5 does not fit the budget), "yes" or "no".
    vae_tile: "auto" (tile only when a frame does not fit the budget), "off" or "custom"
        (tiles of ``vae_tile_size`` pixels); used by WanCore Decode when its tiling is "auto".
    """

    vram_budget_gb: float = 0.0
    resident_blocks: int = -1
    text_encoder_on_cpu: str = "auto"
    vae_tile: str = "auto"
    vae_tile_size: int = 512

    @property
    def budget_bytes(self) -> int | None:
        """The user's budget in bytes, or None for "the free VRAM"."""
        return int(self.vram_budget_gb * (1 << 30)) if self.vram_budget_gb > 0 else None


@dataclass(frozen=True)
class StepCacheOptions:
    """A step cache request (WanCore Step Cache); a fresh cache is built for every sampling run.

    method: "teacache" or "magcache"; threshold < 0 = the recommended value for the model
    (TeaCache "e": 0.08 for 1.3B, 0.2 for 14B; MagCache 0.12); 0 never skips. start_step /
    end_step: -1 = the method's default; mode: TeaCache "e" or "e0"; magcache_k and
    retention_ratio: MagCache only.
    """

    method: str = "teacache"
    threshold: float = -1.0
    start_step: int = -1
    end_step: int = -1
    mode: str = "e"
    magcache_k: int = 2
    retention_ratio: float = 0.2


@dataclass(frozen=True)
class CompileOptions:
    """``torch.compile`` of the DiT blocks (WanCore Compile Options): backend, mode (None =
    the default), dynamic (None = auto). See :mod:`wan_core.compile`."""

    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool | None = None

    def kwargs(self) -> dict:
        return {"backend": self.backend, "mode": self.mode, "dynamic": self.dynamic}


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
