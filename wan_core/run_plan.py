"""The run plan: one engine object that turns models, a job and options into a placed run.

A job runs in four stages, one after the other, each alone on the compute device (the
models rest on the offload device, the CPU, and get device copies of their weights only
while their stage runs, through :func:`wan_core.offload.on_device` or block swap):

=================  ==================================================================
``text encoder``   umT5 on the device, or on the CPU when it does not fit the budget
``image encode``   VAE (+ CLIP vision) for the I2V / FLF2V guide or the V2V input video,
                   the encode tiled in space when a frame does not fit the budget
``sampling``       the DiT: LoRAs unmerged, block swap (K resident blocks) or in place,
                   a fresh step cache, compiled blocks
``decode``         the VAE, tiled in space when a frame does not fit the budget
=================  ==================================================================

This module is the only place memory / speed policy lives. On a GPU every decision comes
from the planner's figures (:func:`wan_core.planner.plan_memory`; the VAE stages through
its :func:`wan_core.planner.plan_vae`, so the tiles a stage uses are the memory plan's), with
the planner's reserve kept free.

Each stage logs one line when it starts: ``wan_core plan: <stage>: <decision>``.
``generate()``, the CLI and the ComfyUI nodes all go through these functions, so an option
means the same thing everywhere::

    job = Job(832, 480, 81, encode_video=True)      # I2V: the guide video is encoded too
    with prepare_run(dit, job, RunOptions(vram_budget=8 << 30), "cuda", vae=vae, clip_vision=clip) as plan:
        with plan.text_encoder(te):
            pos, neg = te.encode([prompt, negative])
        with plan.image_encode(vae, clip) as tiles:
            image = encode_image_conditioning(vae, clip, img, 81, 832, 480, vae_tile=tiles.tile)
        with plan.sampling() as runner:
            latents = sample(dit, TextEmbeds(pos, neg), settings, image=image, runner=runner)
        with plan.decode(vae) as tiling:
            video = decode_tiled(vae, latents[None], output_device="cpu", **tiling.kwargs())

Every stage undoes its placement on exit, also on an error or an interrupt; the sampling
stage releases the block swap before it removes the LoRAs (hooks live on the masters).
Decisions are made from the budget: ``options.vram_budget``, else ``free_bytes`` (the host's
figure), else the free memory of a CUDA device; on the CPU nothing is budgeted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import BACKENDS
from .configs import VAE_SPACE_STRIDE
from .lora import LoraSpec

__all__ = ["RunOptions", "StepCacheSpec", "CompileSpec", "Job", "RunPlan", "prepare_run", "STAGES",
           "SamplingPlacement", "StagePlacement", "DecodeTiling", "EncodeTiling", "CompiledModels", "plan_sampling",
           "place_text_encoder", "plan_encode", "plan_decode", "recommended_threshold", "build_step_cache",
           "text_encoder_stage", "image_encode_stage", "decode_stage", "WEIGHT_DTYPES", "stage_bytes"]

log = logging.getLogger("wan_core")

STAGES: tuple[str, ...] = ("text encoder", "image encode", "sampling", "decode")
WEIGHT_DTYPES: tuple[str, ...] = ("keep", "fp8_e4m3fn", "fp8_e5m2", "bf16", "fp16", "fp32")
_TEXT_ENCODER_DEVICES = ("auto", "cpu", "gpu")
_STEP_CACHES = ("teacache", "magcache")
GiB = 1 << 30


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
    input video), so the plan sizes that stage too."""

    width: int
    height: int
    frames: int
    steps: int | None = None
    encode_video: bool = False

    @classmethod
    def from_latent_shape(cls, shape: Sequence[int], steps: int | None = None, encode_video: bool = False) -> Job:
        """The job of normalised latents ``(16, T', H/8, W/8)``."""
        from .conditioning import SPACE_STRIDE, TIME_STRIDE

        t, h, w = (int(v) for v in shape[-3:])
        return cls(w * SPACE_STRIDE, h * SPACE_STRIDE, (t - 1) * TIME_STRIDE + 1, steps, encode_video)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(16, T', H/8, W/8)``."""
        from .conditioning import latent_shape

        return latent_shape(self.width, self.height, self.frames)

    def tokens(self, patch_size: Sequence[int] = (1, 2, 2)) -> int:
        """DiT tokens of one evaluation: the latent grid over the patch."""
        _c, t, h, w = self.latent_shape
        pt, ph, pw = patch_size
        return (t // pt) * (h // ph) * (w // pw)

    def describe(self) -> str:
        steps = f", {self.steps} steps" if self.steps is not None else ""
        return f"{self.width}x{self.height}, {self.frames} frames{steps}"


# --------------------------------------------------------------------------- decisions (pure)

@dataclass(frozen=True)
class SamplingPlacement:
    """Where the DiT runs while sampling.

    resident_blocks: K blocks kept on ``device`` (the rest streamed from ``offload_device``
    by :class:`wan_core.offload.BlockSwap`); None = in place (every weight gets a copy on
    ``device`` for the stage, or is used where it is). memory: the planner's decision when
    a budget chose K.
    """

    device: torch.device
    offload_device: torch.device
    num_blocks: int
    resident_blocks: int | None
    reason: str
    memory: object | None = None     # wan_core.planner.MemoryPlan

    def describe(self) -> str:
        if self.resident_blocks is None:
            where = f"DiT in place on {self.device}"
        elif self.resident_blocks >= self.num_blocks:
            where = f"all {self.num_blocks} DiT blocks resident on {self.device}"
        else:
            where = (f"{self.resident_blocks}/{self.num_blocks} DiT blocks resident on {self.device}, "
                     f"{self.num_blocks - self.resident_blocks} streamed from {self.offload_device}")
        return f"{where} ({self.reason})"


@dataclass(frozen=True)
class StagePlacement:
    """The device of one stage's model, and why."""

    device: torch.device
    reason: str


@dataclass(frozen=True)
class DecodeTiling:
    """How the VAE decodes: ``tile`` in latent pixels (an int: the memory plan's tile or the
    user's; None: untiled; "auto": :mod:`wan_core.vae_tiling`'s own rule within ``budget``
    bytes, or half the available RAM when None, as on the CPU), on ``device``."""

    device: torch.device
    tile: str | int | None
    budget: int | None
    reason: str

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`wan_core.vae_tiling.decode_tiled`."""
        return {"tile": self.tile} if self.budget is None else {"tile": self.tile, "budget": self.budget}

    def describe(self) -> str:
        return f"VAE on {self.device}, {_describe_tile(self.tile, self.budget)} ({self.reason})"


def _describe_tile(tile: str | int | None, budget: int | None) -> str:
    if tile is None:
        return "untiled"
    if isinstance(tile, int):
        return f"tiles of {tile} latent px"
    if budget is None:
        return "auto tiles (within half the available RAM)"
    return f"auto tiles within {budget / GiB:.2f} GiB of activations"


@dataclass(frozen=True)
class EncodeTiling:
    """How the VAE encodes a video of the image-encode stage (the I2V / FLF2V guide video, the
    V2V input video): ``tile`` as in :class:`DecodeTiling`, on ``device``.

    ``kwargs()`` for :func:`wan_core.vae_tiling.encode_tiled`; ``tile`` is the ``vae_tile`` of
    :func:`wan_core.conditioning.encode_image_conditioning`."""

    device: torch.device
    tile: str | int | None
    budget: int | None
    reason: str

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`wan_core.vae_tiling.encode_tiled`."""
        return {"tile": self.tile} if self.budget is None else {"tile": self.tile, "budget": self.budget}

    def describe(self) -> str:
        return f"{_describe_tile(self.tile, self.budget)} ({self.reason})"


def _budget(options: RunOptions, device: torch.device, free_bytes: int | None) -> tuple[int | None, str]:
    """The bytes a stage may use and what they are: the user's budget, else the free VRAM."""
    if options.vram_budget is not None:
        return options.vram_budget, "budget"
    if device.type != "cuda":
        return None, ""
    if free_bytes is None:
        from .planner import free_vram_bytes

        free_bytes = free_vram_bytes(device)
    return free_bytes, "free VRAM"


def _rests_on(module: nn.Module, device: torch.device) -> bool:
    p = next(module.parameters(), None)
    return p is not None and p.device.type == device.type and device.index in (None, p.device.index)


def _compute_bytes(dit) -> int:
    """Bytes per element of the dtype the DiT's Linears compute in on a GPU."""
    cd = dit.compute_dtype
    if cd is None:
        w = dit.text_embedding[0].weight
        cd = w.dtype if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
    return torch.empty((), dtype=cd).element_size()


def plan_sampling(dit, job: Job, options: RunOptions, device: torch.device | str,
                  offload_device: torch.device | str = "cpu", free_bytes: int | None = None, *,
                  vae=None, clip_vision=None) -> SamplingPlacement:
    """Block swap or in place for sampling ``dit`` on ``job``.

    A GPU compute device with the model resting elsewhere gets block swap with K from
    ``options.resident_blocks`` or, when None, from :func:`wan_core.planner.plan_memory` on
    the budget; given ``vae`` / ``clip_vision`` (modules or weight bytes), that plan also
    sizes the VAE decode and, for an ``encode_video`` job, the image-encode stage (its tiles
    are the ones :func:`plan_encode` / :func:`plan_decode` choose), so a budget too small
    for them is refused here too. The CPU runs in place, except that an explicit ``resident_blocks`` there
    runs the same swap bookkeeping (same numbers). Raises :class:`wan_core.PlanError` when the
    user's budget cannot run the job; when only the free VRAM falls short of the (high-side)
    estimate, every block is streamed (K = 0) with a warning.
    """
    from .planner import PlanError, dit_sizes_from_module, plan_memory

    device, offload = torch.device(device), torch.device(offload_device)
    n = len(dit.blocks)
    k = options.resident_blocks

    def placed(resident, reason, memory=None) -> SamplingPlacement:
        return SamplingPlacement(device, offload, n, resident, reason, memory)

    if device.type != "cuda":
        if k is None:
            return placed(None, "no GPU")
        return placed(min(k, n), "explicit resident_blocks")
    if offload.type == "cuda" or _rests_on(dit, device):   # --highvram, or a model the caller put there
        return placed(None, "the weights rest on the GPU")
    if k is not None:
        return placed(min(k, n), "explicit resident_blocks")
    budget, what = _budget(options, device, free_bytes)
    if budget is None:
        return placed(n, "no budget known")
    compute = _compute_bytes(dit)
    vae_bytes = _weight_bytes(vae)
    try:
        plan = plan_memory(budget, dit_sizes_from_module(dit, compute), job.tokens(dit.cfg.patch_size),
                           attention=dit.attention_backend, compute_bytes=compute, vae_bytes=vae_bytes,
                           latent_hw=tuple(job.latent_shape[-2:]) if vae_bytes else None,
                           clip_vision_bytes=_weight_bytes(clip_vision), encode_video=job.encode_video)
    except PlanError as err:
        if options.vram_budget is not None:
            raise   # the user's own budget: say it cannot work
        log.warning("wan_core: %s Trying with every block streamed.", err)
        return placed(0, f"the free VRAM {budget / GiB:.2f} GiB is below the estimate")
    reason = (f"{what} {budget / GiB:.2f} GiB; planned peak {plan.dit_peak_bytes / GiB:.2f} GiB for "
              f"{plan.tokens} tokens, {plan.attention}")
    return placed(plan.resident_blocks, reason, plan)


def place_text_encoder(text_encoder, options: RunOptions, device: torch.device | str,
                       free_bytes: int | None = None) -> StagePlacement:
    """Where umT5 runs: ``options.text_encoder_device`` "cpu" / "gpu" (the compute device), or
    "auto": the compute device unless it is a GPU and the weights + workspace + reserve
    exceed the budget. ``text_encoder``: a TextEncoder, a module, or its weight bytes."""
    from .offload import module_bytes
    from .planner import DEFAULT_RESERVE, TEXT_ENCODER_WORKSPACE

    device, cpu = torch.device(device), torch.device("cpu")
    choice = options.text_encoder_device
    if choice == "cpu":
        return StagePlacement(cpu, "asked for the CPU")
    if choice == "gpu" or device.type != "cuda":
        return StagePlacement(device, "asked for the GPU" if choice == "gpu" else "no GPU")
    budget, what = _budget(options, device, free_bytes)
    if isinstance(text_encoder, int):
        weights = text_encoder
    else:
        weights = module_bytes(getattr(text_encoder, "model", text_encoder))
    need = weights + TEXT_ENCODER_WORKSPACE + DEFAULT_RESERVE
    if budget is None:
        return StagePlacement(device, "no budget known")
    fits = need <= budget
    return StagePlacement(device if fits else cpu,
                          f"{weights / GiB:.2f} GiB weights + workspace and reserve {'fit' if fits else 'exceed'} "
                          f"the {what} {budget / GiB:.2f} GiB")


def _weight_bytes(model) -> int:
    """Weight bytes of a module (or a text encoder / CLIP tower wrapping one), an int as it
    is, 0 for None."""
    from .offload import module_bytes

    if model is None:
        return 0
    if isinstance(model, int):
        return model
    return module_bytes(getattr(model, "model", model))


def _latent_tthw(job) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a :class:`Job` or of a latent shape
    ``(..., T', h, w)`` (taken as it is: a decode accepts any latent)."""
    if isinstance(job, Job):
        _c, t, h, w = job.latent_shape
        return t, h, w
    t, h, w = (int(v) for v in job[-3:])
    return t, h, w


def _vae_stage(stage: str, vae, job, options: RunOptions, device: torch.device, free_bytes: int | None,
               clip_vision=None) -> tuple[str | int | None, int | None, str]:
    """(tile, budget for "auto", reason) of a VAE stage ("decode" or "encode")."""
    from .planner import DEFAULT_RESERVE, PlanError, plan_vae

    tile = options.vae_tile
    if tile == "off":
        return None, None, "tiling off"
    if isinstance(tile, int):
        return max(1, tile // VAE_SPACE_STRIDE), None, f"asked for {tile} px"
    budget, what = _budget(options, device, free_bytes)
    if budget is None or device.type != "cuda":   # on the CPU nothing is budgeted
        return "auto", None, "no GPU"
    if job is None:
        raise ValueError(f"the VAE {stage} plan on {device} needs the job (a Job or the latent shape)")
    t, h, w = _latent_tthw(job)
    encode = stage == "encode"
    weights = _weight_bytes(vae)
    vae_plan = plan_vae(budget, weights, (h, w), t, clip_vision_bytes=_weight_bytes(clip_vision) if encode else 0,
                        encode_video=encode)
    chosen, peak = ((vae_plan.encode_tile, vae_plan.encode_peak) if encode
                    else (vae_plan.decode_tile, vae_plan.decode_peak))
    reason = (f"{what} {budget / GiB:.2f} GiB - reserve {DEFAULT_RESERVE / GiB:.2f} GiB; planned peak "
              f"{peak / GiB:.2f} GiB with {weights / GiB:.2f} GiB weights")
    minimum = vae_plan.minimum + DEFAULT_RESERVE
    if budget < minimum:
        message = (f"a budget of {budget / GiB:.2f} GiB cannot run the VAE {stage} of a {w * VAE_SPACE_STRIDE}x"
                   f"{h * VAE_SPACE_STRIDE} frame: the minimum is {minimum / GiB:.2f} GiB with the smallest tile.")
        if options.vram_budget is not None:
            raise PlanError(message + " Lower the resolution or free GPU memory.")
        log.warning("wan_core: %s Trying the smallest tile.", message)
    return chosen, None, reason


def plan_encode(vae, options: RunOptions, device: torch.device | str, free_bytes: int | None = None, *,
                job: Job | Sequence[int] | None = None, clip_vision=None) -> EncodeTiling:
    """How the VAE encodes the video of the image-encode stage (``job``: its size; the I2V /
    FLF2V guide video with ``clip_vision`` on the device too, or the V2V input video).

    ``options.vae_tile`` "off" (untiled), N pixels (tiles of N // 8 latent px), or "auto": on a
    GPU the memory plan's encode tile (:func:`wan_core.planner.plan_vae`, the same figures as
    :func:`wan_core.planner.plan_memory`'s ``vae_encode_tile``) for the budget (the user's,
    else the free VRAM) minus the planner's reserve; on the CPU
    :func:`wan_core.vae_tiling.encode_tiled`'s default (half the available RAM: untiled
    whenever a frame fits). ``vae`` / ``clip_vision``: modules or weight bytes. Raises
    :class:`wan_core.PlanError` when the user's budget cannot hold even the smallest tile."""
    device = torch.device(device)
    tile, budget, reason = _vae_stage("encode", vae, job, options, device, free_bytes, clip_vision)
    return EncodeTiling(device, tile, budget, reason)


def plan_decode(vae, options: RunOptions, device: torch.device | str, free_bytes: int | None = None, *,
                job: Job | Sequence[int] | None = None) -> DecodeTiling:
    """How the VAE decodes the latents of ``job`` (a :class:`Job` or the latent shape
    ``(..., T', h, w)``): ``options.vae_tile`` "off" (untiled), N pixels (tiles of N // 8
    latent px), or "auto": on a GPU the memory plan's decode tile (:func:`wan_core.planner.plan_vae`,
    the same figures as :func:`wan_core.planner.plan_memory`'s ``vae_tile``: untiled when the
    frame and the output video fit) for the budget (the user's, else the free VRAM) minus the
    planner's reserve; on the CPU :func:`wan_core.vae_tiling.decode_tiled`'s default (half
    the available RAM). ``vae``: a module or its weight bytes. Raises
    :class:`wan_core.PlanError` when the user's budget cannot hold even the smallest tile."""
    device = torch.device(device)
    tile, budget, reason = _vae_stage("decode", vae, job, options, device, free_bytes)
    return DecodeTiling(device, tile, budget, reason)


def stage_bytes(stage: str, models, options: RunOptions | None = None, job: Job | Sequence[int] | None = None) -> int:
    """Device bytes ``stage`` (one of :data:`STAGES`) uses with everything it may place on the
    device there (untiled VAE, every DiT block resident unless ``options.resident_blocks``
    says fewer), the planner's reserve included, at most ``options.vram_budget``: what a host
    should make room for before the stage. The stage then plans against the free VRAM it
    finds, so less room means more streaming or tiling, not a failure. 0 when the options
    keep the stage off the device.

    models: the stage's model, or for "image encode" a sequence (the VAE, CLIP vision);
    job: a :class:`Job` or a latent shape; "sampling" needs it, the VAE stages use it to
    size the frame (without it: weights + reserve).
    """
    from .planner import (DEFAULT_RESERVE, TEXT_ENCODER_WORKSPACE, dit_activation_bytes, dit_sizes_from_module,
                          plan_vae, vae_decode_bytes)
    from .vae import WanVAE

    options = options or RunOptions()
    if stage == "text encoder":
        if options.text_encoder_device == "cpu":
            return 0
        need = _weight_bytes(models) + TEXT_ENCODER_WORKSPACE
    elif stage == "sampling":
        if job is None:
            raise ValueError("stage_bytes('sampling', ...) needs the job")
        job = job if isinstance(job, Job) else Job.from_latent_shape(job)
        compute = _compute_bytes(models)
        sizes = dit_sizes_from_module(models, compute)
        blocks, k = sizes.block_bytes, options.resident_blocks
        k = len(blocks) if k is None else min(k, len(blocks))
        streamed = sum(sorted(blocks[k:], reverse=True)[:2])   # the block swap keeps two in flight
        need = sizes.other_bytes + sum(blocks[:k]) + streamed + dit_activation_bytes(
            sizes, job.tokens(models.cfg.patch_size), models.attention_backend, compute)
    elif stage in ("image encode", "decode"):
        modules = [m for m in (models if stage == "image encode" else [models]) if m is not None]
        vae = next((m for m in modules if isinstance(m, WanVAE)), None)
        weights = sum(_weight_bytes(m) for m in modules)
        need = weights
        if job is not None and vae is not None:
            t, h, w = _latent_tthw(job)
            clip = weights - _weight_bytes(vae)
            whole = plan_vae(1 << 62, _weight_bytes(vae), (h, w), t, clip_vision_bytes=clip,
                             encode_video=stage == "image encode")
            need = max(whole.encode_peak, whole.clip_stage) if stage == "image encode" else whole.decode_peak
            if stage == "decode" and isinstance(options.vae_tile, int):
                side = max(1, options.vae_tile // VAE_SPACE_STRIDE)
                need = vae_decode_bytes(weights, (min(h, side), min(w, side)))
    else:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
    need += DEFAULT_RESERVE
    return need if options.vram_budget is None else min(need, options.vram_budget)


def recommended_threshold(spec: StepCacheSpec, cfg) -> float:
    """``spec.threshold``, or when None the published recommendation for ``cfg`` (TeaCache
    "e": 0.08 for 1.3B, 0.2 for 14B; MagCache 0.12)."""
    if spec.threshold is not None:
        return spec.threshold
    if spec.method == "magcache":
        return 0.12
    return 0.08 if cfg.dim < 3072 else 0.2


def build_step_cache(spec: StepCacheSpec | None, dit):
    """A fresh :class:`wan_core.TeaCache` / :class:`wan_core.MagCache` for one run, or None."""
    if spec is None:
        return None
    from .step_cache import MagCache, TeaCache

    threshold = recommended_threshold(spec, dit.cfg)
    if spec.method == "magcache":
        return MagCache.for_model(dit, threshold, k=spec.magcache_k, retention_ratio=spec.retention_ratio,
                                  start_step=spec.start_step, end_step=spec.end_step)
    return TeaCache.for_model(dit, threshold, mode=spec.mode, start_step=spec.start_step, end_step=spec.end_step)


def _describe_speed(options: RunOptions, dit) -> str:
    parts = []
    if options.loras:
        parts.append(f"{len(options.loras)} LoRA{'s' if len(options.loras) > 1 else ''} unmerged")
    if options.step_cache is not None:
        s = options.step_cache
        parts.append(f"{s.method} threshold {recommended_threshold(s, dit.cfg):g}")
    if options.compile is not None:
        parts.append(f"compiled ({options.compile.backend})")
    return "; " + ", ".join(parts) if parts else ""


# --------------------------------------------------------------------------- compiled state

class CompiledModels:
    """Compiled DiT blocks kept between runs (recompiling costs minutes), per model.

    Owned by the caller (a ComfyUI pack, a session); models are held weakly. ``apply(dit,
    spec)`` compiles when asked for, keeps the compilation while the spec stays the same,
    and restores the plain blocks when the spec changes or is None.
    """

    def __init__(self) -> None:
        self._handles: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()

    def get(self, dit: nn.Module):
        """The :class:`wan_core.compile.CompiledBlocks` of ``dit``, or None when plain."""
        return self._handles.get(dit)

    def apply(self, dit: nn.Module, spec: CompileSpec | None):
        from .compile import compile_blocks

        handle = self._handles.get(dit)
        want = None if spec is None else {"backend": spec.backend, "mode": spec.mode, "dynamic": spec.dynamic}
        if handle is not None and (want is None or handle.options != dict(handle.options, **want)):
            handle.restore()
            del self._handles[dit]
            handle = None
        if want is not None and handle is None:
            handle = self._handles[dit] = compile_blocks(dit, **want)
        return handle

    def release(self, dit: nn.Module) -> None:
        """Restore ``dit``'s plain blocks."""
        self.apply(dit, None)


# --------------------------------------------------------------------------- stages

def _stage_line(stage: str, detail: str) -> None:
    log.info("wan_core plan: %s: %s", stage, detail)


@contextlib.contextmanager
def _on(modules: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    from .offload import on_device

    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(on_device(m, device))
        yield


@contextlib.contextmanager
def text_encoder_stage(text_encoder, options: RunOptions | None, device: torch.device | str,
                       free_bytes: int | None = None) -> Iterator[torch.device]:
    """``with text_encoder_stage(te, options, "cuda") as dev: te.encode(...)``: umT5 placed by
    :func:`place_text_encoder` for the block, one log line."""
    where = place_text_encoder(text_encoder, options or RunOptions(), device, free_bytes)
    _stage_line("text encoder", f"umT5 on {where.device} ({where.reason})")
    with _on([getattr(text_encoder, "model", text_encoder)], where.device):
        yield where.device


@contextlib.contextmanager
def image_encode_stage(modules: Sequence[nn.Module], device: torch.device | str,
                       what: str = "VAE + CLIP vision", *, options: RunOptions | None = None,
                       job: Job | Sequence[int] | None = None,
                       free_bytes: int | None = None) -> Iterator[EncodeTiling]:
    """``with image_encode_stage([vae, clip], "cuda", job=job) as tiling:
    encode_image_conditioning(vae, clip, ..., vae_tile=tiling.tile)``: ``modules`` (the VAE,
    CLIP vision) on ``device`` for the block, one log line. With ``job`` (the encoded video's
    size) the VAE's encode tile is planned by :func:`plan_encode`; without, untiled."""
    from .vae import WanVAE

    device = torch.device(device)
    modules = [m for m in modules if m is not None]
    if job is None:
        tiling = EncodeTiling(device, None, None, "no job given")
        line = f"{what} on {device}"
    else:
        vae = next((m for m in modules if isinstance(m, WanVAE)), None)
        clip = next((m for m in modules if m is not vae), None)
        tiling = plan_encode(vae, options or RunOptions(), device, free_bytes, job=job, clip_vision=clip)
        line = f"{what} on {device}, encode {tiling.describe()}"
    _stage_line("image encode", line)
    with _on(modules, device):
        yield tiling


@contextlib.contextmanager
def decode_stage(vae, options: RunOptions | None, device: torch.device | str,
                 free_bytes: int | None = None, *, job: Job | Sequence[int] | None = None) -> Iterator[DecodeTiling]:
    """``with decode_stage(vae, options, "cuda", job=z.shape) as tiling:
    decode_tiled(vae, z, **tiling.kwargs())``: tiles by :func:`plan_decode`."""
    tiling = plan_decode(vae, options or RunOptions(), device, free_bytes, job=job)
    _stage_line("decode", tiling.describe())
    with _on([vae], tiling.device):
        yield tiling


class RunPlan:
    """A placed run of one DiT on one job; build it with :func:`prepare_run`.

    Use as ``with prepare_run(...) as plan:``; inside, each stage is a context:
    :meth:`text_encoder`, :meth:`image_encode`, :meth:`sampling` (yields the
    :class:`~wan_core.runner.DiTRunner`) and :meth:`decode`. Leaving the plan restores
    blocks it compiled for this run only (without a :class:`CompiledModels`).
    """

    def __init__(self, dit, job: Job, options: RunOptions, device: torch.device, offload_device: torch.device,
                 free_bytes: int | None, compiled: CompiledModels | None, vae=None, clip_vision=None) -> None:
        self.dit, self.job, self.options = dit, job, options
        self.device, self.offload_device = device, offload_device
        self.free_bytes = free_bytes
        self.placement = plan_sampling(dit, job, options, device, offload_device, free_bytes, vae=vae,
                                       clip_vision=clip_vision)
        self._compiled = compiled
        self._own_compiled: CompiledModels | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RunPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Undo what the plan keeps between stages (blocks compiled for this run only)."""
        self._stack.close()

    def text_encoder(self, text_encoder):
        return text_encoder_stage(text_encoder, self.options, self.device, self.free_bytes)

    @property
    def memory(self):
        """The :class:`wan_core.planner.MemoryPlan` behind the decisions (None when no budget
        chose them: the CPU, explicit resident blocks, no budget known)."""
        return self.placement.memory

    def image_encode(self, vae, clip_vision=None, *, what: str = "VAE + CLIP vision", job: Job | None = None):
        """The image-encode stage of ``job`` (default: the plan's); yields the :class:`EncodeTiling`."""
        job = job or dataclasses.replace(self.job, encode_video=True)
        return image_encode_stage([vae, clip_vision], self.device, what, options=self.options, job=job,
                                  free_bytes=self.free_bytes)

    def decode(self, vae, job: Job | Sequence[int] | None = None):
        """The decode stage of ``job`` (default: the plan's; give the decoded size when the plan's
        job is one context window); yields the :class:`DecodeTiling`."""
        return decode_stage(vae, self.options, self.device, self.free_bytes, job=job or self.job)

    def _compile(self) -> None:
        spec = self.options.compile
        if self._compiled is not None:
            self._compiled.apply(self.dit, spec)
        elif spec is not None and self._own_compiled is None:   # once per plan, undone by close()
            self._own_compiled = CompiledModels()
            self._own_compiled.apply(self.dit, spec)
            self._stack.callback(self._own_compiled.release, self.dit)

    @contextlib.contextmanager
    def sampling(self) -> Iterator:
        """``with plan.sampling() as runner: sample(dit, ..., runner=runner)``."""
        from .lora import applied_loras
        from .offload import BlockSwap, on_device
        from .runner import DiTRunner

        dit, place = self.dit, self.placement
        self._compile()
        _stage_line("sampling", f"{self.job.describe()}: {place.describe()}{_describe_speed(self.options, dit)}")
        with contextlib.ExitStack() as stack:
            if self.options.loras:
                # added to the masters first, removed last: block swap copies the hooked weights
                stack.enter_context(applied_loras(dit, list(self.options.loras)))
            executor = None
            if place.resident_blocks is None:
                stack.enter_context(on_device(dit, place.device))
            else:
                executor = BlockSwap(place.resident_blocks, compute_device=place.device,
                                     offload_device=place.offload_device)
                stack.callback(_empty_cache, place.device)
                stack.callback(executor.release)   # before setup: a setup failing half-way is undone too
                executor.setup(dit)
            cache = build_step_cache(self.options.step_cache, dit)
            yield DiTRunner(dit, executor=executor, step_cache=cache)
            if cache is not None:
                log.info("wan_core: %s", cache.summary())


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_run(dit, job: Job | Sequence[int], options: RunOptions | None = None, device: torch.device | str = "cpu",
                offload_device: torch.device | str = "cpu", free_bytes: int | None = None, *,
                compiled: CompiledModels | None = None, vae=None, clip_vision=None) -> RunPlan:
    """Plan a run of ``dit`` (a WanDiT resting on ``offload_device``) on ``job`` (a :class:`Job`
    or the latent shape ``(16, T', H/8, W/8)``) with ``options`` on ``device``.

    free_bytes: the free VRAM as the host sees it (None: asked of CUDA when needed).
    compiled: keep compiled blocks between runs in this registry (None: compiled for this
    plan only, restored when it closes). vae / clip_vision: the models of the image-encode and
    decode stages (or their weight bytes), so the memory plan sizes those stages too (set
    ``job.encode_video`` for I2V / FLF2V / V2V). The sampling placement is decided here, so
    a budget that cannot run the job raises :class:`wan_core.PlanError` (naming the minimum)
    before any model runs.
    """
    if not isinstance(job, Job):
        job = Job.from_latent_shape(job)
    return RunPlan(dit, job, options or RunOptions(), torch.device(device), torch.device(offload_device),
                   free_bytes, compiled, vae, clip_vision)
