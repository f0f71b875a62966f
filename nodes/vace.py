"""VACE node: control video, mask and reference images -> the VACE context the sampler takes."""
from __future__ import annotations

from . import plans
from .conditioning import size_inputs
from .types import VAE, VIDEO_EMBEDS, check_size

__all__ = ["WanCoreVACEEncode"]


class WanCoreVACEEncode:
    """Control video / mask / reference images -> VACE video embeds (wan_core.VaceEmbeds)."""

    CATEGORY = "WanCore/conditioning"
    DESCRIPTION = ("VACE conditioning for a Wan2.1-VACE model, built as the official code builds it: the control "
                   "video split by the mask into kept and regenerated parts, each VAE-encoded, the mask packed "
                   "to latent size, reference images encoded and put before the video (and cut from the "
                   "result). The control video comes from any preprocessor (depth, pose, edges, grey-scale) as "
                   "IMAGE frames at width x height, one per frame.")
    FUNCTION = "encode"
    RETURN_TYPES = (VIDEO_EMBEDS,)
    RETURN_NAMES = ("video_embeds",)
    OUTPUT_TOOLTIPS = ("VACE context and video size, for WanCore Sampler with a VACE model.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (VAE, {"tooltip": "From WanCore Load VAE."}),
                **size_inputs(832, 480, 81),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "How strongly the control steers the video (the official "
                                                  "context scale, 1.0); 0 turns VACE off."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Fraction of the steps after which VACE starts."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Fraction of the steps after which VACE stops."}),
            },
            "optional": {
                "control_video": ("IMAGE", {"tooltip": "Control frames (depth, pose, edges, or the frames to keep), "
                                                       "exactly 'frames' images at width x height. Not connected: "
                                                       "no control (grey)."}),
                "control_mask": ("MASK", {"tooltip": "1 = generate, 0 = keep the control frame's pixels; one mask "
                                                     "per frame or one for all. Not connected: generate everything."}),
                "reference_images": ("IMAGE", {"tooltip": "Subjects or style to show (each image of the batch is one "
                                                          "reference), fitted onto white at the video size."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None, start_percent=None, end_percent=None):
        if start_percent is not None and end_percent is not None and not start_percent < end_percent:
            return f"start_percent ({start_percent}) must be below end_percent ({end_percent})."
        return check_size(width, height, frames)

    def encode(self, vae, width: int, height: int, frames: int, strength: float, start_percent: float,
               end_percent: float, control_video=None, control_mask=None, reference_images=None):
        from ..wan_core import encode_vace

        refs = [] if reference_images is None else list(reference_images)
        with plans.image_encode_stage(vae, what="VAE (VACE context)", size=(width, height, frames)) as tiles:
            embeds = encode_vace(vae, width, height, frames, control_video=control_video, control_mask=control_mask,
                                 reference_images=refs, strength=strength, start=start_percent, end=end_percent,
                                 vae_tile=tiles.tile)
        return (embeds,)
