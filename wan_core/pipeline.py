"""Sampling: noise -> latents with classifier-free guidance, and the whole job in one call.

``sample`` runs the DiT under a flow-matching sampler exactly as the official Wan 2.1
pipelines do (separate conditional / unconditional passes, the official schedules), checks
every prediction for NaN/Inf at the step where it appears, and reports progress through a
typed callback. ``generate`` goes from models (or paths) and settings to frames.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .conditioning import (NEGATIVE_PROMPT, NEGATIVE_PROMPT_FLF2V, NEGATIVE_PROMPT_I2V, ImageEmbeds, TextEmbeds,
                           check_video_size, encode_image_conditioning, i2v_size, image_to_tensor, latent_shape,
                           make_noise)
from .runner import DiTRunner
from .schedulers import flow_schedule, get_sampler, noise_latent
from .text_cache import PromptCache
from .vae_tiling import decode_tiled

__all__ = ["SamplerSettings", "StepInfo", "NonFiniteError", "sample", "generate", "default_settings",
           "video_to_tensor", "frames_from_video"]


@dataclass(frozen=True)
class SamplerSettings:
    """Sampling knobs; defaults are the official T2V ones (see :func:`default_settings`)."""

    steps: int = 50
    cfg: float = 5.0
    shift: float = 5.0
    sampler: str = "unipc"       # "unipc" | "dpm++" | "euler"
    seed: int = 0
    denoise: float = 1.0         # < 1: start part-way from input latents (V2V)


@dataclass(frozen=True)
class StepInfo:
    """Progress after one sampling step (``step`` counts from 1 to ``total``)."""

    step: int
    total: int
    sigma: float
    timestep: int
    x: Tensor          # latent after the step, [16, T', h, w] normalised
    x0: Tensor         # current clean-latent estimate, for previews


class NonFiniteError(RuntimeError):
    """The DiT produced NaN/Inf; raised at the step where it first appears."""


def default_settings(model_type: str, width: int, height: int, **overrides) -> SamplerSettings:
    """Official defaults (generate.py): 40 steps for I2V, 50 otherwise (FLF2V too: its task
    name holds no "i2v"); shift 5, but 3 for I2V at 480p-class sizes (<= 832*480 pixels) and
    16 for FLF2V; guidance 5."""
    steps = 40 if model_type == "i2v" else 50
    shift = 5.0
    if model_type == "i2v" and width * height <= 832 * 480:
        shift = 3.0
    elif model_type == "flf2v":
        shift = 16.0
    values = {"steps": steps, "shift": shift}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplerSettings(**values)


def _likely_cause(dit) -> str:
    dtypes = {p.dtype for p in dit.parameters()}
    hints = []
    compute = getattr(dit, "resolved_compute_dtype", lambda: None)()
    if compute == torch.float16:
        hints.append("fp16 compute overflows in Wan's attention/FFN: use bf16 (or fp32)")
    if any(d in (torch.float8_e4m3fn, torch.float8_e5m2) for d in dtypes):
        hints.append("fp8 weights: try the bf16 file or bf16 storage")
    backend = getattr(dit, "attention_backend", "sdpa")
    if backend != "sdpa":
        hints.append(f"attention backend '{backend}': try 'sdpa'")
    if not hints:
        hints.append("corrupt weights or an extreme cfg/shift; check the file and settings")
    return "; ".join(hints)


def _model_device(dit) -> torch.device:
    return dit.patch_embedding.weight.device


@torch.no_grad()
def sample(dit, text: TextEmbeds, settings: SamplerSettings, *, shape: tuple[int, ...] | None = None,
           image: ImageEmbeds | None = None, init_latents: Tensor | None = None,
           callback: Callable[[StepInfo], None] | None = None,
           interrupt: Callable[[], None] | None = None, runner: DiTRunner | None = None) -> Tensor:
    """Sample normalised latents ``[16, T', H/8, W/8]`` float32 on the CPU.

    shape: latent shape for T2V (``latent_shape(w, h, frames)``); taken from ``image`` for
    I2V/FLF2V or from ``init_latents`` for V2V. init_latents: normalised latents of an input
    video, noised to the first sigma of a ``denoise < 1`` schedule. callback: called after
    every step with a :class:`StepInfo`. interrupt: called before every model evaluation; it
    may raise to stop (models keep no per-run state, so they stay usable). runner: a
    :class:`~wan_core.runner.DiTRunner` over ``dit`` carrying block swap / step caching;
    default: a plain runner (identical to calling ``dit``).
    """
    cfg = dit.cfg
    if cfg.has_image_input and image is None:
        raise ValueError(f"{cfg.variant} is an image-to-video model: give it a start image "
                         "(image conditioning from the image-to-video encode step).")
    if not cfg.has_image_input and image is not None:
        raise ValueError(f"{cfg.variant} is a text-to-video model; it takes no start image. Use an "
                         "I2V model, or sample without image conditioning.")
    if image is not None:
        shape = (16, *image.y.shape[-3:])
    elif init_latents is not None:
        shape = tuple(init_latents.shape)
    if shape is None:
        raise ValueError("sample() needs the latent shape (T2V), image conditioning (I2V) or init latents (V2V).")
    if settings.steps < 1:
        raise ValueError(f"steps must be >= 1, got {settings.steps}")
    if init_latents is None and settings.denoise < 1.0:
        raise ValueError("denoise < 1 needs input latents to start from (video-to-video); use denoise 1.0.")

    runner = runner if runner is not None else DiTRunner(dit)
    if runner.dit is not dit:
        raise ValueError("the runner wraps another model than the one given to sample()")
    device = _model_device(dit)
    schedule = flow_schedule(settings.steps, settings.shift, settings.sampler, settings.denoise)
    noise = make_noise(settings.seed, shape)
    if init_latents is not None:
        x = noise_latent(init_latents.float().cpu(), noise, schedule.sigmas[0])
    else:
        x = noise
    x = x.to(device)[None]

    pos = text.positive.to(device)[None]
    neg = text.negative.to(device)[None]
    y = clip = None
    if image is not None:
        y, clip = image.y.to(device)[None], image.clip_fea.to(device)[None]
    total = schedule.steps
    step = {"i": 0}
    runner.begin_run(total)

    def check(v: Tensor, which: str) -> Tensor:
        if not torch.isfinite(v).all():
            raise NonFiniteError(
                f"step {step['i'] + 1}/{total}: the {which} prediction of {cfg.variant} contains NaN/Inf. "
                f"Likely cause: {_likely_cause(dit)}.")
        return v

    def model_fn(xt: Tensor, timestep: Tensor) -> Tensor:
        t = timestep.to(device)
        runner.begin_step(step["i"])   # every solver here evaluates the model once per step
        cond = check(runner(xt, t, pos, clip, y, branch="cond"), "conditional")
        if settings.cfg == 1.0:  # guidance off: the unconditional pass would not change the result
            return cond
        uncond = check(runner(xt, t, neg, clip, y, branch="uncond"), "unconditional")
        return uncond + settings.cfg * (cond - uncond)

    def on_step(d: dict) -> None:
        step["i"] = d["i"] + 1
        if callback is not None:
            callback(StepInfo(step=d["i"] + 1, total=d["total"], sigma=float(d["sigma"]), timestep=int(d["timestep"]),
                              x=d["x"][0], x0=d["denoised"][0]))

    out = get_sampler(settings.sampler)(model_fn, x, schedule, callback=on_step, interrupt=interrupt)
    return out[0].float().cpu()


def video_to_tensor(frames: Tensor) -> Tensor:
    """Frames ``[T, H, W, 3]`` in 0..1 -> ``[1, 3, T, H, W]`` in -1..1 (VAE input)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"a video must be [T, H, W, 3] frames in 0..1; got shape {tuple(frames.shape)}.")
    return frames.float().permute(3, 0, 1, 2)[None].mul(2).sub(1)


def frames_from_video(video: Tensor) -> Tensor:
    """VAE output ``[1, 3, T, H, W]`` in -1..1 -> frames ``[T, H, W, 3]`` float32 in 0..1 on the CPU."""
    return video[0].float().add(1).div(2).clamp(0, 1).permute(1, 2, 3, 0).cpu().contiguous()


def _load(kind: str, value, device, dtype=None):
    from . import loaders

    if value is None or not isinstance(value, (str, os.PathLike)):
        return value
    fn = {"dit": loaders.load_dit, "vae": loaders.load_vae, "t5": loaders.load_text_encoder,
          "clip": loaders.load_clip_vision}[kind]
    return fn(value, device=device) if dtype is None else fn(value, dtype=dtype, device=device)


def generate(*, dit, vae, text_encoder, clip_vision=None, prompt: str, negative_prompt: str = "",
             image: Tensor | None = None, end_image: Tensor | None = None, video: Tensor | None = None,
             width: int | None = None, height: int | None = None, frames: int = 81, max_area: int = 832 * 480,
             steps: int | None = None, cfg: float | None = None, shift: float | None = None,
             sampler: str = "unipc", seed: int = 0, denoise: float = 1.0, device: str | torch.device = "cpu",
             callback: Callable[[StepInfo], None] | None = None,
             interrupt: Callable[[], None] | None = None, prompt_cache: PromptCache | None = None,
             runner: DiTRunner | None = None, vae_tile="auto") -> Tensor:
    """The whole job: models or checkpoint paths + settings -> frames ``[T, H, W, 3]`` in 0..1.

    T2V: ``prompt`` (+ width/height, default 832x480). I2V: add ``image`` ``[H, W, C]`` in 0..1
    and ``clip_vision``; the size defaults to the official one from ``max_area`` and the image
    aspect. FLF2V: add ``end_image`` with an FLF2V model. V2V: ``video`` ``[T, H, W, 3]`` in 0..1
    and ``denoise < 1`` with a T2V model. T2I: ``frames=1``. ``steps``/``shift``/``cfg`` default
    to the official values for the model type. Sizes are checked before any model runs.
    ``prompt_cache``: a :class:`~wan_core.text_cache.PromptCache`; prompts found there run no
    text encoder (and, given as a path, load none). A text encoder loaded here from a path is
    dropped right after encoding, before sampling. ``runner``: a :class:`DiTRunner` over the
    (loaded) ``dit`` carrying block swap or a step cache. ``vae_tile``: "auto" (untiled when the
    frame fits the memory budget, else tiled, retrying smaller tiles on out-of-memory), None
    (untiled) or a tile size in latent pixels (see :func:`wan_core.vae_tiling.decode_tiled`).
    """
    dit = _load("dit", dit, device)
    kind = dit.cfg.model_type
    if image is None and end_image is not None:
        raise ValueError("end_image needs a start image too (first-last-frame to video).")
    if end_image is not None and kind != "flf2v":
        raise ValueError(f"{dit.cfg.variant} is not a first-last-frame model; end_image needs an FLF2V model.")
    if dit.cfg.has_image_input and image is None:
        raise ValueError(f"{dit.cfg.variant} is an image-to-video model: pass image=...")
    if not dit.cfg.has_image_input and image is not None:
        raise ValueError(f"{dit.cfg.variant} is a text-to-video model; it takes no image. Use an I2V model.")
    img = image_to_tensor(image) if image is not None else None
    if video is not None:
        frames, height, width = video.shape[0], video.shape[1], video.shape[2]
    if img is not None and (width is None or height is None):
        width, height = i2v_size(img.shape[1], img.shape[2], max_area)
    width = 832 if width is None else width
    height = 480 if height is None else height
    check_video_size(width, height, frames)
    settings = default_settings(kind, width, height, steps=steps, cfg=cfg, shift=shift, sampler=sampler,
                                seed=seed, denoise=denoise)

    default_neg = {"t2v": NEGATIVE_PROMPT, "i2v": NEGATIVE_PROMPT_I2V, "flf2v": NEGATIVE_PROMPT_FLF2V}[kind]
    prompts = [prompt, negative_prompt or default_neg]
    if prompt_cache is None:
        pos, neg = _load("t5", text_encoder, device).encode(prompts)
    else:  # the encoder is loaded (from a path) only when a prompt is missing
        pos, neg = prompt_cache.encode(prompt_cache.identity(text_encoder), prompts,
                                       lambda missing: _load("t5", text_encoder, device).encode(missing))
    text = TextEmbeds(pos.float().cpu(), neg.float().cpu())
    vae = _load("vae", vae, device)
    image_embeds = init = None
    if img is not None:
        clip = _load("clip", clip_vision, device)
        if clip is None:
            raise ValueError("image-to-video needs clip_vision (CLIP ViT-H/14).")
        end = image_to_tensor(end_image) if end_image is not None else None
        image_embeds = encode_image_conditioning(vae, clip, img, frames, width, height, end)
    if video is not None:
        init = vae.encode(video_to_tensor(video))[0].float().cpu()
    latents = sample(dit, text, settings, shape=latent_shape(width, height, frames), image=image_embeds,
                     init_latents=init, callback=callback, interrupt=interrupt, runner=runner)
    return frames_from_video(decode_tiled(vae, latents[None], tile=vae_tile))
