"""What travels between the Wan Core nodes, and the names ComfyUI knows it by.

Models travel as the ``wan_core`` objects the loaders return (the DiT with the loader's
memory options, :class:`LoadedDiT`), embeddings as the frozen dataclasses of
:mod:`wan_core.conditioning`, step-cache and compile requests as the ``wan_core.run_plan``
specs; what has no ``wan_core`` type (the size of a text-to-video run, the memory widgets)
is defined here. Type names are a contract of saved workflows: never rename one.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLIP_VISION", "COMPILE", "CONTEXT_OPTIONS", "DIT", "GUIDANCE_OPTIONS", "LORAS", "MAX_CFG", "MAX_FRAMES", "MAX_SEED", "MAX_SHIFT", "MAX_SIZE",
           "MAX_STEPS", "MEMORY_OPTIONS", "MIN_CFG",
           "LATENT_CHANNELS", "SAMPLERS", "VAE_SPACE_STRIDE",
           "STEP_CACHE", "TEXT_EMBEDS", "TEXT_ENCODER", "VAE", "VIDEO_EMBEDS", "LoadedDiT", "MemoryOptions",
           "VideoSize", "check_size", "MULTI_GPU", "MOE_OPTIONS", "MoESettings", "FirstFrameEmbeds"]

DIT = "WANCORE_DIT"                    # LoadedDiT (a wan_core.dit.WanDiT + the loader's memory options)
VAE = "WANCORE_VAE"                    # wan_core.vae.WanVAE
TEXT_ENCODER = "WANCORE_TEXT_ENCODER"  # wan_core.TextEncoder
CLIP_VISION = "WANCORE_CLIP_VISION"    # wan_core.clip_vision.CLIPVisionTower
TEXT_EMBEDS = "WANCORE_TEXT_EMBEDS"    # wan_core.TextEmbeds
VIDEO_EMBEDS = "WANCORE_VIDEO_EMBEDS"  # VideoSize (T2V), wan_core.ImageEmbeds (I2V / FLF2V / I2V-A14B),
                                       # wan_core.VaceEmbeds, FunControlEmbeds (Wan2.1-Fun Control) or
                                       # FirstFrameEmbeds (TI2V-5B image to video); Fun InP takes ImageEmbeds
MEMORY_OPTIONS = "WANCORE_MEMORY_OPTIONS"  # MemoryOptions
LORAS = "WANCORE_LORAS"                # tuple of wan_core.LoraSpec, applied in order
STEP_CACHE = "WANCORE_STEP_CACHE"      # wan_core.StepCacheSpec
COMPILE = "WANCORE_COMPILE"            # wan_core.CompileSpec
CONTEXT_OPTIONS = "WANCORE_CONTEXT_OPTIONS"    # wan_core.context_windows.ContextOptions
GUIDANCE_OPTIONS = "WANCORE_GUIDANCE_OPTIONS"  # wan_core.guidance.GuidanceOptions
MULTI_GPU = "WANCORE_MULTI_GPU"        # wan_core.PoolConfig (WanCore Multi-GPU Options)
MOE_OPTIONS = "WANCORE_MOE_OPTIONS"    # MoESettings (Wan 2.2 A14B expert switch and per-expert guidance)

# Widget limits: the values of wan_core.limits (repeated so that importing the pack imports no
# engine; tests/unit/test_limits.py checks that they agree).
MAX_SIZE = 4096           # pixels per side; Wan was trained up to 1280x720
MAX_FRAMES = 1025         # 4n+1; Wan was trained on 81
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
MAX_STEPS = 1000
MIN_CFG, MAX_CFG = 0.0, 100.0
MAX_SHIFT = 100.0
# Engine constants, repeated for the same reason (tests/unit/test_limits.py checks them too):
SAMPLERS: tuple[str, ...] = ("unipc", "dpm++", "euler")   # wan_core.schedulers.SAMPLERS, in this order
LATENT_CHANNELS = 16      # wan_core.configs.LATENT_CHANNELS
VAE_SPACE_STRIDE = 8      # wan_core.configs.VAE_SPACE_STRIDE: video pixels per latent pixel


@dataclass(frozen=True)
class VideoSize:
    """Size of a text-to-video run: ``width`` x ``height`` pixels (multiples of 16), ``frames`` (4n+1)."""

    width: int
    height: int
    frames: int


@dataclass(frozen=True)
class MoESettings:
    """The widgets of WanCore MoE Options: None = the published value for the model
    (``wan_core.moe_for`` resolves them once the experts are known)."""

    boundary: float | None = None
    cfg_high_noise: float | None = None
    cfg_low_noise: float | None = None


@dataclass(frozen=True, eq=False)
class FirstFrameEmbeds:
    """Wan 2.2 TI2V-5B image to video: the first frame's normalised latents
    ``[48, 1, height/16, width/16]`` (Wan 2.2 VAE) and the size of the video."""

    latents: object                    # torch.Tensor, float32 on the CPU
    width: int
    height: int
    frames: int


@dataclass(frozen=True, eq=False)
class LoadedDiT:
    """What WanCore Load Diffusion Model outputs: the model and the loader's memory options,
    the default of every sampler of this model whose own 'memory' input is not connected."""

    model: object                      # wan_core.dit.WanDiT, resting on the offload device
    memory: MemoryOptions | None = None
    source: object | None = None       # wan_core.DiTSource: how to load it again (multi-GPU workers)


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


def check_size(width=None, height=None, frames=None) -> bool | str:
    """``VALIDATE_INPUTS`` body for width / height / frames widgets: True or the error text.

    A linked (not yet computed) value arrives as None and is checked at run time instead.
    ComfyUI skips its own min/max checks for inputs a VALIDATE_INPUTS names; the engine's
    check covers the upper bounds too (:mod:`wan_core.limits`).
    """
    from ..wan_core import check_video_size

    if width is None or height is None or frames is None:
        return True
    try:
        check_video_size(int(width), int(height), int(frames))
    except ValueError as err:
        return str(err)
    return True
