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
the planner's reserve kept free. The options are in :mod:`wan_core.run_options`, the pure
decisions in :mod:`wan_core.placement`; this module runs the stages (all names importable here).

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

import torch
from torch import nn

from .distributed import is_sharded, shard_blocks
# the options and the decisions live in their own modules; their names stay importable from here
from .placement import (DecodeTiling, EncodeTiling, SamplingPlacement, StagePlacement, place_text_encoder,
                        plan_decode, plan_encode, plan_sampling, stage_bytes)
from .run_options import STAGES, WEIGHT_DTYPES, CompileSpec, Job, RunOptions, StepCacheSpec

__all__ = ["RunOptions", "StepCacheSpec", "CompileSpec", "Job", "RunPlan", "prepare_run", "STAGES",
           "SamplingPlacement", "StagePlacement", "DecodeTiling", "EncodeTiling", "CompiledModels", "plan_sampling",
           "place_text_encoder", "plan_encode", "plan_decode", "recommended_threshold", "build_step_cache",
           "text_encoder_stage", "image_encode_stage", "decode_stage", "WEIGHT_DTYPES", "stage_bytes"]

log = logging.getLogger("wan_core")


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
    from .vae import CausalVAE

    device = torch.device(device)
    modules = [m for m in modules if m is not None]
    if job is None:
        tiling = EncodeTiling(device, None, None, "no job given")
        line = f"{what} on {device}"
    else:
        vae = next((m for m in modules if isinstance(m, CausalVAE)), None)
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
                 free_bytes: int | None, compiled: CompiledModels | None, vae=None, clip_vision=None,
                 parallel=None) -> None:
        self.dit, self.job, self.options = dit, job, options
        self.device, self.offload_device = device, offload_device
        self.free_bytes = free_bytes
        self.parallel = parallel   # this rank's wan_core.distributed.ParallelGroups, or None
        self.placement = plan_sampling(dit, job, options, device, offload_device, free_bytes, vae=vae,
                                       clip_vision=clip_vision, parallel=None if parallel is None else parallel.config)
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
            if place.sharded:
                # FSDP2 keeps this rank's shard of each block on the device (it stays sharded: FSDP
                # has no way back); the other weights get device copies for the stage
                if not is_sharded(dit):
                    shard_blocks(dit, self.parallel, place.device)
                for name, child in dit.named_children():
                    if name != "blocks":
                        stack.enter_context(on_device(child, place.device))
            elif place.resident_blocks is None:
                stack.enter_context(on_device(dit, place.device))
            else:
                executor = BlockSwap(place.resident_blocks, compute_device=place.device,
                                     offload_device=place.offload_device)
                stack.callback(_empty_cache, place.device)
                stack.callback(executor.release)   # before setup: a setup failing half-way is undone too
                executor.setup(dit)
            cache = build_step_cache(self.options.step_cache, dit)
            yield DiTRunner(dit, executor=executor, step_cache=cache, context_cache=place.context_cache)
            if cache is not None:
                log.info("wan_core: %s", cache.summary())


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_run(dit, job: Job | Sequence[int], options: RunOptions | None = None, device: torch.device | str = "cpu",
                offload_device: torch.device | str = "cpu", free_bytes: int | None = None, *,
                compiled: CompiledModels | None = None, vae=None, clip_vision=None, parallel=None) -> RunPlan:
    """Plan a run of ``dit`` (a WanDiT resting on ``offload_device``) on ``job`` (a :class:`Job`
    or the latent shape ``(16, T', H/8, W/8)``) with ``options`` on ``device``.

    free_bytes: the free VRAM as the host sees it (None: asked of CUDA when needed).
    compiled: keep compiled blocks between runs in this registry (None: compiled for this
    plan only, restored when it closes). vae / clip_vision: the models of the image-encode and
    decode stages (or their weight bytes), so the memory plan sizes those stages too (set
    ``job.encode_video`` for I2V / FLF2V / V2V). The sampling placement is decided here, so
    a budget that cannot run the job raises :class:`wan_core.PlanError` (naming the minimum)
    before any model runs. parallel: this rank's :class:`wan_core.distributed.ParallelGroups`
    when several processes share the sampling: the plan is the rank's
    (:mod:`wan_core.parallel_plan`: its token chunk, whole / FSDP2-sharded / block-swapped
    weights) and a sharded placement is applied by the sampling stage.
    """
    if not isinstance(job, Job):
        job = Job.from_latent_shape(job)
    stride = 16 if dit.cfg.out_dim == 48 else 8   # the DiT's latents say which VAE: 48 channels = Wan 2.2 VAE
    if job.space_stride != stride:
        job = dataclasses.replace(job, space_stride=stride)
    if options is not None and options.step_cache is not None:
        from .step_cache import check_published_table

        check_published_table(dit.cfg)   # Wan 2.2: refused before any model runs
    return RunPlan(dit, job, options or RunOptions(), torch.device(device), torch.device(offload_device),
                   free_bytes, compiled, vae, clip_vision, parallel)
