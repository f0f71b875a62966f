"""The whole Wan 2.2 job in one call: A14B (two experts, T2V or I2V) and TI2V-5B.

Like :func:`wan_core.pipeline.generate` for Wan 2.1, on the same run plan
(:func:`~wan_core.run_plan.prepare_run`): the text encoder, image encode, sampling and decode
stages each get device copies of their model only while they run; for A14B each expert has
its own plan and only one expert is on the device at a time (:func:`~wan_core.moe.expert_stages`).
Models are given loaded (:func:`~wan_core.loaders22.load_expert_pair`, ``load_dit``,
``load_vae``, ``load_text_encoder``). Official settings are the defaults; the negative prompt
is the Wan 2.2 one (the same text as Wan 2.1 T2V's).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .conditioning import NEGATIVE_PROMPT, TextEmbeds, check_video_size, i2v_size, image_to_tensor, latent_shape
from .conditioning22 import encode_image_latents
from .loaders22 import check_vae_for_dit
from .moe import A14B_DEFAULTS, ExpertPair, MoEOptions, check_pair_options, expert_stages
from .pipeline import SamplerSettings, StepInfo, frames_from_video, sample
from .run_plan import Job, RunOptions, prepare_run
from .ti2v import TI2V_DEFAULTS, FirstFrameRunner, encode_ti2v_image, fit_image, ti2v_latent_shape, ti2v_size
from .vae_tiling import decode_tiled

__all__ = ["generate_a14b", "generate_ti2v", "A14B_VIDEO_DEFAULTS"]

# Official A14B video defaults (wan/configs/shared_config.py frame_num 81, sample_fps 16;
# generate.py --size 1280*720, which is also I2V's max_area); steps, shift and guidance per
# model are in wan_core.moe.A14B_DEFAULTS.
A14B_VIDEO_DEFAULTS = {"frames": 81, "fps": 16, "width": 1280, "height": 720, "max_area": 1280 * 720}


def _text(plan, text_encoder, prompt: str, negative: str) -> TextEmbeds:
    with plan.text_encoder(text_encoder):
        pos, neg = text_encoder.encode([prompt, negative or NEGATIVE_PROMPT])
    return TextEmbeds(pos.float().cpu(), neg.float().cpu())


def generate_a14b(*, experts: ExpertPair, vae, text_encoder, prompt: str, negative_prompt: str = "",
                  image: Tensor | None = None, width: int | None = None, height: int | None = None,
                  frames: int = A14B_VIDEO_DEFAULTS["frames"], max_area: int = A14B_VIDEO_DEFAULTS["max_area"],
                  steps: int | None = None,
                  shift: float | None = None, moe: MoEOptions | None = None, sampler: str = "unipc",
                  seed: int = 0, device: str | torch.device = "cpu", options: RunOptions | None = None,
                  low_options: RunOptions | None = None, callback: Callable[[StepInfo], None] | None = None,
                  interrupt: Callable[[], None] | None = None) -> Tensor:
    """Wan 2.2 T2V-A14B or I2V-A14B (decided by the experts' tensors) -> frames ``[T, H, W, 3]``
    in 0..1. I2V: ``image`` ``[H, W, C]`` in 0..1, no CLIP; the size defaults to the official
    one from ``max_area`` and the image aspect. ``moe`` / ``steps`` / ``shift`` default to the
    published values (:data:`~wan_core.moe.A14B_DEFAULTS`). ``options`` plan the high-noise
    expert (and everything else), ``low_options`` the low-noise one (default: ``options``), so
    LoRAs (e.g. per-expert distill LoRAs), fp8 and block swap can differ per expert."""
    cfg = experts.cfg
    i2v = cfg.model_type == "i2v_noclip"
    if cfg.model_type not in ("t2v", "i2v_noclip") or cfg.out_dim != 16:
        raise ValueError(f"{cfg.variant} is not a Wan 2.2 A14B expert (T2V or I2V); TI2V-5B runs with "
                         "generate_ti2v, Wan 2.1 models with generate.")
    if i2v != (image is not None):
        raise ValueError("I2V-A14B needs image=...; T2V-A14B takes no image." if i2v else
                         "T2V-A14B takes no image; load the I2V-A14B experts for image-to-video.")
    check_vae_for_dit(cfg, vae)
    check_pair_options(options, low_options)
    default_moe, default_shift, default_steps = A14B_DEFAULTS["i2v" if i2v else "t2v"]
    moe = moe or default_moe
    img = image_to_tensor(image) if image is not None else None
    if img is not None and (width is None or height is None):
        width, height = i2v_size(img.shape[1], img.shape[2], max_area)
    width, height = width or A14B_VIDEO_DEFAULTS["width"], height or A14B_VIDEO_DEFAULTS["height"]
    check_video_size(width, height, frames)
    settings = SamplerSettings(steps=steps or default_steps, shift=shift or default_shift, sampler=sampler,
                               seed=seed, cfg=moe.cfg_high)
    options = options or RunOptions()
    job = Job(width, height, frames, settings.steps, encode_video=i2v)
    with prepare_run(experts.high, job, options, device, vae=vae) as high_plan, \
            prepare_run(experts.low, job, low_options or options, device, vae=vae) as low_plan:
        text = _text(high_plan, text_encoder, prompt, negative_prompt)
        embeds = None
        if img is not None:
            with high_plan.image_encode(vae, what="VAE (start image)") as tiles:
                embeds = encode_image_latents(vae, img, frames, width, height, vae_tile=tiles.tile)
        with expert_stages(high_plan, low_plan, moe) as (runner, moe_run):
            latents = sample(experts.high, text, settings, shape=latent_shape(width, height, frames),
                             image=embeds, callback=callback, interrupt=interrupt, runner=runner, moe=moe_run)
        with high_plan.decode(vae, job) as tiling:
            decoded = decode_tiled(vae, latents[None], output_device="cpu", **tiling.kwargs())
    return frames_from_video(decoded)


def generate_ti2v(*, dit, vae, text_encoder, prompt: str, negative_prompt: str = "",
                  image: Tensor | None = None, width: int | None = None, height: int | None = None,
                  max_area: int = TI2V_DEFAULTS["max_area"], frames: int = TI2V_DEFAULTS["frames"],
                  steps: int = TI2V_DEFAULTS["steps"], cfg: float = TI2V_DEFAULTS["cfg"],
                  shift: float = TI2V_DEFAULTS["shift"], sampler: str = "unipc", seed: int = 0,
                  device: str | torch.device = "cpu", options: RunOptions | None = None,
                  callback: Callable[[StepInfo], None] | None = None,
                  interrupt: Callable[[], None] | None = None, parallel=None) -> Tensor:
    """Wan 2.2 TI2V-5B text-to-video, or text-image-to-video with ``image`` ``[H, W, C]`` in
    0..1 as the first frame -> frames ``[T, H, W, 3]`` in 0..1, with the Wan 2.2 VAE.

    Size: text-to-video ``width`` x ``height`` (default 1280 x 704). Image-to-video as the
    official script: without ``width`` / ``height`` the size is
    :func:`~wan_core.ti2v.ti2v_size` of the image within ``max_area`` pixels; the image is
    scaled (Lanczos) to cover the size and center-cropped (:func:`~wan_core.ti2v.fit_image`).

    ``parallel``: this process's :class:`~wan_core.distributed.ParallelGroups` when several
    processes share the sampling (every rank calls with the same arguments; each takes its
    tokens' rows of the per-token timesteps)."""
    if dit.cfg.model_type != "ti2v":
        raise ValueError(f"{dit.cfg.variant} is not a Wan 2.2 TI2V-5B model; use generate / generate_a14b.")
    if (width is None) != (height is None):
        raise ValueError(f"give both width and height, or neither (got width={width}, height={height}): "
                         "without them the official size is used (from max_area and the image's aspect).")
    check_vae_for_dit(dit.cfg, vae)
    if width is None or height is None:
        if image is not None:
            _c, ih, iw = image_to_tensor(image).shape   # checks the image before anything is sized
            width, height = ti2v_size(iw, ih, max_area)
        else:
            width, height = TI2V_DEFAULTS["width"], TI2V_DEFAULTS["height"]
    shape = ti2v_latent_shape(width, height, frames)
    settings = SamplerSettings(steps=steps, cfg=cfg, shift=shift, sampler=sampler, seed=seed)
    options = options or RunOptions()
    job = Job(width, height, frames, steps, encode_video=image is not None, space_stride=16,
              per_token_timesteps=image is not None)
    with prepare_run(dit, job, options, device, vae=vae, parallel=parallel) as plan:
        text = _text(plan, text_encoder, prompt, negative_prompt)
        z = None
        if image is not None:
            img = fit_image(image, width, height)
            with plan.image_encode(vae, what="VAE (first frame)", job=Job(width, height, 1, encode_video=True,
                                                                          space_stride=16)):
                z = encode_ti2v_image(vae, img)
        with plan.sampling() as runner:
            if parallel is not None:   # several processes share each step (wan_core.distributed)
                runner = parallel.wrap_runner(runner)
            if z is not None:
                runner = FirstFrameRunner(runner, z)
            latents = sample(dit, text, settings, shape=shape, runner=runner, known_latents=z,
                             callback=callback, interrupt=interrupt,
                             cfg_parallel=None if parallel is None else parallel.cfg_parallel())
        with plan.decode(vae, job) as tiling:
            decoded = decode_tiled(vae, latents[None], output_device="cpu", **tiling.kwargs())
    return frames_from_video(decoded)
