"""The run plan's decisions, pure: where each stage's model runs and how the VAE tiles.

From :class:`~wan_core.run_options.RunOptions`, a :class:`~wan_core.run_options.Job` and the
budget (``options.vram_budget``, else the host's ``free_bytes``, else the free memory of a
CUDA device; on the CPU nothing is budgeted), with the figures of :mod:`wan_core.planner`:
:func:`plan_sampling` (block swap or in place), :func:`place_text_encoder`,
:func:`plan_encode` / :func:`plan_decode` (the VAE tiles) and :func:`stage_bytes` (what a
host should make room for). Nothing here moves a weight: :mod:`wan_core.run_plan` applies
the decisions, stage by stage.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import ParallelConfig, is_sharded
from .fun import reference_tokens
from .parallel_plan import RankPlan, block_shards, plan_rank
from .run_options import STAGES, Job, RunOptions

__all__ = ["SamplingPlacement", "StagePlacement", "DecodeTiling", "EncodeTiling", "plan_sampling",
           "place_text_encoder", "plan_encode", "plan_decode", "stage_bytes"]

log = logging.getLogger("wan_core")

GiB = 1 << 30


# --------------------------------------------------------------------------- decisions (pure)

@dataclass(frozen=True)
class SamplingPlacement:
    """Where the DiT runs while sampling.

    resident_blocks: K blocks kept on ``device`` (the rest streamed from ``offload_device``
    by :class:`wan_core.offload.BlockSwap`); None = in place (every weight gets a copy on
    ``device`` for the stage, or is used where it is). memory: the planner's decision when
    a budget chose K. Several processes (``parallel``): ``sharded`` = the blocks are FSDP2-sharded
    over the sequence group (:func:`wan_core.distributed.shard_blocks`, no block swap), and
    ``rank`` the per-rank plan (:class:`wan_core.parallel_plan.RankPlan`) when a budget chose.
    """

    device: torch.device
    offload_device: torch.device
    num_blocks: int
    resident_blocks: int | None
    reason: str
    memory: object | None = None     # wan_core.planner.MemoryPlan
    sharded: bool = False
    rank: RankPlan | None = None
    # the runner's text K/V cache (wan_core.runner.ContextKVCache): None = the runner's default (on
    # for the CPU); on a GPU the plan's decision (on only when the memory plan fits it), said by the note
    context_cache: bool | None = None
    context_cache_note: str = ""

    def describe(self) -> str:
        if self.rank is not None:
            return f"{self.rank.describe()} ({self.reason})"
        if self.sharded:
            return f"DiT blocks sharded over the sequence group (FSDP2) on {self.device} ({self.reason})"
        if self.resident_blocks is None:
            where = f"DiT in place on {self.device}"
        elif self.resident_blocks >= self.num_blocks:
            where = f"all {self.num_blocks} DiT blocks resident on {self.device}"
        else:
            where = (f"{self.resident_blocks}/{self.num_blocks} DiT blocks resident on {self.device}, "
                     f"{self.num_blocks - self.resident_blocks} streamed from {self.offload_device}")
        return f"{where} ({self.reason})" + (f"; {self.context_cache_note}" if self.context_cache_note else "")


@dataclass(frozen=True)
class StagePlacement:
    """The device of one stage's model, and why."""

    device: torch.device
    reason: str


@dataclass(frozen=True)
class _VaeTiling:
    """How a VAE stage tiles in space: ``tile`` in latent pixels (an int: the memory plan's
    tile or the user's; None: untiled; "auto": :mod:`wan_core.vae_tiling`'s own rule within
    ``budget`` bytes, or half the available RAM when None, as on the CPU), on ``device``."""

    device: torch.device
    tile: str | int | None
    budget: int | None
    reason: str

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`wan_core.vae_tiling.decode_tiled` / ``encode_tiled``."""
        return {"tile": self.tile} if self.budget is None else {"tile": self.tile, "budget": self.budget}

    def _tiles(self) -> str:
        if self.tile is None:
            return "untiled"
        if isinstance(self.tile, int):
            return f"tiles of {self.tile} latent px"
        if self.budget is None:
            return "auto tiles (within half the available RAM)"
        return f"auto tiles within {self.budget / GiB:.2f} GiB of activations"


@dataclass(frozen=True)
class DecodeTiling(_VaeTiling):
    """How the VAE decodes (fields as in ``_VaeTiling``); ``kwargs()`` for
    :func:`wan_core.vae_tiling.decode_tiled`."""

    def describe(self) -> str:
        return f"VAE on {self.device}, {self._tiles()} ({self.reason})"


@dataclass(frozen=True)
class EncodeTiling(_VaeTiling):
    """How the VAE encodes a video of the image-encode stage (the I2V / FLF2V guide video, the
    V2V input video), fields as in :class:`DecodeTiling`.

    ``kwargs()`` for :func:`wan_core.vae_tiling.encode_tiled`; ``tile`` is the ``vae_tile`` of
    :func:`wan_core.conditioning.encode_image_conditioning`."""

    def describe(self) -> str:
        return f"{self._tiles()} ({self.reason})"


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


def _per_token(cfg, job: Job) -> bool:
    """The DiT runs with one timestep per token: TI2V image-to-video."""
    return cfg.model_type == "ti2v" and (job.per_token_timesteps or job.encode_video)


def _rests_on(module: nn.Module, device: torch.device) -> bool:
    p = next(module.parameters(), None)
    return p is not None and p.device.type == device.type and device.index in (None, p.device.index)


def _compute_dtype(dit) -> torch.dtype:
    """The dtype the DiT's Linears compute in on a GPU."""
    cd = dit.compute_dtype
    if cd is None:
        w = dit.text_embedding[0].weight
        cd = w.dtype if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
    return cd


def _compute_bytes(dit) -> int:
    """Bytes per element of the dtype the DiT's Linears compute in on a GPU."""
    return torch.empty((), dtype=_compute_dtype(dit)).element_size()


def plan_sampling(dit, job: Job, options: RunOptions, device: torch.device | str,
                  offload_device: torch.device | str = "cpu", free_bytes: int | None = None, *,
                  vae=None, clip_vision=None, parallel: ParallelConfig | None = None) -> SamplingPlacement:
    """Block swap or in place for sampling ``dit`` on ``job``.

    A GPU compute device with the model resting elsewhere gets block swap with K from
    ``options.resident_blocks`` or, when None, from :func:`wan_core.planner.plan_memory` on
    the budget; given ``vae`` / ``clip_vision`` (modules or weight bytes), that plan also
    sizes the VAE decode and, for an ``encode_video`` job, the image-encode stage (its tiles
    are the ones :func:`plan_encode` / :func:`plan_decode` choose), so a budget too small
    for them is refused here too. The CPU runs in place, except that an explicit ``resident_blocks`` there
    runs the same swap bookkeeping (same numbers). Raises :class:`wan_core.PlanError` when the
    user's budget cannot run the job; when only the free VRAM falls short of the (high-side)
    estimate, every block is streamed (K = 0) with a warning. ``parallel``: this process is a
    rank of a sequence-parallel layout: the plan is the rank's (:func:`_plan_rank_sampling`).
    """
    from .planner import PlanError, dit_sizes_from_module, plan_memory, vae_figures
    from .runner import context_kv_bytes

    device, offload = torch.device(device), torch.device(offload_device)
    n = len(dit.blocks)
    k = options.resident_blocks

    def placed(resident, reason, memory=None) -> SamplingPlacement:
        cache, note = None, ""
        if device.type == "cuda":   # the text K/V cache costs VRAM: on only where the memory plan counted it
            cache = memory is not None and memory.context_cache
            note = memory.describe_context_cache() if memory is not None else "text K/V cache off (not planned)"
        return SamplingPlacement(device, offload, n, resident, reason, memory, context_cache=cache,
                                 context_cache_note=note)

    if parallel is not None and parallel.shard_weights == "on" and parallel.sequence_degree == 1:
        raise ValueError("sharded weights are split over the ranks of a sequence group: use --ulysses/--ring with "
                         "--shard-weights on (--cfg-parallel alone keeps a whole DiT per rank)")
    if parallel is not None and parallel.sequence_degree > 1:
        return _plan_rank_sampling(dit, job, options, device, offload, free_bytes, parallel)
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
        tokens = job.tokens(dit.cfg.patch_size) + reference_tokens(dit.cfg, job.latent_shape[-2:])   # + Fun V1.1 ref
        plan = plan_memory(budget, dit_sizes_from_module(dit, compute), tokens,
                           attention=dit.attention_backend, compute_bytes=compute, vae_bytes=vae_bytes,
                           latent_hw=tuple(job.latent_shape[-2:]) if vae_bytes else None,
                           clip_vision_bytes=_weight_bytes(clip_vision), encode_video=job.encode_video,
                           vae=vae_figures(vae, job.space_stride),
                           per_token_timesteps=_per_token(dit.cfg, job),
                           encode_frames=1 if dit.cfg.model_type == "ti2v" else None,
                           context_cache_bytes=context_kv_bytes(dit.cfg, 1, _compute_dtype(dit)))
    except PlanError as err:
        if options.vram_budget is not None:
            raise   # the user's own budget: say it cannot work
        log.warning("wan_core: %s Trying with every block streamed.", err)
        return placed(0, f"the free VRAM {budget / GiB:.2f} GiB is below the estimate")
    reason = (f"{what} {budget / GiB:.2f} GiB; planned peak {plan.dit_peak_bytes / GiB:.2f} GiB for "
              f"{plan.tokens} tokens, {plan.attention}")
    return placed(plan.resident_blocks, reason, plan)


def _plan_rank_sampling(dit, job: Job, options: RunOptions, device: torch.device, offload: torch.device,
                        free_bytes: int | None, parallel: ParallelConfig) -> SamplingPlacement:
    """:func:`plan_sampling` for one rank of a sequence-parallel layout: the weights whole, FSDP2-
    sharded or block-swapped by :func:`wan_core.parallel_plan.plan_rank` on the rank's budget
    (its token chunk, Ulysses / Ring buffers, one CFG branch a rank). Without a budget (the
    CPU, no budget known) the DiT runs as in one process, sharded only when asked ("on")."""
    from .planner import PlanError, dit_sizes_from_module

    n, k = len(dit.blocks), options.resident_blocks
    shard_on = parallel.shard_weights == "on"
    if shard_on and k is not None:
        raise ValueError("resident_blocks (block swap) and sharded weights cannot be combined: block swap moves "
                         "whole blocks; drop one of them")

    def placed(resident, reason, rank=None, sharded=False) -> SamplingPlacement:
        return SamplingPlacement(device, offload, n, resident, reason, sharded=sharded, rank=rank)

    if is_sharded(dit):
        return placed(None, "the blocks are already sharded", sharded=True)
    if device.type != "cuda" or offload.type == "cuda" or _rests_on(dit, device):
        if shard_on:
            return placed(None, "asked for", sharded=True)
        if device.type != "cuda":
            return placed(None if k is None else min(k, n), "no GPU" if k is None else "explicit resident_blocks")
        return placed(None, "the weights rest on the GPU")
    budget, what = _budget(options, device, free_bytes)
    if budget is None:
        return placed(None, "asked for", sharded=True) if shard_on else placed(k if k is not None else n,
                                                                               "no budget known")
    compute = _compute_bytes(dit)
    tokens = job.tokens(dit.cfg.patch_size) + reference_tokens(dit.cfg, job.latent_shape[-2:])
    try:
        rank = plan_rank(budget, dit_sizes_from_module(dit, compute), tokens, parallel, block_shards(dit),
                         attention=dit.attention_backend, compute_bytes=compute, resident_blocks=k,
                         per_token_timesteps=_per_token(dit.cfg, job))
    except PlanError as err:
        if options.vram_budget is not None:
            raise   # the user's own budget: say it cannot work
        log.warning("wan_core: %s Trying with every block streamed.", err)
        return placed(0, f"the free VRAM {budget / GiB:.2f} GiB is below the estimate")
    resident = None if rank.weights == "sharded" else rank.resident_blocks
    return placed(resident, f"{what} {budget / GiB:.2f} GiB a rank", rank, rank.weights == "sharded")


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


def _latent_tthw(job, space_stride: int | None = None) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a :class:`Job` (with the VAE's
    ``space_stride`` when given: the VAE decides) or of a latent shape ``(..., T', h, w)``
    (taken as it is: a decode accepts any latent)."""
    if isinstance(job, Job):
        if space_stride is not None and space_stride != job.space_stride:
            job = dataclasses.replace(job, space_stride=space_stride)
        _c, t, h, w = job.latent_shape
        return t, h, w
    t, h, w = (int(v) for v in job[-3:])
    return t, h, w


def _vae_stage(stage: str, vae, job, options: RunOptions, device: torch.device, free_bytes: int | None,
               clip_vision=None) -> tuple[str | int | None, int | None, str]:
    """(tile, budget for "auto", reason) of a VAE stage ("decode" or "encode")."""
    from .planner import DEFAULT_RESERVE, PlanError, plan_vae, vae_figures

    figures = vae_figures(vae, job.space_stride if isinstance(job, Job) else None)
    tile = options.vae_tile
    if tile == "off":
        return None, None, "tiling off"
    if isinstance(tile, int):
        return max(1, tile // figures.space_stride), None, f"asked for {tile} px"
    budget, what = _budget(options, device, free_bytes)
    if budget is None or device.type != "cuda":   # on the CPU nothing is budgeted
        return "auto", None, "no GPU"
    if job is None:
        raise ValueError(f"the VAE {stage} plan on {device} needs the job (a Job or the latent shape)")
    t, h, w = _latent_tthw(job, figures.space_stride)
    encode = stage == "encode"
    weights = _weight_bytes(vae)
    vae_plan = plan_vae(budget, weights, (h, w), t, clip_vision_bytes=_weight_bytes(clip_vision) if encode else 0,
                        encode_video=encode, figures=figures)
    chosen, peak = ((vae_plan.encode_tile, vae_plan.encode_peak) if encode
                    else (vae_plan.decode_tile, vae_plan.decode_peak))
    reason = (f"{what} {budget / GiB:.2f} GiB - reserve {DEFAULT_RESERVE / GiB:.2f} GiB; planned peak "
              f"{peak / GiB:.2f} GiB with {weights / GiB:.2f} GiB weights")
    minimum = vae_plan.minimum + DEFAULT_RESERVE
    if budget < minimum:
        message = (f"a budget of {budget / GiB:.2f} GiB cannot run the VAE {stage} of a {w * figures.space_stride}x"
                   f"{h * figures.space_stride} frame: the minimum is {minimum / GiB:.2f} GiB with the smallest tile.")
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
    says fewer, the text K/V cache), the planner's reserve included, at most ``options.vram_budget``: what a host
    should make room for before the stage. The stage then plans against the free VRAM it
    finds, so less room means more streaming or tiling, not a failure. 0 when the options
    keep the stage off the device.

    models: the stage's model, or for "image encode" a sequence (the VAE, CLIP vision);
    job: a :class:`Job` or a latent shape; "sampling" needs it, the VAE stages use it to
    size the frame (without it: weights + reserve).
    """
    from .planner import (DEFAULT_RESERVE, TEXT_ENCODER_WORKSPACE, dit_activation_bytes, dit_sizes_from_module,
                          plan_vae, vae_decode_bytes, vae_figures)
    from .runner import context_kv_bytes
    from .vae import CausalVAE

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
        if job.space_stride != (16 if models.cfg.out_dim == 48 else 8):   # the DiT's latents say which VAE
            job = dataclasses.replace(job, space_stride=16 if models.cfg.out_dim == 48 else 8)
        need = sizes.other_bytes + sum(blocks[:k]) + streamed + dit_activation_bytes(
            sizes, job.tokens(models.cfg.patch_size) + reference_tokens(models.cfg, job.latent_shape[-2:]),
            models.attention_backend, compute,
            per_token_timesteps=_per_token(models.cfg, job)) + context_kv_bytes(models.cfg, 1, _compute_dtype(models))
    elif stage in ("image encode", "decode"):
        modules = [m for m in (models if stage == "image encode" else [models]) if m is not None]
        vae = next((m for m in modules if isinstance(m, CausalVAE)), None)
        weights = sum(_weight_bytes(m) for m in modules)
        need = weights
        if job is not None and vae is not None:
            figures = vae_figures(vae)
            t, h, w = _latent_tthw(job, figures.space_stride)
            clip = weights - _weight_bytes(vae)
            whole = plan_vae(1 << 62, _weight_bytes(vae), (h, w), t, clip_vision_bytes=clip,
                             encode_video=stage == "image encode", figures=figures)
            need = max(whole.encode_peak, whole.clip_stage) if stage == "image encode" else whole.decode_peak
            if stage == "decode" and isinstance(options.vae_tile, int):
                side = max(1, options.vae_tile // figures.space_stride)
                need = vae_decode_bytes(weights, (min(h, side), min(w, side)), figures)
    else:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
    need += DEFAULT_RESERVE
    return need if options.vram_budget is None else min(need, options.vram_budget)
