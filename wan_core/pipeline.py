"""Sampling: noise -> latents with classifier-free guidance, and the whole job in one call.

``sample`` runs the DiT under a flow-matching sampler exactly as the official Wan 2.1
pipelines do (separate conditional / unconditional passes, the official schedules), checks
its inputs, the guided prediction of every step and the final latents for NaN/Inf (raising
:class:`~wan_core.errors.NonFiniteError` at the step where it appears, with the likely
cause), and reports progress through a typed callback. ``generate`` goes from models (or
paths) and settings to frames. Every number is checked against :mod:`wan_core.limits` first.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .conditioning import (NEGATIVE_PROMPT, NEGATIVE_PROMPT_FLF2V, NEGATIVE_PROMPT_I2V, ImageEmbeds, TextEmbeds,
                           check_conditioning, check_video_size, encode_image_conditioning, i2v_size, image_to_tensor, latent_shape,
                           make_noise)
from .context_windows import ContextOptions, branch_evaluator, freenoise, latent_frames
from .errors import NonFiniteError, all_finite, describe_nonfinite_weights
from .extend import check_overlap, join_videos, noise_known_frames, pin_known_frames
from .fp8 import is_fp8
from .fun import (FUN_DEFAULTS, FunControlEmbeds, check_fun_control, clip_features, encode_fun_control,
                  encode_fun_inpaint, fit_image_embeds, fun_model_call)
from .guidance import GuidanceOptions, guide
from .limits import (MAX_FRAMES, MAX_SIZE, check_cfg, check_denoise, check_run_arguments, check_sampler, check_seed,
                     check_shift, check_steps)
from .loaders22 import check_vae_for_dit
from .moe import MoESampling
from .run_plan import Job, RunOptions, prepare_run, text_encoder_stage
from .runner import DiTRunner
from .schedulers import flow_schedule, get_sampler, noise_latent
from .text_cache import PromptCache
from .vace_conditioning import VaceEmbeds, check_vace, encode_vace, vace_model_call
from .vae_tiling import decode_tiled, encode_tiled

__all__ = ["SamplerSettings", "StepInfo", "NonFiniteError", "sample", "generate", "default_settings",
           "video_to_tensor", "frames_from_video"]


@dataclass(frozen=True)
class SamplerSettings:
    """Sampling knobs; defaults are the official T2V ones (see :func:`default_settings`).

    Checked on construction against :mod:`wan_core.limits` (steps 1..1000, cfg 0..100 and
    finite, shift in (0, 100], seed 0..2**64-1, denoise in (0, 1], a known sampler):
    ``ValueError`` naming the limit.
    """

    steps: int = 50
    cfg: float = 5.0
    shift: float = 5.0
    sampler: str = "unipc"       # "unipc" | "dpm++" | "euler"
    seed: int = 0
    denoise: float = 1.0         # < 1: start part-way from input latents (V2V)

    def __post_init__(self) -> None:
        # limits (wan_core.limits) checked here, so no run can start with a value out of bounds
        check_steps(self.steps)
        check_cfg(self.cfg)
        check_shift(self.shift)
        check_sampler(self.sampler)
        check_seed(self.seed)
        check_denoise(self.denoise)


@dataclass(frozen=True)
class StepInfo:
    """Progress after one sampling step (``step`` counts from 1 to ``total``)."""

    step: int
    total: int
    sigma: float
    timestep: int
    x: Tensor          # latent after the step, [16, T', h, w] normalised
    x0: Tensor         # current clean-latent estimate, for previews


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
    """Why the DiT gave NaN/Inf; runs only after a failed check (reads every weight once)."""
    weights = describe_nonfinite_weights(dit, "DiT")
    if weights is not None:
        return weights
    dtypes = {p.dtype for p in dit.parameters()}
    hints = []
    compute = getattr(dit, "resolved_compute_dtype", lambda: None)()
    if compute == torch.float16:
        hints.append("fp16 compute overflows in Wan's attention/FFN: use bf16 (or fp32)")
    if any(is_fp8(d) for d in dtypes):
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
           interrupt: Callable[[], None] | None = None, runner: DiTRunner | None = None,
           guidance: GuidanceOptions | None = None, context: ContextOptions | None = None,
           known_latents: Tensor | None = None, cfg_parallel=None, vace: VaceEmbeds | None = None,
           moe: MoESampling | None = None, fun: FunControlEmbeds | None = None) -> Tensor:
    """Sample normalised latents ``[16, T', H/8, W/8]`` float32 on the CPU.

    shape: latent shape for T2V (``latent_shape(w, h, frames)``); taken from ``image`` for
    I2V/FLF2V or from ``init_latents`` for V2V. init_latents: normalised latents of an input
    video, noised to the first sigma of a ``denoise < 1`` schedule. callback: called after
    every step with a :class:`StepInfo`. interrupt: called before every model evaluation; it
    may raise to stop (models keep no per-run state, so they stay usable). runner: a
    :class:`~wan_core.runner.DiTRunner` over ``dit`` carrying block swap / step caching;
    default: a plain runner (identical to calling ``dit``). guidance: SLG / CFG-Zero* / cfg
    schedule / RIFLEx (:class:`~wan_core.guidance.GuidanceOptions`); context: context windows
    for long videos (:class:`~wan_core.context_windows.ContextOptions`). None (or the
    defaults) leaves every number as the official pipeline's. known_latents: normalised
    latents ``[16, K, H/8, W/8]`` the first K frames are pinned to (video extension, see
    :mod:`wan_core.extend`). cfg_parallel: a :class:`~wan_core.distributed.CFGParallel`: this
    process evaluates one CFG branch and receives the other from its partner process.
    vace: a VACE model's context (:class:`~wan_core.vace_conditioning.VaceEmbeds`, with its
    strength and step range); the shape follows it and its reference frames are cut from the
    returned latents. moe: a Wan 2.2 A14B run (:class:`~wan_core.moe.MoESampling`): ``dit`` is
    the high-noise expert, ``moe.low_noise`` the low-noise one; each step runs the expert and
    guidance scale of its timestep (``settings.cfg`` is not used). fun: a Fun Control model's
    conditioning (:class:`~wan_core.fun.FunControlEmbeds`); the shape follows it.
    """
    cfg = dit.cfg
    if vace is not None:
        shape = check_vace(cfg, vace, shape, image, init_latents)
    if fun is not None or getattr(cfg, "fun", ""):
        shape = check_fun_control(cfg, fun, shape, image, init_latents)
    image = fit_image_embeds(cfg, image)   # Fun InP / I2V with an end frame: the start image's CLIP tokens
    shape = check_conditioning(cfg, image, shape=shape,
                               init_shape=None if init_latents is None else tuple(init_latents.shape))
    if shape is None:
        raise ValueError("sample() needs the latent shape (T2V), image conditioning (I2V) or init latents (V2V).")
    _check_latent_shape(tuple(shape))
    if init_latents is None and settings.denoise < 1.0:
        raise ValueError("denoise < 1 needs input latents to start from (video-to-video); use denoise 1.0.")
    _check_finite_inputs(text, image, init_latents)

    runner = runner if runner is not None else DiTRunner(dit)
    if runner.dit is not dit:
        raise ValueError("the runner wraps another model than the one given to sample()")
    if moe is not None:   # Wan 2.2 A14B: the runner forwards each step to its expert
        runner = moe.runner(runner)
    device = _model_device(dit)
    schedule = flow_schedule(settings.steps, settings.shift, settings.sampler, settings.denoise)
    noise = make_noise(settings.seed, shape)
    guidance = guidance if guidance is not None else GuidanceOptions()
    windowed = context is not None and context.active(shape[1])
    if windowed and getattr(runner, "pins_first_frame", False):
        raise ValueError("context windows cannot run TI2V-5B image-to-video: its first latent frame is pinned "
                         "with per-token timesteps, which a window away from frame 0 would get wrong. Lower the "
                         "frame count to one window, or use text-to-video (no image) with context windows.")
    if windowed and context.freenoise:
        noise = freenoise(noise, context.latent_length, context.latent_overlap, settings.seed)
    for line in (context.describe(shape[1]) if windowed else "", guidance.describe(),
                 moe.options.describe(schedule.timesteps) if moe is not None else ""):
        if line:
            logging.getLogger("wan_core").info("wan_core plan: sampling: %s", line)
    if init_latents is not None:
        x = noise_latent(init_latents.float().cpu(), noise, schedule.sigmas[0])
    else:
        x = noise
    if known_latents is not None:   # extension: the overlap frames start at the source, noised
        x = noise_known_frames(x, known_latents.float().cpu(), noise, schedule.sigmas[0])
    x = x.to(device)[None]

    pos = text.positive.to(device)[None]
    neg = text.negative.to(device)[None]
    y = clip = None
    if image is not None:
        y = image.y.to(device)[None]
        clip = image.clip_fea.to(device)[None] if image.clip_fea is not None else None   # None: I2V-A14B
    if vace is not None:   # the VACE context rides as y: context windows slice it with the latents
        y = vace.latents.to(device)[None]
    call = runner if vace is None else vace_model_call(runner, vace)
    if fun is not None:    # control + start latents ride as y; the V1.1 reference goes in per call
        y, clip = fun.y.to(device)[None], clip_features(cfg, fun).to(device)[None]
        call = fun_model_call(call, fun)
    total = schedule.steps
    step = {"i": 0}
    runner.begin_run(total)
    evaluate = branch_evaluator(call, clip, y, shape[1], guidance, context, interrupt)

    def check(guided: Tensor, cond: Tensor, uncond: Tensor | None, scale: float) -> Tensor:
        # one pass over the guided prediction (what the solver uses); the branches are looked
        # at only once it failed, to say which one broke
        if all_finite(guided):
            return guided
        where = f"step {step['i'] + 1}/{total}"
        for v, which in ((cond, "conditional"), (uncond, "unconditional")):
            if v is not None and not all_finite(v):
                raise NonFiniteError(f"{where}: the {which} prediction of {cfg.variant} contains NaN/Inf. "
                                     f"Likely cause: {_likely_cause(dit)}.")
        raise NonFiniteError(f"{where}: the guided prediction of {cfg.variant} (cfg {scale:g}) contains "
                             "NaN/Inf although both branches are finite. Likely cause: cfg x (cond - uncond) "
                             "overflows; lower cfg or compute in float32.")

    def model_fn(xt: Tensor, timestep: Tensor) -> Tensor:
        t = timestep.to(device)
        i = step["i"]
        runner.begin_step(i)   # every solver here evaluates the model once per step
        if i < guidance.zero_init_steps:   # CFG-Zero* zero-init: x0 estimate = x on these steps
            return torch.zeros_like(xt)
        scale = guidance.cfg_at(i, settings.cfg if moe is None else moe.options.cfg_for(timestep))
        if cfg_parallel is not None and scale != 1.0:   # the two branches on two process groups at once
            cond, uncond = cfg_parallel.pair(lambda: evaluate(xt, t, pos, "cond", i),
                                             lambda: evaluate(xt, t, neg, "uncond", i, guidance.skip_blocks_at(i, total)))
            return check(guide(cond, uncond, scale, guidance.cfg_zero_star), cond, uncond, scale)
        cond = evaluate(xt, t, pos, "cond", i)
        if scale == 1.0:  # guidance off: the unconditional pass would not change the result
            return check(cond, cond, None, scale)
        uncond = evaluate(xt, t, neg, "uncond", i, guidance.skip_blocks_at(i, total))
        return check(guide(cond, uncond, scale, guidance.cfg_zero_star), cond, uncond, scale)

    def on_step(d: dict) -> None:
        step["i"] = d["i"] + 1
        if callback is not None:
            callback(StepInfo(step=d["i"] + 1, total=d["total"], sigma=float(d["sigma"]), timestep=int(d["timestep"]),
                              x=d["x"][0], x0=d["denoised"][0]))

    if known_latents is not None:
        model_fn = pin_known_frames(model_fn, known_latents.float(), schedule.sigmas, lambda: step["i"])
    out = get_sampler(settings.sampler)(model_fn, x, schedule, callback=on_step, interrupt=interrupt)
    if not all_finite(out):  # finite predictions can still add up to an overflow in the solver
        raise NonFiniteError(f"the final latents of {cfg.variant} ({settings.sampler}, {total} steps) contain "
                             f"NaN/Inf although every prediction was finite. Likely cause: the sampler diverged "
                             f"(cfg {settings.cfg:g}, shift {settings.shift:g} too extreme); use the official "
                             "settings.")
    return out[0].float().cpu() if vace is None else vace.trim(out[0].float().cpu())


def _check_fun_arguments(cfg, control_mask, reference_images: Sequence[Tensor]) -> None:
    """Refuse, before any model loads, what a Fun Control model cannot take."""
    if control_mask is not None:
        raise ValueError(f"{cfg.variant} (Fun Control) takes no control_mask; masks are a VACE input.")
    if len(reference_images) > (1 if cfg.ref_in_dim else 0):
        takes = "one reference image" if cfg.ref_in_dim else "no reference image (a Fun V1.1 Control model takes one)"
        raise ValueError(f"{cfg.variant} takes {takes}; got {len(reference_images)}.")


def _check_latent_shape(shape: tuple[int, ...]) -> None:
    """Refuse a latent shape beyond the size limits before any noise is drawn."""
    max_t, max_hw = (MAX_FRAMES - 1) // 4 + 1, MAX_SIZE // 8
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"the latent shape must be (16, T', H/8, W/8) with every size at least 1; got {shape}.")
    if shape[1] > max_t or shape[2] > max_hw or shape[3] > max_hw:
        raise ValueError(f"latent shape {shape} is above the limits: at most {max_t} latent frames "
                         f"(MAX_FRAMES {MAX_FRAMES}) and {max_hw} latent pixels per side (MAX_SIZE {MAX_SIZE}), "
                         "see wan_core.limits.")


def _check_finite_inputs(text: TextEmbeds, image: ImageEmbeds | None, init_latents: Tensor | None) -> None:
    """NaN/Inf in an input would reach every step: refuse it before sampling, naming its source."""
    inputs = [(text.positive, "the prompt embedding", "the text encoder (check its weights; fp16 umT5 overflows, "
                                                       "use bf16 or fp32)"),
              (text.negative, "the negative prompt embedding", "the text encoder (check its weights; fp16 umT5 "
                                                                 "overflows, use bf16 or fp32)")]
    if image is not None:
        inputs += [(image.y, "the image conditioning (mask + VAE latents)", "the VAE encode or the start image"),
                   (image.clip_fea, "the CLIP vision features", "the CLIP vision model or the start image")]
        inputs = [i for i in inputs if i[0] is not None]   # Wan 2.2 I2V-A14B has no CLIP features
    if init_latents is not None:
        inputs.append((init_latents, "the input latents (video-to-video)", "the VAE encode or the loaded LATENT"))
    for tensor, what, source in inputs:
        if not all_finite(tensor):
            raise NonFiniteError(f"{what} contains NaN/Inf, so every step would too. Likely cause: {source}.")


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


_STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dit_header(value, options: RunOptions, device: torch.device):
    """A DiT path's :class:`~wan_core.layouts.Detected` (header only, no weight read); None for a
    loaded model. A file of another kind is refused by the DiT loader, naming the right one."""
    from .checkpoint import inspect_checkpoint

    if not isinstance(value, (str, os.PathLike)):
        return None
    det = inspect_checkpoint(value)
    if det.kind != "dit":
        _load_dit(value, options, device)   # raises before reading any weight
    return det


def _load_dit(value, options: RunOptions, device: torch.device):
    """A DiT path loaded with ``options.weight_dtype`` storage; a loaded model as it is."""
    from . import loaders

    if not isinstance(value, (str, os.PathLike)):
        return value
    wd = options.weight_dtype
    if wd in _STORAGE:
        return loaders.load_dit(value, dtype=_STORAGE[wd], device=device, attention=options.attention)
    fp8 = wd if wd is not None and wd.startswith("fp8") else None
    return loaders.load_dit(value, device=device, weight_dtype=fp8, attention=options.attention)


def generate(*, dit, vae, text_encoder, clip_vision=None, prompt: str, negative_prompt: str = "",
             image: Tensor | None = None, end_image: Tensor | None = None, video: Tensor | None = None,
             width: int | None = None, height: int | None = None, frames: int = 81, max_area: int = 832 * 480,
             steps: int | None = None, cfg: float | None = None, shift: float | None = None,
             sampler: str = "unipc", seed: int = 0, denoise: float = 1.0, device: str | torch.device = "cpu",
             callback: Callable[[StepInfo], None] | None = None,
             interrupt: Callable[[], None] | None = None, prompt_cache: PromptCache | None = None,
             options: RunOptions | None = None, guidance: GuidanceOptions | None = None,
             context: ContextOptions | None = None, extend: Tensor | None = None,
             extend_overlap: int = 17, control_video: Tensor | None = None, control_mask: Tensor | None = None,
             reference_images: Sequence[Tensor] = (), vace_strength: float = 1.0, parallel=None) -> Tensor:
    """The whole job: models or checkpoint paths + settings -> frames ``[T, H, W, 3]`` in 0..1.

    T2V: ``prompt`` (+ width/height, default 832x480). I2V: add ``image`` ``[H, W, C]`` in 0..1
    and ``clip_vision``; the size defaults to the official one from ``max_area`` and the image
    aspect. FLF2V: add ``end_image`` with an FLF2V model. V2V: ``video`` ``[T, H, W, 3]`` in 0..1
    and ``denoise < 1`` with a T2V model. T2I: ``frames=1``. ``steps``/``shift``/``cfg`` default
    to the official values for the model type. Sizes are checked before any model runs.
    ``prompt_cache``: a :class:`~wan_core.text_cache.PromptCache`; prompts found there run no
    text encoder (and, given as a path, load none). A text encoder loaded here from a path is
    dropped right after encoding, before sampling; when the DiT is a path too, the DiT is read
    only after that (its header gives the checks and defaults first), so the two never rest
    in RAM together.

    Memory and speed go through one :func:`wan_core.run_plan.prepare_run` plan on ``device``:
    ``options`` (:class:`~wan_core.run_plan.RunOptions`: VRAM budget, resident blocks, text
    encoder device, VAE tiling, LoRAs, step cache, compile; default: auto). Models given as
    paths are loaded resting on the CPU (the DiT with ``options.weight_dtype`` and
    ``options.attention``); every model, given or loaded, gets device copies of its weights
    only while its stage runs, and each stage logs one plan line.

    Long videos: ``guidance`` / ``context`` as in :func:`sample`. ``extend``: frames
    ``[T, H, W, 3]`` to continue (:mod:`wan_core.extend`): the new clip of ``frames`` starts with
    their last ``extend_overlap`` frames (4n+1) pinned, I2V models start from their last frame
    (unless ``image`` is given), and the result is the source joined to the new clip with a
    cross-fade over the overlap (``T + frames - extend_overlap`` frames); pass it again to chain.

    VACE (a Wan2.1-VACE model): ``control_video`` ``[F, H, W, 3]`` in 0..1 (depth, pose, edges,
    or the frames to keep), ``control_mask`` ``[F, H, W]`` in 0..1 (1 = generate), ``reference_images``
    (``[h, w, 3]`` each), ``vace_strength`` (official 1.0); see :mod:`wan_core.vace_conditioning`.
    Without a control video the size is as for T2V; with one and no width/height, it is the video's.
    A VACE model given none of them runs the official no-control context (grey video, full mask).
    Fun Control (a Wan2.1-Fun[-V1.1] Control model, :mod:`wan_core.fun`): ``control_video`` as for
    VACE, ``image`` the optional start frame, ``reference_images`` at most one (V1.1 models); CLIP
    vision only with an image; defaults 50 steps, cfg 6. Fun InP: an I2V model, ``end_image`` allowed.

    ``parallel``: this process's :class:`~wan_core.distributed.ParallelGroups` when several
    processes share the sampling (every rank calls ``generate`` with the same arguments and
    gets the same frames).
    """
    # every number is checked against wan_core.limits before any model is loaded or runs
    sizes = (width, height, frames)
    if video is not None and video.ndim == 4:  # V2V: the size is the input video's
        sizes = (video.shape[2], video.shape[1], video.shape[0])
    check_run_arguments(width=sizes[0], height=sizes[1], frames=sizes[2],
                        max_area=max_area if image is not None else None, steps=steps, cfg=cfg, shift=shift,
                        sampler=sampler, seed=seed, denoise=denoise)
    options = options if options is not None else RunOptions()
    offload = torch.device("cpu")   # where every model rests between its stages
    # a DiT given as a path is read after the text encoder has run and gone (see below): its
    # config comes from the file's header for the checks and defaults
    dit_det = _dit_header(dit, options, offload)
    dit_cfg = dit.cfg if dit_det is None else dit_det.config
    kind = dit_cfg.model_type
    if kind in ("ti2v", "i2v_noclip"):   # Wan 2.2: their own one-call jobs (wan_core.generate22)
        raise ValueError(f"{dit_cfg.variant} is a Wan 2.2 model: run it with wan_core.generate_ti2v (TI2V-5B) or "
                         "wan_core.generate_a14b with both experts (I2V-A14B); generate() runs Wan 2.1 models.")
    if extend is not None:
        if video is not None:
            raise ValueError("extend (continue a video) and video (video-to-video) cannot be combined.")
        check_overlap(extend_overlap, extend.shape[0], frames)
        image = extend[-1] if dit_cfg.has_image_input and image is None else image   # I2V: from the last frame
        if (width, height) not in ((None, None), (extend.shape[2], extend.shape[1])):
            raise ValueError(f"extend: the video is {extend.shape[2]}x{extend.shape[1]}, but {width}x{height} was "
                             "asked; a continuation has the source's size (leave width/height unset).")
        width, height = extend.shape[2], extend.shape[1]
    check_conditioning(dit_cfg, image is not None, end_image=end_image is not None)
    img = image_to_tensor(image) if image is not None else None
    if video is not None:
        frames, height, width = video.shape[0], video.shape[1], video.shape[2]
    vace_inputs = control_video is not None or control_mask is not None or len(reference_images) > 0
    fun_control = getattr(dit_cfg, "fun", "") == "control"
    if fun_control:
        _check_fun_arguments(dit_cfg, control_mask, reference_images)
    elif vace_inputs and not dit_cfg.vace_layers:
        raise ValueError(f"control_video / control_mask / reference_images need a VACE model (or a Fun Control model "
                         f"for control_video); {dit_cfg.variant} is neither (load Wan2.1-VACE or Wan2.1-Fun Control).")
    if control_video is not None and width is None and height is None:   # VACE: the control video's size
        frames, height, width = control_video.shape[0], control_video.shape[1], control_video.shape[2]
    if img is not None and (width is None or height is None):
        width, height = i2v_size(img.shape[1], img.shape[2], max_area)
    width = 832 if width is None else width
    height = 480 if height is None else height
    check_video_size(width, height, frames)
    if fun_control:   # VideoX-Fun's examples: 50 steps, guidance 6 (shift as I2V: 3 at 480p with UniPC)
        steps, cfg = FUN_DEFAULTS["steps"] if steps is None else steps, FUN_DEFAULTS["cfg"] if cfg is None else cfg
    settings = default_settings(kind, width, height, steps=steps, cfg=cfg, shift=shift, sampler=sampler,
                                seed=seed, denoise=denoise)

    default_neg = {"t2v": NEGATIVE_PROMPT, "i2v": NEGATIVE_PROMPT_I2V, "flf2v": NEGATIVE_PROMPT_FLF2V}[kind]
    default_neg = NEGATIVE_PROMPT if fun_control else default_neg   # VideoX-Fun's own negative prompt
    prompts = [prompt, negative_prompt or default_neg]
    # guidance / context: as in sample(); with context windows the DiT's memory plan is one window's
    plan_frames = frames if context is None or not context.active(latent_frames(frames)) else context.context_frames
    needs_clip = img is not None or (fun_control and len(reference_images) > 0)
    if needs_clip and clip_vision is None:
        raise ValueError("image-to-video (and Fun Control with a start or reference image) needs clip_vision "
                         "(CLIP ViT-H/14).")

    def encode_prompts(stage) -> TextEmbeds:
        def encode(missing: list[str]) -> list[Tensor]:
            te = _load("t5", text_encoder, offload)
            with stage(te):
                return te.encode(list(missing))

        if prompt_cache is None:
            pos, neg = encode(prompts)
        else:  # the encoder is loaded (from a path) only when a prompt is missing
            pos, neg = prompt_cache.encode(prompt_cache.identity(text_encoder), prompts, encode)
        return TextEmbeds(pos.float().cpu(), neg.float().cpu())

    text = None
    if dit_det is not None:
        # RAM: umT5 (11 GB bf16) is loaded, run and dropped before the DiT (14 GB fp8 for 14B) is
        # read, so the two never rest in memory together. A budget the DiT cannot fit is still
        # refused before any model runs (from the header, as the CLI does).
        from .cli_checks import check_plan   # the header-only budget check the CLI makes before loading

        check_plan(dit_det, options, width, height, plan_frames, options.attention, str(torch.device(device)),
                   parallel=None if parallel is None else parallel.config)
        text = encode_prompts(lambda te: text_encoder_stage(te, options, device))
        dit = _load_dit(dit, options, offload)
    # the VAE and CLIP are loaded (resting on the CPU) before the plan, so it sizes their stages
    # too and refuses a budget too small for them before any model runs
    vae = _load("vae", vae, offload)
    if hasattr(vae, "config"):   # a Wan 2.1 DiT with the Wan 2.2 VAE (or the reverse): refused before any run
        check_vae_for_dit(dit_cfg, vae)
    clip = _load("clip", clip_vision, offload) if needs_clip else None
    encodes = img is not None or video is not None or extend is not None or bool(dit_cfg.vace_layers) or fun_control
    job = Job(width, height, frames, settings.steps, encode_video=encodes)   # what is encoded and decoded
    with prepare_run(dit, dataclasses.replace(job, frames=plan_frames), options, device, offload, vae=vae,
                     clip_vision=clip, parallel=parallel) as plan:
        if text is None:
            text = encode_prompts(plan.text_encoder)
        image_embeds = init = fun_embeds = None
        if fun_control:
            with plan.image_encode(vae, clip, what="VAE + CLIP vision (Fun Control)", job=job) as tiles:
                fun_embeds = encode_fun_control(vae, width, height, frames, control_video=control_video,
                                                start_image=image, clip_vision=clip, vae_tile=tiles.tile,
                                                reference_image=reference_images[0] if reference_images else None)
        elif img is not None and end_image is not None and kind == "i2v":   # Fun InP: CLIP of the start only
            with plan.image_encode(vae, clip, job=job) as tiles:
                image_embeds = encode_fun_inpaint(vae, width, height, frames, image=image, end_image=end_image,
                                                  clip_vision=clip, vae_tile=tiles.tile)
        elif img is not None:
            end = image_to_tensor(end_image) if end_image is not None else None
            with plan.image_encode(vae, clip, job=job) as tiles:
                image_embeds = encode_image_conditioning(vae, clip, img, frames, width, height, end,
                                                         vae_tile=tiles.tile)
        if video is not None:
            with plan.image_encode(vae, what="VAE (input video)", job=job) as tiles:
                init = encode_tiled(vae, video_to_tensor(video), **tiles.kwargs())[0].float().cpu()
        vace_embeds = None
        if dit_cfg.vace_layers:
            with plan.image_encode(vae, what="VAE (VACE context)", job=job) as tiles:
                vace_embeds = encode_vace(vae, width, height, frames, control_video=control_video,
                                          control_mask=control_mask, reference_images=reference_images,
                                          strength=vace_strength, vae_tile=tiles.tile)
        known = None
        if extend is not None:
            overlap_job = dataclasses.replace(job, frames=extend_overlap)
            with plan.image_encode(vae, what="VAE (extension overlap)", job=overlap_job) as tiles:
                overlap = video_to_tensor(extend[-extend_overlap:])
                known = encode_tiled(vae, overlap, **tiles.kwargs())[0].float().cpu()
        with plan.sampling() as runner:
            if parallel is not None:   # several processes share each step (wan_core.distributed)
                runner = parallel.wrap_runner(runner)
            latents = sample(dit, text, settings, shape=latent_shape(width, height, frames), image=image_embeds,
                             init_latents=init, callback=callback, interrupt=interrupt, runner=runner,
                             guidance=guidance, context=context, known_latents=known, vace=vace_embeds, fun=fun_embeds,
                             cfg_parallel=None if parallel is None else parallel.cfg_parallel())
        with plan.decode(vae, job) as tiling:
            decoded = decode_tiled(vae, latents[None], output_device="cpu", **tiling.kwargs())
    out = frames_from_video(decoded)
    return out if extend is None else join_videos(extend, out, extend_overlap)
