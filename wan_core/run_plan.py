"""The run plan: one engine object that turns models, a job and options into a placed run.

CONTRACT SKELETON (lead): the dataclasses below are the agreed interface between the CLI,
``generate()`` and the nodes. The helper owning issue 11 part 1 fills in ``prepare_run``
and may add fields at the end, but must not rename these.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .lora import LoraSpec

__all__ = ["RunOptions", "StepCacheSpec", "CompileSpec"]


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
    vae_tile: "auto" | "off" | an int tile side in pixels (multiple of 8).
    loras: applied unmerged for the run, removed afterwards.
    step_cache / compile: None = off.
    """

    vram_budget: int | None = None
    resident_blocks: int | None = None
    weight_dtype: str | None = None
    text_encoder_device: str = "auto"
    vae_tile: str | int = "auto"
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    step_cache: StepCacheSpec | None = None
    compile: CompileSpec | None = None
