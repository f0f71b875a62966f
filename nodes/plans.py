"""How the option values (memory, LoRAs, step cache) become a sampling run.

:func:`prepared_dit` is the sampler's one entry: LoRAs applied unmerged, then the DiT placed
by the memory plan (block swap on a GPU, in place on the CPU), a fresh step cache, and on
exit (also on an interrupt or an error) the swap released before the LoRAs are removed
(the order the fp8 / block-swap contract asks for: hooks are added to and removed from the
masters, never to device copies). The other helpers decide the text-encoder placement and
the VAE tiling budget from the same options.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from . import host
from .types import CompileOptions, MemoryOptions, StepCacheOptions

__all__ = ["build_step_cache", "plan_dit", "prepared_dit", "recommended_threshold", "set_compiled",
           "text_encoder_device", "vae_tiling"]

log = logging.getLogger("wan_core")

AUTO = MemoryOptions()


def _compute_bytes(dit) -> int:
    """Bytes per element of the dtype the DiT's Linears will compute in on a GPU."""
    cd = dit.compute_dtype
    if cd is None:
        w = dit.text_embedding[0].weight
        cd = w.dtype if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
    return torch.empty((), dtype=cd).element_size()


def plan_dit(dit, shape: Sequence[int], memory: MemoryOptions, device: torch.device, offload: torch.device,
             free_bytes: int | None):
    """The block executor for sampling ``dit`` on latents ``shape`` ``(16, T', h, w)``.

    Returns ``(executor or None, log line or None)``; None runs the blocks in place. A
    GPU compute device with the model resting elsewhere gets a :class:`wan_core.BlockSwap`
    with K from ``memory.resident_blocks`` or, when -1, from :func:`wan_core.plan_memory`
    on the budget (the user's, else ``free_bytes``). The CPU runs in place, except that an
    explicit ``resident_blocks`` there exercises the same swap bookkeeping (same numbers).
    Raises :class:`wan_core.PlanError` when the user's budget cannot run the job at all; when
    only the free VRAM falls short of the estimate, every block is streamed (K = 0) instead.
    """
    from ..wan_core import BlockSwap, plan_memory
    from ..wan_core.planner import dit_sizes_from_module

    device, offload = torch.device(device), torch.device(offload)
    n = len(dit.blocks)
    if device.type != "cuda":
        if memory.resident_blocks < 0:
            return None, None
        k = min(memory.resident_blocks, n)
        return (BlockSwap(k, compute_device=device, offload_device=offload),
                f"wan_core: block swap on {device}: {k}/{n} blocks resident (explicit resident_blocks)")
    if offload.type == "cuda":
        return None, None   # --highvram / --gpu-only: the weights already live on the GPU
    pt, ph, pw = dit.cfg.patch_size
    tokens = (shape[-3] // pt) * (shape[-2] // ph) * (shape[-1] // pw)
    budget = memory.budget_bytes or free_bytes
    line = None
    if memory.resident_blocks >= 0:
        k = min(memory.resident_blocks, n)
        line = f"wan_core: block swap: {k}/{n} blocks resident (explicit resident_blocks)"
    elif budget is None:
        k = n
    else:
        from ..wan_core import PlanError

        sizes = dit_sizes_from_module(dit, _compute_bytes(dit))
        try:
            plan = plan_memory(budget, sizes, tokens, attention=getattr(dit, "attention_backend", "sdpa"),
                               compute_bytes=_compute_bytes(dit))
        except PlanError as err:
            if memory.budget_bytes is not None:
                raise   # the user's own budget: say it cannot work
            # the free VRAM is below the (high-side) estimate: stream every block and try
            log.warning("wan_core: %s Trying with every block streamed.", err)
            return BlockSwap(0, compute_device=device, offload_device=offload), None
        k, line = plan.resident_blocks, plan.describe()
    return BlockSwap(k, compute_device=device, offload_device=offload), line


def recommended_threshold(options: StepCacheOptions, cfg) -> float:
    """``options.threshold``, or when negative the published recommendation for ``cfg``."""
    if options.threshold >= 0:
        return options.threshold
    if options.method == "magcache":
        return 0.12
    return 0.08 if cfg.dim < 3072 else 0.2


def build_step_cache(options: StepCacheOptions | None, dit):
    """A fresh :class:`wan_core.TeaCache` / :class:`wan_core.MagCache` for one run, or None."""
    if options is None:
        return None
    from ..wan_core import MagCache, TeaCache

    threshold = recommended_threshold(options, dit.cfg)
    if options.method == "magcache":
        return MagCache.for_model(dit, threshold, k=options.magcache_k, retention_ratio=options.retention_ratio,
                                  start_step=options.start_step, end_step=options.end_step)
    return TeaCache.for_model(dit, threshold, mode=options.mode, start_step=options.start_step,
                              end_step=options.end_step)


def set_compiled(dit, options: CompileOptions | None) -> None:
    """Compile ``dit``'s blocks with ``options``, or restore them when None. The compiled
    state stays on the model between runs (recompiling every run would cost minutes); it
    changes only when the options do."""
    handle = getattr(dit, "wancore_compiled", None)
    if handle is not None and (options is None or handle.options != dict(handle.options, **options.kwargs())):
        handle.restore()
        dit.wancore_compiled = handle = None
    if options is not None and handle is None:
        from ..wan_core import compile_blocks

        dit.wancore_compiled = compile_blocks(dit, **options.kwargs())


@contextlib.contextmanager
def prepared_dit(dit, shape: Sequence[int], memory: MemoryOptions | None = None, loras: Sequence = (),
                 step_cache: StepCacheOptions | None = None, compile: CompileOptions | None = None) -> Iterator:
    """``with prepared_dit(...) as runner: sample(..., runner=runner)``: a
    :class:`wan_core.DiTRunner` with the LoRAs, the memory plan and the step cache; everything
    but the compiled blocks (see :func:`set_compiled`) undone on exit. ``memory`` None: the
    model's own options (set by the loader) or auto."""
    from ..wan_core import DiTRunner, applied_loras

    set_compiled(dit, compile)
    memory = memory or getattr(dit, "wancore_memory", None) or AUTO
    device, offload = host.torch_device(), host.offload_device()
    with contextlib.ExitStack() as stack:
        if loras:
            # apply_loras logs the report, and a warning naming every key that matched nothing
            stack.enter_context(applied_loras(dit, list(loras)))
        executor, line = plan_dit(dit, shape, memory, device, offload, host.free_vram_bytes(device))
        if line:
            log.info(line)
        if executor is None:
            stack.enter_context(host.on_device(dit))
        else:
            stack.callback(host.soft_empty_cache)
            stack.callback(executor.release)
            executor.setup(dit)
        cache = build_step_cache(step_cache, dit)
        yield DiTRunner(dit, executor=executor, step_cache=cache)
        if cache is not None:
            log.info("wan_core: %s", cache.summary())


def text_encoder_device(text_encoder, memory: MemoryOptions | None) -> str:
    """"cpu" or "device": where umT5 runs under ``memory`` (auto: the device when its weights
    and workspace fit the budget, or when the compute device is not a GPU)."""
    choice = (memory or AUTO).text_encoder_on_cpu
    if choice in ("yes", "no"):
        return "cpu" if choice == "yes" else "device"
    device = host.torch_device()
    if device.type != "cuda":
        return "device"
    from ..wan_core.offload import module_bytes
    from ..wan_core.planner import DEFAULT_RESERVE, TEXT_ENCODER_WORKSPACE

    budget = (memory or AUTO).budget_bytes or host.free_vram_bytes(device)
    need = module_bytes(text_encoder.model) + TEXT_ENCODER_WORKSPACE + DEFAULT_RESERVE
    return "device" if budget is None or need <= budget else "cpu"


def vae_tiling(tile, options: dict, vae, memory: MemoryOptions | None) -> tuple[object, dict]:
    """Refine WanCore Decode's ``(tile, options)`` with memory options: only an "auto" tiling
    changes; ``memory.vae_tile`` off / custom replaces it, and a budget (the user's, else
    80 % of the free VRAM of a GPU) minus the VAE's weights bounds the auto tile."""
    if tile != "auto":
        return tile, options
    memory = memory or AUTO
    if memory.vae_tile == "off":
        return None, {}
    if memory.vae_tile == "custom":
        return max(1, memory.vae_tile_size // 8), options
    from ..wan_core.offload import module_bytes

    device = host.torch_device()
    budget = memory.budget_bytes
    if budget is None:
        free = host.free_vram_bytes(device)
        budget = None if free is None else int(free * 0.8)
    if budget is None:
        return tile, options   # CPU: wan_core's default (half the available RAM)
    return tile, dict(options, budget=max(1, budget - module_bytes(vae)))
