"""What a run is asked to be: the memory / speed options and the job's size.

:class:`RunOptions` (with :class:`StepCacheSpec` and :class:`CompileSpec`) is everything a
user may ask of a run's memory and speed, checked when it is built; :class:`Job` is what
the run makes (size, frames, steps). :mod:`wan_core.placement` turns both into decisions and
:mod:`wan_core.run_plan` applies them stage by stage; the names are re-exported there.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .attention import BACKENDS
from .lora import LoraSpec

__all__ = ["RunOptions", "StepCacheSpec", "CompileSpec", "Job", "STAGES", "WEIGHT_DTYPES"]

STAGES: tuple[str, ...] = ("text encoder", "image encode", "sampling", "decode")
WEIGHT_DTYPES: tuple[str, ...] = ("keep", "fp8_e4m3fn", "fp8_e5m2", "bf16", "fp16", "fp32")
_TEXT_ENCODER_DEVICES = ("auto", "cpu", "gpu")
_STEP_CACHES = ("teacache", "magcache")
_LATENT_CHANNELS = {8: 16, 16: 48}   # VAE space stride -> latent channels (Wan 2.1 VAE, Wan 2.2 VAE)


@dataclass(frozen=True)
class StepCacheSpec:
    """A step-cache request; a fresh cache is built for every sampling run.

    method: "teacache" | "magcache". threshold: None = the published recommendation for the
    model (TeaCache "e": 0.08 for 1.3B, 0.2 for 14B; MagCache 0.12); 0 never skips.
    start_step / end_step: None = the method's default. mode: TeaCache "e" | "e0".
    magcache_k, retention_ratio: MagCache only.
    """

    method: str = "teacache"
    threshold: float | None = None
    start_step: int | None = None
    end_step: int | None = None
    mode: str = "e"
    magcache_k: int = 2
    retention_ratio: float = 0.2

    def __post_init__(self) -> None:
        if self.method not in _STEP_CACHES:
            raise ValueError(f"step cache method must be one of {', '.join(_STEP_CACHES)}; got {self.method!r}")
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"step cache threshold must be >= 0 (or None for the recommended value); "
                             f"got {self.threshold!r}")


@dataclass(frozen=True)
class CompileSpec:
    """``torch.compile`` of the DiT blocks: backend, mode (None = default), dynamic (None = auto)."""

    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool | None = None


@dataclass(frozen=True)
class RunOptions:
    """Everything a user may ask of a run's memory and speed; the defaults are "auto".

    vram_budget: bytes of GPU memory the run may use; None = the device's free memory.
    resident_blocks: DiT blocks kept on the GPU while sampling; None = the planner's choice.
    weight_dtype: DiT storage when ``generate()`` loads it from a path: None/"keep" (as in the
        file; fp8 stays fp8), "fp8_e4m3fn", "fp8_e5m2", "bf16", "fp16", "fp32".
    text_encoder_device: "auto" | "cpu" | "gpu".
    vae_tile: "auto" | "off" | an int tile side in pixels (multiple of 8), for the VAE decode
        and the image-encode stage's VAE encode alike.
    loras: applied unmerged for the run, removed afterwards.
    step_cache / compile: None = off.
    attention: the DiT's attention kernel when ``generate()`` loads it from a path
        (:data:`wan_core.attention.BACKENDS`); a loaded DiT keeps its own.
    """

    vram_budget: int | None = None
    resident_blocks: int | None = None
    weight_dtype: str | None = None
    text_encoder_device: str = "auto"
    vae_tile: str | int = "auto"
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    step_cache: StepCacheSpec | None = None
    compile: CompileSpec | None = None
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", tuple(self.loras))   # a list is fine to pass; store it frozen
        if self.vram_budget is not None and not self.vram_budget > 0:
            raise ValueError(f"vram_budget must be a positive number of bytes (or None for the free VRAM); "
                             f"got {self.vram_budget!r}")
        if self.resident_blocks is not None and self.resident_blocks < 0:
            raise ValueError(f"resident_blocks must be >= 0 (or None for the planner's choice); "
                             f"got {self.resident_blocks}")
        if self.weight_dtype is not None and self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}; got {self.weight_dtype!r}")
        if self.text_encoder_device not in _TEXT_ENCODER_DEVICES:
            raise ValueError(f"text_encoder_device must be one of {', '.join(_TEXT_ENCODER_DEVICES)}; "
                             f"got {self.text_encoder_device!r}")
        tile = self.vae_tile
        if not (tile in ("auto", "off") or (isinstance(tile, int) and not isinstance(tile, bool) and tile >= 8)):
            raise ValueError(f"vae_tile must be 'auto', 'off' or a tile side in pixels (>= 8, a multiple of 8); "
                             f"got {tile!r}")
        if not all(isinstance(s, LoraSpec) for s in self.loras):
            raise ValueError("loras must be LoraSpec(path, strength) values")
        if self.attention not in BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(BACKENDS)}; got {self.attention!r}")


@dataclass(frozen=True)
class Job:
    """What a run makes: ``width`` x ``height`` pixels (multiples of 16), ``frames`` (4n+1), the
    number of sampling ``steps`` when known (for the log), and whether the run VAE-encodes a
    video of this size on the device (``encode_video``: the I2V / FLF2V guide video, the V2V
    input video, the TI2V first frame), so the plan sizes that stage too. ``space_stride``:
    the VAE's pixels per latent pixel, 8 (Wan 2.1 VAE, 16 latent channels) or 16 (Wan 2.2
    VAE of TI2V-5B, 48 channels); :func:`wan_core.run_plan.prepare_run` sets 16 for a
    48-channel DiT. ``per_token_timesteps``: TI2V image-to-video (the first frame pinned,
    :class:`wan_core.ti2v.FirstFrameRunner`), whose per-token time embeddings the plan counts
    (also assumed for a TI2V job with ``encode_video``)."""

    width: int
    height: int
    frames: int
    steps: int | None = None
    encode_video: bool = False
    space_stride: int = 8
    per_token_timesteps: bool = False

    def __post_init__(self) -> None:
        if self.space_stride not in _LATENT_CHANNELS:
            raise ValueError(f"Job.space_stride must be 8 (Wan 2.1 VAE) or 16 (Wan 2.2 VAE); got {self.space_stride!r}")

    @classmethod
    def from_latent_shape(cls, shape: Sequence[int], steps: int | None = None, encode_video: bool = False) -> Job:
        """The job of normalised latents ``(16, T', H/8, W/8)``, or ``(48, T', H/16, W/16)``
        (Wan 2.2 VAE: told by the 48 channels)."""
        from .conditioning import TIME_STRIDE

        t, h, w = (int(v) for v in shape[-3:])
        stride = 16 if len(shape) >= 4 and int(shape[-4]) == _LATENT_CHANNELS[16] else 8
        return cls(w * stride, h * stride, (t - 1) * TIME_STRIDE + 1, steps, encode_video, stride)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(16, T', H/8, W/8)`` (``(48, T', H/16, W/16)`` with ``space_stride`` 16)."""
        from .conditioning import latent_shape

        _c, t, h, w = latent_shape(self.width, self.height, self.frames)
        s = self.space_stride // 8
        return _LATENT_CHANNELS[self.space_stride], t, h // s, w // s

    def tokens(self, patch_size: Sequence[int] = (1, 2, 2)) -> int:
        """DiT tokens of one evaluation: the latent grid over the patch."""
        _c, t, h, w = self.latent_shape
        pt, ph, pw = patch_size
        return (t // pt) * (h // ph) * (w // pw)

    def describe(self) -> str:
        steps = f", {self.steps} steps" if self.steps is not None else ""
        return f"{self.width}x{self.height}, {self.frames} frames{steps}"
