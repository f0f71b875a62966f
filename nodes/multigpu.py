"""WanCore Multi-GPU Options: sample on several GPUs through a pool of worker processes.

The node only describes the request (a ``wan_core.PoolConfig``); WanCore Sampler, given it,
sends the job to the pack's one :class:`wan_core.WorkerPools` (kept for ComfyUI's lifetime,
built on first use): one process per listed GPU, started on the first run and reused while
the options stay the same, each loading the DiT from the file the loader read. The graph
itself stays in ComfyUI's process; progress, Cancel and errors come back to the sampler node.
"""
from __future__ import annotations

import functools

from . import host
from .types import MULTI_GPU

__all__ = ["WanCoreMultiGPUOptions", "sample_on_pool", "worker_pools"]

_MAX_DEGREE = 64


def _config(devices: str, ulysses: int, ring: int, cfg_parallel: bool):
    from ..wan_core import ParallelConfig, PoolConfig, parse_devices

    return PoolConfig(parse_devices(devices), ParallelConfig(int(ulysses), int(ring), bool(cfg_parallel)))


class WanCoreMultiGPUOptions:
    """GPUs and the way they share each step (Ulysses, Ring, CFG parallelism)."""

    CATEGORY = "WanCore/options"
    DESCRIPTION = ("Sample one video on several GPUs of this machine: connect to WanCore Sampler's multi_gpu input. "
                   "One worker process per GPU is started on the first run (each loads its own copy of the "
                   "model from the loader's file, in system RAM, then plans its GPU like a one-GPU run) and "
                   "reused while these options stay the same. GPUs = ulysses x ring (x 2 with cfg_parallel).")
    FUNCTION = "options"
    RETURN_TYPES = (MULTI_GPU,)
    RETURN_NAMES = ("multi_gpu",)
    OUTPUT_TOOLTIPS = ("Multi-GPU options, for WanCore Sampler's multi_gpu input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "devices": ("STRING", {
                "default": "0,1",
                "tooltip": "The GPUs to use, one process each, in rank order: indices like 0,1,2,3 or 0-3 (as "
                           "CUDA numbers them in ComfyUI's process). 'cpu,cpu' runs the processes on the CPU "
                           "(slow; for testing a workflow without GPUs)."}),
            "ulysses": ("INT", {
                "default": 2, "min": 1, "max": _MAX_DEGREE,
                "tooltip": "Ulysses degree: GPUs that split each attention over the heads (fast inside one "
                           "machine). Must divide the model's heads: 12 for 1.3B (1, 2, 3, 4, 6, 12), 40 for 14B "
                           "(1, 2, 4, 5, 8, 10, 20, 40)."}),
            "ring": ("INT", {
                "default": 1, "min": 1, "max": _MAX_DEGREE,
                "tooltip": "Ring degree: GPUs that pass key/value blocks round a ring (any number; use it for "
                           "GPU counts the heads do not divide). ulysses x ring GPUs share each step."}),
            "cfg_parallel": ("BOOLEAN", {
                "default": False,
                "tooltip": "Run the conditional and unconditional passes of each step on two halves of the "
                           "GPUs at once (doubles the GPUs; no effect on the numbers; nothing to gain at cfg 1)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, devices=None, ulysses=None, ring=None, cfg_parallel=None):
        if devices is None or ulysses is None or ring is None or cfg_parallel is None:
            return True   # a linked value: checked when the node runs
        try:   # the GPUs themselves are looked for when the node runs: a saved graph stays valid elsewhere
            _config(devices, ulysses, ring, cfg_parallel)
        except ValueError as err:
            return str(err)
        return True

    def options(self, devices: str, ulysses: int, ring: int, cfg_parallel: bool):
        config = _config(devices, ulysses, ring, cfg_parallel)
        config.check_devices()
        return (config,)


@functools.cache
def worker_pools():
    """The pack's one pool holder (a new configuration closes the running pool). Built on
    first use, never at import; the pool itself closes at interpreter exit."""
    from ..wan_core import WorkerPools

    return WorkerPools()


def sample_on_pool(config, model, text, settings, *, shape, image, init_latents, vace, fun, options, guidance,
                   context, progress):
    """The sampler's job, run by the worker pool of ``config``: normalised latents ``[16, T', h, w]``.

    ``model`` is the sampler's LoadedDiT: the workers load the file it came from (its
    ``source``); ComfyUI is first asked to make room on each listed GPU for what the engine
    says the sampling stage needs there (its own cached models give way, as for a one-GPU run).
    """
    from ..wan_core import PoolJob, plan_shape, stage_bytes

    if model.source is None:
        raise ValueError("this model did not come from WanCore Load Diffusion Model, so the multi-GPU workers "
                         "cannot load it from a file: load it with that node, or disconnect multi_gpu")
    job = PoolJob(model.source, text, settings, shape=shape, image=image, init_latents=init_latents, vace=vace,
                  fun=fun, options=options, guidance=guidance, context=context)
    pool = worker_pools().get(config)
    needed = stage_bytes("sampling", model.model, options, plan_shape(shape, context))   # every rank holds the DiT
    for device in config.devices:
        if device != "cpu":
            host.make_room(needed, device)
    return pool.sample(job, callback=lambda info: progress.update(info.step, info.total, info.x0),
                       interrupt=host.check_interrupt)
