"""Long-video and guidance option nodes: context windows, and SLG / CFG-Zero* / cfg schedule / RIFLEx.

Each outputs a frozen ``wan_core`` value for the sampler's optional ``context`` / ``guidance``
sockets; not connected, the sampler runs the official single-window CFG.
"""
from __future__ import annotations

from . import host, plans
from .types import (CLIP_VISION, CONTEXT_OPTIONS, DIT, GUIDANCE_OPTIONS, MAX_CFG, MAX_FRAMES, MAX_SEED, MAX_SHIFT,
                    MAX_STEPS, MIN_CFG, TEXT_EMBEDS, VAE)

__all__ = ["WanCoreContextOptions", "WanCoreExtendVideo", "WanCoreGuidanceOptions"]


class WanCoreContextOptions:
    """Context windows: sample a long video one window of frames at a time."""

    CATEGORY = "WanCore/options"
    DESCRIPTION = ("Context windows for WanCore Sampler: a video longer than context_frames is denoised in "
                   "overlapping windows (Wan is trained on 81 frames), each window a clip of its own with the full "
                   "prompt and, for image-to-video, the start/end image only where those frames fall; the window "
                   "predictions are blended over the overlap. Memory: one window's, whatever the length. "
                   "Windows match ComfyUI's WanContextWindowsManual (static / uniform / looped, pyramid / flat / "
                   "overlap-linear).")
    FUNCTION = "options"
    RETURN_TYPES = (CONTEXT_OPTIONS,)
    RETURN_NAMES = ("context",)
    OUTPUT_TOOLTIPS = ("Context-window settings, for the 'context' input of WanCore Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "context_frames": ("INT", {"default": 81, "min": 5, "max": 1025, "step": 4,
                                       "tooltip": "Frames per window (4n+1); 81 is what Wan 2.1 was trained on."}),
            "overlap": ("INT", {"default": 48, "min": 0, "max": 1024, "step": 4,
                                "tooltip": "Frames shared by neighbouring windows; more overlap blends better and "
                                           "costs more windows."}),
            "schedule": (["static", "uniform", "looped"], {
                "default": "static",
                "tooltip": "static: the same windows every step. uniform: the seams move each step. looped: the "
                           "windows wrap from the end into the start, for a seamless loop."}),
            "fuse": (["pyramid", "flat", "overlap-linear"], {
                "default": "pyramid",
                "tooltip": "How overlapping windows are blended: pyramid (weight highest mid-window), flat "
                           "(plain average), overlap-linear (linear cross-fade over the overlap)."}),
            "global_positions": ("BOOLEAN", {
                "default": False,
                "tooltip": "Give each window its place in the whole video as RoPE positions (off: every window "
                           "is a clip of its own, as Wan was trained)."}),
            "freenoise": ("BOOLEAN", {
                "default": False,
                "tooltip": "FreeNoise: the starting noise after the first window repeats earlier frames' noise "
                           "in a seeded shuffle, for more consistent windows."}),
        }}

    def options(self, context_frames: int, overlap: int, schedule: str, fuse: str, global_positions: bool,
                freenoise: bool):
        from ..wan_core import ContextOptions

        return (ContextOptions(int(context_frames), int(overlap), schedule, fuse, 1, bool(global_positions),
                               bool(freenoise)),)


class WanCoreGuidanceOptions:
    """Skip Layer Guidance, CFG-Zero*, a cfg schedule and RIFLEx."""

    CATEGORY = "WanCore/options"
    DESCRIPTION = ("Guidance settings for WanCore Sampler. Skip Layer Guidance: the unconditional pass skips "
                   "chosen blocks over part of the run (published for Wan: block 9 on 1.3B, 10 on 14B, 20-80 %). "
                   "CFG-Zero*: an optimised guidance scale per step, optionally zeroing the first steps. "
                   "cfg_schedule: another cfg from a given step on (cfg 1 skips the unconditional pass, halving "
                   "the cost). RIFLEx: keeps videos longer than 81 frames from repeating. The defaults change "
                   "nothing.")
    FUNCTION = "options"
    RETURN_TYPES = (GUIDANCE_OPTIONS,)
    RETURN_NAMES = ("guidance",)
    OUTPUT_TOOLTIPS = ("Guidance settings, for the 'guidance' input of WanCore Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "slg_blocks": ("STRING", {"default": "", "tooltip": "Blocks the unconditional pass skips, e.g. 9 (1.3B) "
                                                                "or 10 (14B); several as 9,10. Empty: SLG off."}),
            "slg_start": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "SLG acts from this fraction of the steps (published 0.2)."}),
            "slg_end": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "SLG acts up to this fraction of the steps (published 0.8)."}),
            "cfg_zero_star": ("BOOLEAN", {"default": False,
                                          "tooltip": "CFG-Zero*: scale the unconditional prediction by its optimal "
                                                     "projection on the conditional one each step."}),
            "zero_init_steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                        "tooltip": "CFG-Zero* zero-init: the first N steps output zero (official: "
                                                   "1). 0: off."}),
            "cfg_schedule": ("STRING", {"default": "",
                                        "tooltip": "START_STEP:CFG pairs, e.g. 0:6,10:3,30:1 (steps count from 0; "
                                                   "cfg 1 skips the unconditional pass). Empty: the sampler's cfg."}),
            "riflex": ("BOOLEAN", {"default": False,
                                   "tooltip": "RIFLEx: lower Wan's intrinsic temporal RoPE frequency (index 6) so "
                                              "videos past 81 frames do not loop back (single-window runs)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, slg_blocks=None, cfg_schedule=None):
        from ..wan_core import parse_blocks, parse_cfg_schedule

        try:
            if isinstance(slg_blocks, str):
                parse_blocks(slg_blocks)
            if isinstance(cfg_schedule, str):
                parse_cfg_schedule(cfg_schedule)
        except ValueError as err:
            return str(err)
        return True

    def options(self, slg_blocks: str, slg_start: float, slg_end: float, cfg_zero_star: bool, zero_init_steps: int,
                cfg_schedule: str, riflex: bool):
        from ..wan_core import GuidanceOptions, parse_blocks, parse_cfg_schedule

        return (GuidanceOptions(slg_blocks=parse_blocks(slg_blocks), slg_start=float(slg_start),
                                slg_end=float(slg_end), cfg_zero_star=bool(cfg_zero_star),
                                zero_init_steps=int(zero_init_steps), cfg_schedule=parse_cfg_schedule(cfg_schedule),
                                riflex=bool(riflex)),)


class WanCoreExtendVideo:
    """Continue a video: a new clip starting from its last frames, joined with a cross-fade."""

    CATEGORY = "WanCore/sampling"
    DESCRIPTION = ("Extend a video (frames from WanCore Decode or Load Video): a new clip of 'frames' whose first "
                   "'overlap' frames are the video's last ones (kept while sampling), cross-faded into the result. "
                   "Image-to-video models also start from the video's last frame (connect clip_vision). Chain "
                   "several to keep going. Outputs the whole video (input + new frames).")
    FUNCTION = "extend"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("video",)
    OUTPUT_TOOLTIPS = ("The input video followed by the new frames (len + frames - overlap).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "From WanCore Load Diffusion Model (T2V or I2V)."}),
                "vae": (VAE, {"tooltip": "From WanCore Load VAE."}),
                "text_embeds": (TEXT_EMBEDS, {"tooltip": "From WanCore Text Encode: the prompt of the new clip."}),
                "video": ("IMAGE", {"tooltip": "The video to continue (frames, sides multiples of 16)."}),
                "frames": ("INT", {"default": 81, "min": 5, "max": MAX_FRAMES, "step": 4,
                                   "tooltip": "Frames of the new clip (4n+1), overlap included."}),
                "overlap": ("INT", {"default": 17, "min": 1, "max": MAX_FRAMES, "step": 4,
                                    "tooltip": "Frames of the video the new clip starts with (4n+1)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Noise seed of the new clip."}),
                "steps": ("INT", {"default": 40, "min": 1, "max": MAX_STEPS, "tooltip": "Sampling steps."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": MIN_CFG, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                                  "tooltip": "Guidance scale (official 5.0)."}),
                "shift": ("FLOAT", {"default": 5.0, "min": 0.0, "max": MAX_SHIFT, "step": 0.1, "round": 0.01,
                                    "tooltip": "Schedule shift (official 5.0; 3.0 for I2V at 480p)."}),
                "sampler": (["unipc", "dpm++", "euler"], {"default": "unipc", "tooltip": "Solver."}),
            },
            "optional": {
                "clip_vision": (CLIP_VISION, {"tooltip": "Image-to-video models: CLIP vision for the last frame."}),
                "context": (CONTEXT_OPTIONS, {"tooltip": "WanCore Context Options for a long new clip."}),
                "guidance": (GUIDANCE_OPTIONS, {"tooltip": "WanCore Guidance Options."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def extend(self, model, vae, text_embeds, video, frames: int, overlap: int, seed: int, steps: int, cfg: float,
               shift: float, sampler: str, clip_vision=None, context=None, guidance=None, unique_id=None):
        from ..wan_core import SamplerSettings, check_overlap, extension_inputs, join_videos, plan_shape, sample
        from ..wan_core import decode_tiled, frames_from_video

        dit, source = model.model, video.float().cpu()
        settings = SamplerSettings(steps=steps, cfg=cfg, shift=shift, sampler=sampler, seed=seed)
        options = plans.run_options(model.memory)
        check_overlap(int(overlap), source.shape[0], int(frames))   # before the stage plans the encode
        # the encode tile is planned for the longest video encoded: I2V's guide video of the new clip
        encoded = int(frames) if dit.cfg.has_image_input else int(overlap)
        with plans.image_encode_stage(vae, *(() if clip_vision is None else (clip_vision,)),
                                      what="VAE (extension overlap)", options=options,
                                      size=(source.shape[2], source.shape[1], encoded)) as tiles:
            known, image, shape = extension_inputs(dit, vae, source, int(frames), int(overlap), clip_vision,
                                                   vae_tile=tiles.tile)
        progress = host.Progress(steps, unique_id, preview=True)
        with plans.prepare(dit, plan_shape(shape, context), options) as plan, plan.sampling() as runner:
            latents = sample(dit, text_embeds, settings, shape=None if image is not None else shape, image=image,
                             runner=runner, guidance=guidance, context=context, known_latents=known,
                             callback=lambda info: progress.update(info.step, info.total, info.x0),
                             interrupt=host.check_interrupt)
        with plans.decode_stage(vae, options, latents.shape) as tiles:
            decoded = decode_tiled(vae, latents[None], output_device="cpu", **tiles.kwargs())
        return (join_videos(source, frames_from_video(decoded), int(overlap)),)
