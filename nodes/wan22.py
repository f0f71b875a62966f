"""Wan 2.2 in the graph: the A14B expert switch settings, image conditioning without CLIP, and
the sampler's Wan 2.2 paths (two experts; TI2V-5B's 48-channel latents).

A14B: the high-noise expert goes to WanCore Sampler's ``model``, the low-noise expert to its
optional ``low_noise_model`` (both from WanCore Load Diffusion Model, each with its own
dtype, memory options and LoRAs); WanCore MoE Options (optional) changes the boundary and
the guidance of each expert, which default to the published values of the model. Only one
expert is on the GPU at a time (``wan_core.expert_stages``). I2V-A14B and TI2V-5B take the
start image through WanCore Image To Video Encode (Wan 2.2): VAE latents, no CLIP.
"""
from __future__ import annotations

import contextlib
import logging

from . import host, plans
from .conditioning import size_inputs
from .types import (MAX_CFG, MOE_OPTIONS, VAE, VIDEO_EMBEDS, FirstFrameEmbeds, MoESettings, VideoSize,
                    check_size)

__all__ = ["WanCoreMoEOptions", "WanCoreImageToVideoEncode22", "is_wan22_run", "sample22"]

log = logging.getLogger("wan_core")
TI2V_CHANNELS = 48   # latent channels of the Wan 2.2 VAE / TI2V-5B


class WanCoreMoEOptions:
    """Wan 2.2 A14B: when the experts switch and how strongly each is guided."""

    CATEGORY = "WanCore/sampling"
    DESCRIPTION = ("Wan 2.2 A14B settings for WanCore Sampler (with low_noise_model connected): the noise level "
                   "where the low-noise expert takes over and the guidance scale of each expert. The defaults "
                   "(0 / -1) are the published values of the model: T2V-A14B boundary 0.875, cfg 4.0 (high "
                   "noise) / 3.0 (low noise); I2V-A14B boundary 0.900, cfg 3.5 / 3.5.")
    FUNCTION = "options"
    RETURN_TYPES = (MOE_OPTIONS,)
    RETURN_NAMES = ("moe",)
    OUTPUT_TOOLTIPS = ("Expert switch and per-expert guidance, for WanCore Sampler's 'moe' input.",)

    @classmethod
    def INPUT_TYPES(cls):
        cfg_tip = ("Guidance scale of the {} expert; -1: the published value (T2V-A14B {}, I2V-A14B 3.5). 1.0 turns "
                   "guidance off for that expert (distill LoRAs such as lightx2v use 1.0).")
        return {"required": {
            "boundary": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.005, "round": 0.001,
                                   "tooltip": "Fraction of the 1000 training timesteps: the high-noise expert runs "
                                              "the steps whose timestep is at least boundary x 1000, the low-noise "
                                              "expert the rest. 0: the published value (T2V 0.875, I2V 0.900)."}),
            "cfg_high_noise": ("FLOAT", {"default": -1.0, "min": -1.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                                         "tooltip": cfg_tip.format("high-noise (early steps)", "4.0")}),
            "cfg_low_noise": ("FLOAT", {"default": -1.0, "min": -1.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                                        "tooltip": cfg_tip.format("low-noise (late steps)", "3.0")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, boundary=None, cfg_high_noise=None, cfg_low_noise=None):
        for name, value in (("cfg_high_noise", cfg_high_noise), ("cfg_low_noise", cfg_low_noise)):
            if value is not None and float(value) < 0 and float(value) != -1.0:
                return f"{name} must be -1 (the published value) or a guidance scale 0..{MAX_CFG:g}; got {value}."
        return True

    def options(self, boundary: float, cfg_high_noise: float, cfg_low_noise: float):
        err = self.VALIDATE_INPUTS(boundary, cfg_high_noise, cfg_low_noise)
        if err is not True:
            raise ValueError(err)
        return (MoESettings(boundary=float(boundary) if boundary > 0 else None,
                            cfg_high_noise=None if cfg_high_noise < 0 else float(cfg_high_noise),
                            cfg_low_noise=None if cfg_low_noise < 0 else float(cfg_low_noise)),)


class WanCoreImageToVideoEncode22:
    """Start image -> Wan 2.2 image conditioning (I2V-A14B or TI2V-5B), no CLIP."""

    CATEGORY = "WanCore/conditioning"
    DESCRIPTION = ("Wan 2.2 image-to-video conditioning from the start image, without CLIP vision. With the Wan "
                   "2.1 VAE: I2V-A14B (mask + latents of the image followed by grey frames). With the Wan 2.2 VAE: "
                   "TI2V-5B (the first frame's latents, kept while sampling; width and height multiples of 32; "
                   "official 1280x704 or 704x1280, 121 frames at 24 fps). The image is resized to cover "
                   "width x height and center-cropped for TI2V-5B, resized without cropping for I2V-A14B.")
    FUNCTION = "encode"
    RETURN_TYPES = (VIDEO_EMBEDS,)
    RETURN_NAMES = ("video_embeds",)
    OUTPUT_TOOLTIPS = ("Image conditioning and video size, for WanCore Sampler with a Wan 2.2 I2V-A14B pair or "
                       "TI2V-5B.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE, {"tooltip": "From WanCore Load VAE: the Wan 2.1 VAE for I2V-A14B, the Wan 2.2 VAE "
                                     "(wan2.2_vae) for TI2V-5B."}),
            "start_image": ("IMAGE", {"tooltip": "The first frame of the video (the first image of a batch)."}),
            **size_inputs(832, 480, 81),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return check_size(width, height, frames)

    def encode(self, vae, start_image, width: int, height: int, frames: int):
        from ..wan_core import (encode_image_latents, encode_ti2v_image, fit_image, image_to_tensor,
                                ti2v_latent_shape)

        if vae.config.z_dim == TI2V_CHANNELS:   # the Wan 2.2 VAE: TI2V-5B's first frame
            ti2v_latent_shape(width, height, frames)   # sizes TI2V-5B can sample, before any work
            image = fit_image(start_image[0], width, height)
            with plans.image_encode_stage(vae, what="VAE (first frame)"):
                z = encode_ti2v_image(vae, image)
            return (FirstFrameEmbeds(z, width, height, frames),)
        first = image_to_tensor(start_image[0])
        with plans.image_encode_stage(vae, what="VAE (start image)", size=(width, height, frames)) as tiles:
            embeds = encode_image_latents(vae, first, frames, width, height, vae_tile=tiles.tile)
        return (embeds,)


# ------------------------------------------------------------------------- the sampler's Wan 2.2 paths

def is_wan22_run(model, video_embeds, low_noise_model=None, moe=None) -> bool:
    """True when WanCore Sampler runs a Wan 2.2 job (an expert pair, TI2V-5B, or Wan 2.2
    conditioning), which :func:`sample22` handles."""
    return (low_noise_model is not None or moe is not None or isinstance(video_embeds, FirstFrameEmbeds)
            or model.model.cfg.out_dim == TI2V_CHANNELS)


def _shape(dit, video_embeds, context):
    """(latent shape, plan job, image embeds, first-frame latents) of a Wan 2.2 run."""
    from ..wan_core import ImageEmbeds, Job, latent_shape, plan_shape, ti2v_latent_shape

    cfg = dit.cfg
    ti2v = cfg.out_dim == TI2V_CHANNELS
    if isinstance(video_embeds, FirstFrameEmbeds) and not ti2v:
        raise ValueError(f"the video_embeds come from WanCore Image To Video Encode (Wan 2.2) with the Wan 2.2 VAE "
                         f"(TI2V-5B conditioning), but the model is {cfg.variant}: load the TI2V-5B model, or encode "
                         "the image with the Wan 2.1 VAE for I2V-A14B.")
    if isinstance(video_embeds, ImageEmbeds) and ti2v:
        raise ValueError(f"{cfg.variant} (TI2V-5B) takes the first frame from WanCore Image To Video Encode "
                         "(Wan 2.2) with the Wan 2.2 VAE; these video_embeds hold 16-channel (Wan 2.1 VAE) "
                         "conditioning.")
    if not isinstance(video_embeds, (VideoSize, FirstFrameEmbeds, ImageEmbeds)):
        raise ValueError("Wan 2.2 models take video_embeds from WanCore Empty Video Embeds (text to video) or "
                         "WanCore Image To Video Encode (Wan 2.2) (image to video).")
    z = video_embeds.latents if isinstance(video_embeds, FirstFrameEmbeds) else None
    image = video_embeds if isinstance(video_embeds, ImageEmbeds) else None
    w, h, f = video_embeds.width, video_embeds.height, video_embeds.frames
    shape = ti2v_latent_shape(w, h, f) if ti2v else latent_shape(w, h, f)
    t_win = plan_shape(shape, context)[1]   # with context windows the plan budgets one window (the peak)
    # TI2V image-to-video runs per-token timesteps: the plan counts their time embeddings
    return shape, Job(w, h, (t_win - 1) * 4 + 1, encode_video=False, per_token_timesteps=z is not None), image, z


def _init_latents(latent, channels: int):
    """The input LATENT (raw VAE space) -> normalised latents ``[C, T', h, w]``."""
    from ..wan_core import normalize_latents, normalize_latents22

    samples = latent["samples"]
    if samples.ndim != 5 or samples.shape[0] != 1 or samples.shape[1] != channels:
        raise ValueError(f"the input latent must be one video latent [1, {channels}, T', h, w] of this model's VAE; "
                         f"got shape {tuple(samples.shape)}.")
    norm = normalize_latents22 if channels == TI2V_CHANNELS else normalize_latents
    return norm(samples.float().cpu())[0]


def _moe_options(dit, moe: MoESettings | None):
    from ..wan_core import moe_for

    moe = moe or MoESettings()
    return moe_for(dit.cfg, moe.boundary, moe.cfg_high_noise, moe.cfg_low_noise)


def sample22(model, text_embeds, video_embeds, settings, *, latent=None, memory=None, loras=None, step_cache=None,
             compile=None, context=None, guidance=None, low_noise_model=None, moe=None, unique_id=None):
    """WanCore Sampler on a Wan 2.2 job -> its LATENT output (raw VAE space: ComfyUI's Wan 2.1
    convention for 16 channels, Wan 2.2 for TI2V-5B's 48). ``settings``: the sampler's
    :class:`wan_core.SamplerSettings` (its ``cfg`` is not used by an expert pair)."""
    from ..wan_core import (ExpertPair, FirstFrameRunner, check_conditioning, denormalize_latents,
                            denormalize_latents22, expert_stages, flow_schedule, sample)

    dit = model.model
    if moe is not None and low_noise_model is None:
        raise ValueError("WanCore MoE Options is connected but low_noise_model is not: connect the low-noise expert "
                         "(Wan 2.2 A14B) to low_noise_model, or disconnect 'moe'.")
    shape, job, image, z = _shape(dit, video_embeds, context)
    channels = shape[0]
    init = None if latent is None else _init_latents(latent, channels)
    check_conditioning(dit.cfg, image, shape=shape, init_shape=None if init is None else init.shape)
    if init is None and settings.denoise < 1.0:
        raise ValueError("denoise below 1 is video-to-video: connect the input video's LATENT, or set denoise to 1.0.")
    progress = host.Progress(settings.steps, unique_id, preview=True, latent_channels=channels)
    options = plans.run_options(memory or model.memory, loras or (), step_cache, compile)
    kwargs = dict(shape=shape, image=image, init_latents=init, known_latents=z, guidance=guidance, context=context,
                  interrupt=host.check_interrupt,
                  callback=lambda info: progress.update(info.step, info.total, info.x0))
    with contextlib.ExitStack() as stack:
        if low_noise_model is not None:
            try:
                pair = ExpertPair(dit, low_noise_model.model)
            except ValueError as err:
                raise ValueError(f"model and low_noise_model are not the two experts of one Wan 2.2 A14B model: "
                                 f"{err}") from None
            rule = _moe_options(pair.high, moe)
            text = rule.describe(flow_schedule(settings.steps, settings.shift, settings.sampler,
                                               settings.denoise).timesteps)
            log.info("wan_core: %s (the sampler's cfg is not used by an expert pair)", text)
            host.progress_text(text, unique_id)
            low_options = plans.run_options(memory or low_noise_model.memory, loras or (), step_cache, compile)
            high_plan = stack.enter_context(plans.prepare(pair.high, job, options))
            low_plan = stack.enter_context(plans.prepare(pair.low, job, low_options))
            runner, moe_run = stack.enter_context(expert_stages(high_plan, low_plan, rule))
            out = sample(pair.high, text_embeds, settings, runner=runner, moe=moe_run, **kwargs)
        else:
            plan = stack.enter_context(plans.prepare(dit, job, options))
            runner = stack.enter_context(plan.sampling())
            if z is not None:   # TI2V-5B image to video: the first latent frame is the image's
                runner = FirstFrameRunner(runner, z)
            out = sample(dit, text_embeds, settings, runner=runner, **kwargs)
    denorm = denormalize_latents22 if channels == TI2V_CHANNELS else denormalize_latents
    return ({"samples": denorm(out[None])},)
