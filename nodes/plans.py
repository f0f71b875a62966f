"""Node option values -> ``wan_core`` run options, and the engine's stages with the host's devices.

All policy (block swap, step-cache thresholds, text-encoder placement, VAE tiles, the order
things are undone in) lives in :mod:`wan_core.run_plan`; this module only translates the
widgets of WanCore Memory Options into a :class:`wan_core.RunOptions` and hands the engine
ComfyUI's compute device, offload device and free VRAM (after asking ComfyUI to make room
for what the stage needs), with the host's ``--lowvram`` / ``--novram`` applied.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from . import host
from .types import MemoryOptions

__all__ = ["compiled_models", "decode_stage", "image_encode_stage", "prepare", "run_options",
           "text_encoder_stage"]

_TEXT_ENCODER_DEVICE = {"auto": "auto", "yes": "cpu", "no": "gpu"}


def run_options(memory: MemoryOptions | None = None, loras: Sequence = (), step_cache=None, compile=None,
                vae_tile: str | int | None = None):
    """The :class:`wan_core.RunOptions` of node values: ``memory`` (widget units: GiB, -1 for
    auto, yes/no), the LoRA chain, a StepCacheSpec / CompileSpec; ``vae_tile`` overrides the
    memory options' tiling (WanCore Decode's own widgets when not "auto")."""
    from ..wan_core import RunOptions

    m = memory or MemoryOptions()
    tile = {"auto": "auto", "off": "off", "custom": int(m.vae_tile_size)}.get(m.vae_tile)
    if tile is None:
        raise ValueError(f"memory vae_tile must be auto, off or custom; got {m.vae_tile!r}")
    te = _TEXT_ENCODER_DEVICE.get(m.text_encoder_on_cpu)
    if te is None:
        raise ValueError(f"text_encoder_on_cpu must be auto, yes or no; got {m.text_encoder_on_cpu!r}")
    options = RunOptions(vram_budget=m.budget_bytes, resident_blocks=None if m.resident_blocks < 0 else m.resident_blocks,
                         text_encoder_device=te, vae_tile=tile, loras=tuple(loras or ()), step_cache=step_cache,
                         compile=compile)
    return options if vae_tile is None else dataclasses.replace(options, vae_tile=vae_tile)


@functools.cache
def compiled_models():
    """The pack's one registry of compiled DiT blocks (kept between runs while the compile
    options stay the same; models held weakly). Built on first use, never at import."""
    from ..wan_core import CompiledModels

    return CompiledModels()


def _follow_host(options):
    """``options`` with the host's ``--lowvram`` / ``--novram`` applied where the user left
    "auto": every DiT block streamed and umT5 on the CPU (what ComfyUI does with its own
    text encoders there). ``--highvram`` / ``--gpu-only`` need nothing here: the offload
    device is then the GPU, so the weights rest there; ``--cpu`` makes the device the CPU."""
    if host.vram_mode() not in ("low", "none"):
        return options
    return dataclasses.replace(
        options, resident_blocks=0 if options.resident_blocks is None else options.resident_blocks,
        text_encoder_device="cpu" if options.text_encoder_device == "auto" else options.text_encoder_device)


def _host(stage: str, models, options, job=None):
    """(compute device, offload device, free VRAM) for ``stage``: ComfyUI is first asked to
    make room for the bytes the engine says the stage needs (it unloads only as many of its
    own models as that takes), then the free VRAM is read through the host."""
    from ..wan_core import stage_bytes

    device = host.torch_device()
    if device.type != "cpu":
        host.make_room(stage_bytes(stage, models, options, job), device)
    return device, host.offload_device(), host.free_vram_bytes(device)


def prepare(dit, shape: Sequence[int], options):
    """``with prepare(dit, shape, options) as plan, plan.sampling() as runner:`` on the host."""
    from ..wan_core import prepare_run

    options = _follow_host(options)
    host.release_from_core(dit)   # a core MODEL over this DiT (WanCore DiT To Model) may hold it LoRA-patched
    device, offload, free = _host("sampling", dit, options, shape)
    return prepare_run(dit, shape, options, device, offload, free, compiled=compiled_models())


def text_encoder_stage(text_encoder, options):
    from ..wan_core import text_encoder_stage as stage

    options = _follow_host(options)
    device, _offload, free = _host("text encoder", text_encoder, options)
    return stage(text_encoder, options, device, free)


def image_encode_stage(*modules, what: str = "VAE + CLIP vision", size: Sequence[int] | None = None, options=None):
    """``size``: (width, height, frames) of the video encoded: plans the encode tile and sizes
    the room asked for (without it: untiled, room for the weights)."""
    from ..wan_core import Job, RunOptions, image_encode_stage as stage

    options = _follow_host(options or RunOptions())
    job = None if size is None else Job(*(int(v) for v in size), encode_video=True)
    device, _offload, free = _host("image encode", modules, options, job)
    return stage(modules, device, what, options=options, job=job, free_bytes=free)


def decode_stage(vae, options, latent_shape: Sequence[int] | None = None):
    """``latent_shape``: the latents decoded (``[..., T', h, w]``), which the tiles and the room
    asked for are planned for."""
    from ..wan_core import decode_stage as stage

    options = _follow_host(options)
    device, _offload, free = _host("decode", vae, options, latent_shape)
    return stage(vae, options, device, free, job=latent_shape)
