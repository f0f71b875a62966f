"""Fun Control node: control video, start and reference images -> the Fun Control conditioning
the sampler takes. (Fun InP needs no node of its own: its conditioning is the I2V one, built by
WanCore Image To Video Encode; the engine gives a Fun InP model the start image's CLIP tokens.)"""
from __future__ import annotations

from . import plans
from .conditioning import size_inputs
from .types import CLIP_VISION, VAE, VIDEO_EMBEDS, check_size

__all__ = ["WanCoreFunControlEncode"]


class WanCoreFunControlEncode:
    """Control video / start image / reference image -> Fun Control video embeds (wan_core.FunControlEmbeds)."""

    CATEGORY = "WanCore/conditioning"
    DESCRIPTION = ("Conditioning for a Wan2.1-Fun Control model (VideoX-Fun), built as VideoX-Fun builds it: the "
                   "control video VAE-encoded, the optional start image's latent at frame 0, CLIP tokens of the "
                   "reference (else start) image, and for Fun V1.1 models the reference image's latent as extra "
                   "tokens. The control video comes from any preprocessor (depth, pose, edges, grey-scale) as "
                   "IMAGE frames at width x height, one per frame.")
    FUNCTION = "encode"
    RETURN_TYPES = (VIDEO_EMBEDS,)
    RETURN_NAMES = ("video_embeds",)
    OUTPUT_TOOLTIPS = ("Fun Control conditioning and video size, for WanCore Sampler with a Fun Control model "
                       "(VideoX-Fun defaults: 50 steps, cfg 6, shift 3 at 480p / 5 at 720p).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (VAE, {"tooltip": "From WanCore Load VAE."}),
                **size_inputs(832, 480, 81),
            },
            "optional": {
                "control_video": ("IMAGE", {"tooltip": "Control frames (depth, pose, edges, ...), exactly 'frames' "
                                                       "images at width x height. Not connected: no control."}),
                "start_image": ("IMAGE", {"tooltip": "The first frame of the video (the first image of a batch); "
                                                     "resized to width x height. Needs clip_vision."}),
                "reference_image": ("IMAGE", {"tooltip": "Fun V1.1 Control only: subject / style reference (the "
                                                         "first image of a batch); resized. Needs clip_vision."}),
                "clip_vision": (CLIP_VISION, {"tooltip": "From WanCore Load CLIP Vision (clip_vision_h); needed "
                                                         "with a start or reference image."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return check_size(width, height, frames)

    def encode(self, vae, width: int, height: int, frames: int, control_video=None, start_image=None,
               reference_image=None, clip_vision=None):
        from ..wan_core import encode_fun_control

        start = start_image[0] if start_image is not None else None
        ref = reference_image[0] if reference_image is not None else None
        clip = clip_vision if start is not None or ref is not None else None
        models = (vae,) if clip is None else (vae, clip)
        with plans.image_encode_stage(*models, what="VAE + CLIP vision (Fun Control)",
                                      size=(width, height, frames)) as tiles:
            embeds = encode_fun_control(vae, width, height, frames, control_video=control_video, start_image=start,
                                        reference_image=ref, clip_vision=clip, vae_tile=tiles.tile)
        return (embeds,)
