"""Conditioning nodes: prompts -> text embeddings; size or start image(s) -> video embeddings."""
from __future__ import annotations

import functools

from . import plans
from .types import (CLIP_VISION, MAX_FRAMES, MAX_SIZE, MEMORY_OPTIONS, TEXT_EMBEDS, TEXT_ENCODER, VAE, VIDEO_EMBEDS,
                    VideoSize, check_size)

__all__ = ["IMAGE_EMBEDS_TOOLTIP", "TEXT_EMBEDS_TOOLTIP", "WanCoreEmptyVideoEmbeds", "WanCoreImageToVideoEncode",
           "WanCoreTextEncode", "image_inputs", "prompt_cache", "size_inputs"]

# The outputs of the encoders here and of their core-input twins in nodes/core_types.py
TEXT_EMBEDS_TOOLTIP = "Prompt and negative prompt embeddings, for WanCore Sampler."
IMAGE_EMBEDS_TOOLTIP = "Image conditioning and video size, for WanCore Sampler with an I2V or FLF2V model."


@functools.cache
def prompt_cache():
    """The pack's one prompt-embedding cache (bounded: 32 prompts, 256 MiB on the CPU), keyed by
    the text encoder object (held weakly) and the prompt, so a re-queued prompt runs no umT5.
    Built on first use, never at import."""
    from ..wan_core import PromptCache

    return PromptCache(max_entries=32, max_bytes=256 * 2**20)


def size_inputs(width: int, height: int, frames: int) -> dict:
    """The width / height / frames widgets (pixels; frames 4n+1), with tooltips."""
    return {
        "width": ("INT", {"default": width, "min": 16, "max": MAX_SIZE, "step": 16,
                          "tooltip": "Video width in pixels, a multiple of 16 (832 for 480p, 1280 for 720p)."}),
        "height": ("INT", {"default": height, "min": 16, "max": MAX_SIZE, "step": 16,
                           "tooltip": "Video height in pixels, a multiple of 16 (480 for 480p, 720 for 720p)."}),
        "frames": ("INT", {"default": frames, "min": 1, "max": MAX_FRAMES, "step": 4,
                           "tooltip": "Number of frames, 4n+1: 81 is 5 s at 16 fps (as trained); 1 gives an image."}),
    }


def image_inputs() -> dict:
    """The start image and the width / height / frames widgets (832x480, 81 frames) of the
    image-to-video encoders (here and nodes/core_types.py)."""
    return {"start_image": ("IMAGE", {"tooltip": "The first frame of the video (the first image of a batch)."}),
            **size_inputs(832, 480, 81)}


class WanCoreTextEncode:
    """Positive and negative prompt -> umT5 embeddings."""

    CATEGORY = "WanCore/conditioning"
    DESCRIPTION = ("Encode the prompt and the negative prompt with umT5. An empty negative prompt uses the "
                   "official default negative prompt of the chosen model type.")
    FUNCTION = "encode"
    RETURN_TYPES = (TEXT_EMBEDS,)
    RETURN_NAMES = ("text_embeds",)
    OUTPUT_TOOLTIPS = (TEXT_EMBEDS_TOOLTIP,)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TEXT_ENCODER, {"tooltip": "From WanCore Load Text Encoder."}),
            "positive": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "What the video shows (Wan understands English and Chinese)."}),
            "negative": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "What to avoid. Empty: the official default negative prompt."}),
            "model_type": (["t2v", "i2v", "flf2v"], {
                "default": "t2v",
                "tooltip": "The model these prompts are for; picks the official default negative prompt used "
                           "when 'negative' is empty (i2v adds 'camera shake', flf2v also 'shot cut')."}),
        }, "optional": {
            "memory": (MEMORY_OPTIONS, {"tooltip": "WanCore Memory Options: text_encoder_on_cpu and the VRAM "
                                                   "budget decide where umT5 runs. Not connected: auto."}),
        }}

    def encode(self, text_encoder, positive: str, negative: str, model_type: str, memory=None):
        from ..wan_core import (
            NEGATIVE_PROMPT,
            NEGATIVE_PROMPT_FLF2V,
            NEGATIVE_PROMPT_I2V,
            TextEmbeds,
        )
        default = {"t2v": NEGATIVE_PROMPT, "i2v": NEGATIVE_PROMPT_I2V, "flf2v": NEGATIVE_PROMPT_FLF2V}[model_type]

        def run(prompts: list[str]):
            with plans.text_encoder_stage(text_encoder, plans.run_options(memory)):
                return [e.float().cpu() for e in text_encoder.encode(prompts)]

        cache = prompt_cache()
        pos, neg = cache.encode(cache.identity(text_encoder), [positive, negative or default], run)
        # copies: the cached tensors must never be changed by a later node
        return (TextEmbeds(pos.clone(), neg.clone()),)


class WanCoreEmptyVideoEmbeds:
    """The size of a text-to-video (or video-to-video) run."""

    CATEGORY = "WanCore/conditioning"
    DESCRIPTION = ("Video size for text-to-video: width and height (multiples of 16) and frames (4n+1). "
                   "Also gives the size for video-to-video, where it must match the input latent.")
    FUNCTION = "embeds"
    RETURN_TYPES = (VIDEO_EMBEDS,)
    RETURN_NAMES = ("video_embeds",)
    OUTPUT_TOOLTIPS = ("The video size, for WanCore Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": size_inputs(832, 480, 81)}

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return check_size(width, height, frames)

    def embeds(self, width: int, height: int, frames: int):
        from ..wan_core import check_video_size

        check_video_size(width, height, frames)
        return (VideoSize(width, height, frames),)


class WanCoreImageToVideoEncode:
    """Start image (and, for FLF2V, end image) -> I2V conditioning."""

    CATEGORY = "WanCore/conditioning"
    DESCRIPTION = ("Image-to-video conditioning: the start image (and, with an FLF2V model, the end image) "
                   "encoded by the VAE and by CLIP vision, at the given video size. The image is resized "
                   "to width x height without cropping: give a size of the same aspect ratio.")
    FUNCTION = "encode"
    RETURN_TYPES = (VIDEO_EMBEDS,)
    RETURN_NAMES = ("video_embeds",)
    OUTPUT_TOOLTIPS = (IMAGE_EMBEDS_TOOLTIP,)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (VAE, {"tooltip": "From WanCore Load VAE."}),
                "clip_vision": (CLIP_VISION, {"tooltip": "From WanCore Load CLIP Vision (clip_vision_h)."}),
                **image_inputs(),
            },
            "optional": {
                "end_image": ("IMAGE", {"tooltip": "FLF2V only: the last frame of the video (the last image of a "
                                                   "batch). Needs an FLF2V model."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return check_size(width, height, frames)

    def encode(self, vae, clip_vision, start_image, width: int, height: int, frames: int, end_image=None):
        from ..wan_core import encode_image_conditioning, image_to_tensor

        first = image_to_tensor(start_image[0])
        last = image_to_tensor(end_image[-1]) if end_image is not None else None
        with plans.image_encode_stage(vae, clip_vision, size=(width, height, frames)) as tiles:
            embeds = encode_image_conditioning(vae, clip_vision, first, frames, width, height, last,
                                               vae_tile=tiles.tile)
        return (embeds,)
