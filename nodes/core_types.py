"""Bridges between core ComfyUI types and ours, as small adapter nodes.

Adapters, not new optional sockets on WanCore Sampler / Image To Video Encode: their
``text_embeds`` / ``vae`` / ``clip_vision`` inputs are required, and a required socket can
never become optional (saved workflows store it). An adapter keeps each graph simple: one
extra node between the core encoders and our sampler, our sampler unchanged.

- core ``CONDITIONING`` (``CLIPTextEncode`` with a umT5 ``CLIP`` of type wan) -> our text embeds;
- core ``VAE`` (Wan 2.1) + ``CLIP_VISION_OUTPUT`` (``CLIPVisionEncode``, crop none) -> our
  image-to-video embeds;
- our DiT -> a core ``MODEL`` for ``KSampler`` / ``SamplerCustomAdvanced`` (:func:`host.core_model`).
"""
from __future__ import annotations

import torch

from . import host
from .conditioning import IMAGE_EMBEDS_TOOLTIP, TEXT_EMBEDS_TOOLTIP, image_inputs
from .types import DIT, MAX_SHIFT, TEXT_EMBEDS, VIDEO_EMBEDS, check_size

__all__ = ["WanCoreTextEmbedsFromConditioning", "WanCoreImageEmbedsFromCore", "WanCoreDiTToModel",
           "embeds_from_conditioning"]


def embeds_from_conditioning(conditioning, which: str) -> torch.Tensor:
    """Core CONDITIONING ``[[cond [1, L, D], {...}]]`` -> ``[L', D]`` float32 on the CPU, L' the
    real tokens: core umT5 zero-pads every prompt to 512 tokens (``zero_out_masked``), our
    DiT zero-pads to its text_len itself, so dropping the trailing zero rows changes nothing."""
    if not isinstance(conditioning, (list, tuple)) or len(conditioning) != 1:
        n = len(conditioning) if isinstance(conditioning, (list, tuple)) else type(conditioning).__name__
        raise ValueError(f"{which}: give the CONDITIONING of one prompt (CLIPTextEncode with a umT5 CLIP of type "
                         f"wan); got {n} entries (combined or area conditioning is not supported here).")
    cond = conditioning[0][0]
    if cond.ndim != 3 or cond.shape[0] != 1:
        raise ValueError(f"{which}: the conditioning must be one prompt's text embeddings [1, L, dim]; got shape "
                         f"{tuple(cond.shape)}.")
    cond = cond[0].float().cpu()
    nonzero = cond.abs().amax(dim=1).nonzero()
    length = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return cond[:length].clone()


class WanCoreTextEmbedsFromConditioning:
    """Core positive / negative CONDITIONING -> WanCore text embeds."""

    CATEGORY = "WanCore/conditioning"
    DESCRIPTION = ("Use core CLIPTextEncode with WanCore Sampler: connect the positive and negative CONDITIONING "
                   "of a umT5 CLIP (Load CLIP, type wan). Same numbers as WanCore Text Encode on the same weights.")
    FUNCTION = "convert"
    RETURN_TYPES = (TEXT_EMBEDS,)
    RETURN_NAMES = ("text_embeds",)
    OUTPUT_TOOLTIPS = (TEXT_EMBEDS_TOOLTIP,)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "CLIPTextEncode of the prompt, with a umT5 CLIP (type wan)."}),
            "negative": ("CONDITIONING", {"tooltip": "CLIPTextEncode of the negative prompt, same CLIP. The "
                                                     "official default negative prompt is not filled in here."}),
        }}

    def convert(self, positive, negative):
        from ..wan_core import TextEmbeds

        pos = embeds_from_conditioning(positive, "positive")
        neg = embeds_from_conditioning(negative, "negative")
        if pos.shape[1] != neg.shape[1]:
            raise ValueError(f"positive ({pos.shape[1]}-wide) and negative ({neg.shape[1]}-wide) embeddings come "
                             "from different text encoders; encode both with the same umT5 CLIP.")
        return (TextEmbeds(pos, neg),)


class WanCoreImageEmbedsFromCore:
    """Core VAE + CLIP vision output(s) + start (and end) image -> I2V / FLF2V video embeds."""

    CATEGORY = "WanCore/conditioning"
    DESCRIPTION = ("Image-to-video conditioning from core nodes: a Wan 2.1 VAE (Load VAE) and the "
                   "CLIPVisionEncode output of the start image (crop: none; clip_vision_h). The guide video is "
                   "built as WanCore Image To Video Encode builds it; for FLF2V also give the end image and its "
                   "CLIP vision output.")
    FUNCTION = "encode"
    RETURN_TYPES = (VIDEO_EMBEDS,)
    RETURN_NAMES = ("video_embeds",)
    OUTPUT_TOOLTIPS = (IMAGE_EMBEDS_TOOLTIP,)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("VAE", {"tooltip": "Core Load VAE with the Wan 2.1 VAE (wan_2.1_vae)."}),
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "CLIPVisionEncode of the start image, crop none (penultimate hidden states)."}),
                **image_inputs(),
            },
            "optional": {
                "end_image": ("IMAGE", {"tooltip": "FLF2V only: the last frame (the last image of a batch)."}),
                "clip_vision_output_end": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "FLF2V only: CLIPVisionEncode of the end image, crop none."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return check_size(width, height, frames)

    def encode(self, vae, clip_vision_output, start_image, width: int, height: int, frames: int,
               end_image=None, clip_vision_output_end=None):
        from ..wan_core import check_video_size, image_embeds_from, image_to_tensor, normalize_latents

        check_video_size(width, height, frames)
        if (end_image is None) != (clip_vision_output_end is None):
            raise ValueError("FLF2V needs both end_image and clip_vision_output_end (the CLIPVisionEncode of the "
                             "end image); for I2V connect neither.")
        end = image_to_tensor(end_image[-1]) if end_image is not None else None
        outputs = [clip_vision_output] + ([clip_vision_output_end] if end is not None else [])
        feats = torch.cat([_penultimate(o) for o in outputs], dim=0)

        def encode_guide(guide: torch.Tensor) -> torch.Tensor:
            pixels = guide.permute(1, 2, 3, 0).add(1.0).div(2.0)            # core IMAGE [T, H, W, 3], 0..1
            return normalize_latents(vae.encode(pixels).float().cpu())[0]   # core VAE: raw [1, 16, T', h, w]

        return (image_embeds_from(image_to_tensor(start_image[0]), feats, frames, width, height, encode_guide,
                                  end_image=end),)


def _penultimate(output) -> torch.Tensor:
    states = getattr(output, "penultimate_hidden_states", None)
    if states is None or states.ndim != 3 or states.shape[0] != 1:
        raise ValueError("clip_vision_output must be the CLIPVisionEncode output of one image (penultimate hidden "
                         "states [1, 257, 1280] from clip_vision_h).")
    return states[0].float().cpu()


class WanCoreDiTToModel:
    """Our loaded DiT -> a core MODEL (flow matching, Wan's shift)."""

    CATEGORY = "WanCore/loaders"
    DESCRIPTION = ("Use a WanCore DiT with core samplers (KSampler, SamplerCustomAdvanced, ModelSamplingSD3, core "
                   "LoRA and model-patching nodes), fed by core CONDITIONING and LATENT. Our memory plan, step "
                   "cache and LoRA options do not apply on that path; WanCore Sampler stays the default.")
    FUNCTION = "convert"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A core MODEL over the same weights (no copy), with Wan 2.1 flow-matching sampling.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT, {"tooltip": "From WanCore Load Diffusion Model."}),
            "shift": ("FLOAT", {"default": 5.0, "min": 0.0, "max": MAX_SHIFT, "step": 0.1, "round": 0.01,
                                "tooltip": "Flow-matching shift of the core sampling (official 5.0; 3.0 for "
                                           "480p I2V). ModelSamplingSD3 downstream overrides it."}),
        }}

    def convert(self, model, shift: float):
        from ..wan_core import weight_storage

        cfg = model.model.cfg
        if cfg.model_type in ("ti2v", "i2v_noclip"):   # core WAN21 would read their inputs as Wan 2.1's
            raise ValueError(f"WanCore DiT To Model bridges Wan 2.1 models; {cfg.variant} is a Wan 2.2 model "
                             "(TI2V-5B / I2V-A14B): sample it with WanCore Sampler.")
        if cfg.fun == "control":   # core WAN21 has no Fun control latents nor V1.1 reference tokens
            raise ValueError(f"WanCore DiT To Model bridges the official Wan 2.1 models; {cfg.variant} is a "
                             "Wan2.1-Fun Control model: sample it with WanCore Fun Control Encode and WanCore "
                             "Sampler.")
        storage = weight_storage(model.model)
        if storage != "float":
            # core LoRA / model patches rewrite weights in place as plain floats: on fp8 (with its
            # scales) or GGUF blocks that would silently corrupt the model
            raise ValueError(f"WanCore DiT To Model needs a DiT stored as bf16 / fp16 / fp32, but this one is "
                             f"stored as {storage}: core LoRA and model-patching nodes would corrupt its weights. "
                             "Load it with weight_dtype bf16 (fp8 files) or use WanCore Sampler, which runs fp8 "
                             "and GGUF models with WanCore LoRA Loader.")
        return (host.core_model(model.model, shift),)
