"""The sampler node: model + embeddings (+ input latent for video-to-video) -> LATENT."""
from __future__ import annotations

from . import host, multigpu, plans, wan22
from .types import (COMPILE, CONTEXT_OPTIONS, DIT, GUIDANCE_OPTIONS, LATENT_CHANNELS, LORAS, MAX_CFG, MAX_SEED,
                    MAX_SHIFT, MAX_STEPS, MEMORY_OPTIONS, MIN_CFG, MOE_OPTIONS, MULTI_GPU, SAMPLERS, STEP_CACHE,
                    TEXT_EMBEDS, VIDEO_EMBEDS, VideoSize)

__all__ = ["WanCoreSampler"]

# VALIDATE_INPUTS is called without an input that is not connected, and with None for one
# that is (its value is computed later): this default tells the two apart.
_NOT_CONNECTED = "not connected"


# Appended to wan_core's conditioning errors: how the graph supplies each kind of conditioning.
_WIRING = ("In the graph: video_embeds come from WanCore Empty Video Embeds (T2V, V2V) or WanCore Image To Video "
           "Encode (I2V with a start image; FLF2V also with end_image) or WanCore Image To Video Encode (Wan 2.2) "
           "(I2V-A14B, TI2V-5B), and an input latent must have the size of video_embeds.")


class WanCoreSampler:
    """Flow-matching sampling with classifier-free guidance, as the official Wan 2.1 pipelines."""

    CATEGORY = "WanCore/sampling"
    DESCRIPTION = ("Sample a Wan video: text-to-video (Empty Video Embeds), image-to-video and "
                   "first-last-frame (Image To Video Encode), or video-to-video (connect an input LATENT and "
                   "set denoise below 1). Wan 2.2: A14B with the high-noise expert on 'model' and the low-noise "
                   "expert on 'low_noise_model'; TI2V-5B like a Wan 2.1 model (its image through Image To Video "
                   "Encode (Wan 2.2)). Outputs a LATENT in ComfyUI's Wan 2.1 (16 channels) or Wan 2.2 (TI2V-5B, "
                   "48 channels) convention, which core VAE Decode and Save Latent accept.")
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Sampled latents {'samples': [1, 16, (frames-1)/4+1, height/8, width/8]} in raw VAE "
                       "space (ComfyUI's Wan 2.1 convention; TI2V-5B: [1, 48, ..., height/16, width/16], Wan 2.2), "
                       "for WanCore Decode or core VAE Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "From WanCore Load Diffusion Model."}),
                "text_embeds": (TEXT_EMBEDS, {"tooltip": "From WanCore Text Encode."}),
                "video_embeds": (VIDEO_EMBEDS, {
                    "tooltip": "From WanCore Empty Video Embeds (T2V, V2V) or WanCore Image To Video Encode "
                               "(I2V, FLF2V)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Noise seed; the same seed gives the same video on every device."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": MAX_STEPS,
                                  "tooltip": "Sampling steps. Official: 50 for T2V, 40 for I2V / FLF2V."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": MIN_CFG, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                                  "tooltip": "Guidance scale (official 5.0). 1.0 turns guidance off and "
                                             "halves the time. Not used by a Wan 2.2 A14B pair (each expert has "
                                             "its own: WanCore MoE Options)."}),
                "shift": ("FLOAT", {"default": 5.0, "min": 0.0, "max": MAX_SHIFT, "step": 0.1, "round": 0.01,
                                    "tooltip": "Schedule shift (official: 5.0; 3.0 for I2V at 480p; 16 for "
                                               "FLF2V). Higher spends more steps on coarse structure."}),
                "sampler": (list(SAMPLERS), {
                    "default": "unipc",
                    "tooltip": "Solver. unipc is the official default; dpm++ the official alternative."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "1.0 samples from pure noise. Below 1 (video-to-video) starts "
                                                 "from the input latent noised to this level; needs 'latent'."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Video-to-video: the input video's latent (WanCore Encode or "
                                                 "Load Latent); its size must match video_embeds."}),
                "memory": (MEMORY_OPTIONS, {
                    "tooltip": "WanCore Memory Options: VRAM budget and block swap. Not connected: the options "
                               "given to the loader, else auto (plan from the free VRAM; in place on the CPU)."}),
                "loras": (LORAS, {"tooltip": "WanCore LoRA Loader: LoRAs applied unmerged while sampling "
                                             "(exact; removed afterwards). A Wan 2.2 A14B pair: applied to both "
                                             "experts; a LoRA for one expert goes to that expert's loader."}),
                "step_cache": (STEP_CACHE, {"tooltip": "WanCore Step Cache: skip the blocks on steps that change "
                                                       "little (faster, approximate)."}),
                "compile": (COMPILE, {"tooltip": "WanCore Compile Options: torch.compile the transformer blocks. "
                                                 "Not connected: plain PyTorch (the default)."}),
                "context": (CONTEXT_OPTIONS, {"tooltip": "WanCore Context Options: sample a long video in "
                                                         "overlapping windows. Not connected: one window."}),
                "guidance": (GUIDANCE_OPTIONS, {"tooltip": "WanCore Guidance Options: SLG, CFG-Zero*, a cfg "
                                                           "schedule, RIFLEx. Not connected: official CFG."}),
                "low_noise_model": (DIT, {"tooltip": "Wan 2.2 A14B: the low-noise expert (WanCore Load Diffusion "
                                                     "Model); 'model' is then the high-noise expert. The experts "
                                                     "switch at the boundary (shown on the node and in the log); "
                                                     "one is on the GPU at a time; the sampler's cfg is replaced "
                                                     "by each expert's (WanCore MoE Options, published values by "
                                                     "default). Official: 40 steps, shift 12 (T2V) / 5 (I2V)."}),
                "moe": (MOE_OPTIONS, {"tooltip": "WanCore MoE Options: boundary and guidance of each expert, for a "
                                                 "Wan 2.2 A14B pair. Not connected: the published values."}),
                "multi_gpu": (MULTI_GPU, {"tooltip": "WanCore Multi-GPU Options: sample on several GPUs, in worker "
                                                     "processes (one per GPU, kept between runs) that load the "
                                                     "model's file themselves. Not connected: this process, one "
                                                     "GPU. Wan 2.1 models."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, denoise=None, latent=_NOT_CONNECTED):
        if denoise is None:
            return True
        if not 0.0 < float(denoise) <= 1.0:
            return f"denoise must be above 0 and at most 1; got {denoise}."
        if float(denoise) < 1.0 and isinstance(latent, str) and latent == _NOT_CONNECTED:
            return ("denoise below 1 is video-to-video: connect the input video's LATENT (WanCore Encode) to "
                    "'latent', or set denoise to 1.0.")
        return True

    def sample(self, model, text_embeds, video_embeds, seed: int, steps: int, cfg: float, shift: float,
               sampler: str, denoise: float, latent=None, memory=None, loras=None, step_cache=None,
               compile=None, context=None, guidance=None, low_noise_model=None, moe=None, multi_gpu=None,
               unique_id=None):
        from ..wan_core import (ConditioningError, FunControlEmbeds, ImageEmbeds, SamplerSettings, VaceEmbeds,
                                check_conditioning, latent_shape, sample)
        from ..wan_core import denormalize_latents, normalize_latents

        if multi_gpu is not None and wan22.is_wan22_run(model, video_embeds, low_noise_model, moe):
            raise ValueError("Wan 2.2 models do not run on several GPUs yet: disconnect WanCore Multi-GPU Options.")
        if wan22.is_wan22_run(model, video_embeds, low_noise_model, moe):   # A14B pair, TI2V-5B
            settings = SamplerSettings(steps=steps, cfg=cfg, shift=shift, sampler=sampler, seed=seed, denoise=denoise)
            try:
                return wan22.sample22(model, text_embeds, video_embeds, settings, latent=latent, memory=memory,
                                      loras=loras, step_cache=step_cache, compile=compile, context=context,
                                      guidance=guidance, low_noise_model=low_noise_model, moe=moe,
                                      unique_id=unique_id)
            except ConditioningError as err:
                raise ValueError(f"{err} {_WIRING}") from None
        dit = model.model
        image = video_embeds if isinstance(video_embeds, ImageEmbeds) else None
        vace = video_embeds if isinstance(video_embeds, VaceEmbeds) else None   # WanCore VACE Encode
        fun = video_embeds if isinstance(video_embeds, FunControlEmbeds) else None   # WanCore Fun Control Encode
        shape = None
        if vace is not None or fun is not None:
            shape = (vace or fun).latent_shape
        elif image is None:
            size: VideoSize = video_embeds
            shape = latent_shape(size.width, size.height, size.frames)
        init = None
        if latent is not None:
            samples = latent["samples"]
            if samples.ndim != 5 or samples.shape[0] != 1 or samples.shape[1] != LATENT_CHANNELS:
                raise ValueError(f"the input latent must be one Wan 2.1 video latent [1, 16, T', h, w]; got shape "
                                 f"{tuple(samples.shape)}.")
            init = normalize_latents(samples.float().cpu())[0]
        elif denoise < 1.0:
            raise ValueError("denoise below 1 is video-to-video: connect the input video's LATENT, or set denoise "
                             "to 1.0.")
        try:
            shape = check_conditioning(dit.cfg, image, shape=shape, init_shape=None if init is None else init.shape)
        except ConditioningError as err:
            raise ValueError(f"{err} {_WIRING}") from None

        settings = SamplerSettings(steps=steps, cfg=cfg, shift=shift, sampler=sampler, seed=seed, denoise=denoise)
        progress = host.Progress(steps, unique_id, preview=True)
        options = plans.run_options(memory or model.memory, loras or (), step_cache, compile)
        if multi_gpu is not None:   # WanCore Multi-GPU Options: the worker processes sample it
            out = multigpu.sample_on_pool(multi_gpu, model, text_embeds, settings, shape=shape, image=image,
                                          init_latents=init, vace=vace, fun=fun, options=options,
                                          guidance=guidance, context=context, progress=progress)
            return ({"samples": denormalize_latents(out[None])},)
        from ..wan_core import plan_shape

        # with context windows the plan budgets one window's frames (the peak)
        with plans.prepare(dit, plan_shape(shape, context), options) as plan, plan.sampling() as runner:
            out = sample(dit, text_embeds, settings, shape=shape, image=image, init_latents=init,
                         callback=lambda info: progress.update(info.step, info.total, info.x0),
                         interrupt=host.check_interrupt, runner=runner, guidance=guidance, context=context,
                         vace=vace, fun=fun)
        return ({"samples": denormalize_latents(out[None])},)
