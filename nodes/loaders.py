"""Loader nodes: a file from a ComfyUI model folder -> a ready ``wan_core`` module.

Every published layout of each network loads (official, ComfyUI repackaged, diffusers,
fp8, scaled fp8); the variant is read from the tensor shapes, never from the file name.
Weights rest on ComfyUI's offload device (the CPU unless ``--highvram``) and move to the
GPU only while a node computes with them.
"""
from __future__ import annotations

import torch

from . import host
from .types import CLIP_VISION, DIT, LORAS, MEMORY_OPTIONS, TEXT_ENCODER, VAE, LoadedDiT

__all__ = ["WanCoreLoadDiT", "WanCoreLoadVAE", "WanCoreLoadTextEncoder", "WanCoreLoadCLIPVision"]

_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_TIP = ("Storage dtype of the weights. auto: as in the file (fp8 files stay fp8, upcast per layer); bf16 halves "
              "fp32's memory; fp32 is the slowest and most exact.")
# DiT only, appended after the original options (saved workflows keep their values): fp8
# storage of the Linear weights, upcast per layer (exact for the stored values).
_FP8 = {"fp8_e4m3fn": "fp8_e4m3fn", "fp8_e5m2": "fp8_e5m2", "keep (file)": "keep"}
_DIT_DTYPE_TIP = (_DTYPE_TIP + " fp8_e4m3fn / fp8_e5m2: Linear weights stored in fp8 (half of bf16; a bf16 file "
                  "is quantised at load with a per-tensor scale), computed in bf16 on a GPU. keep (file): "
                  "an fp8 file stays fp8 as it is; other files as auto.")


def _files(key: str, gguf_key: str | None = None) -> tuple[list[str], dict]:
    files = host.filename_list(key)
    if gguf_key is not None:   # GGUF files (ComfyUI-GGUF's folder key when installed)
        files = sorted(set(files) | set(host.gguf_filename_list(key, gguf_key)))
    # diffusers model folders (".../transformer/"), after the files so saved choices keep their place
    files = files + [f for f in host.model_folder_list(key) if f not in files]
    return files, {"tooltip": f"A file in ComfyUI's models/{key}/ folder, or a diffusers model folder "
                              "(name ending in '/', e.g. Wan2.1-T2V-1.3B-Diffusers/transformer/)."}


class WanCoreLoadDiT:
    """Wan diffusion transformer: Wan 2.1 (T2V 1.3B/14B, I2V 480p/720p, FLF2V) and Wan 2.2 (A14B experts,
    TI2V-5B)."""

    CATEGORY = "WanCore/loaders"
    DESCRIPTION = ("Load a Wan diffusion model from models/diffusion_models, in any published format; the type "
                   "is read from the weights: Wan 2.1 T2V, I2V, FLF2V, VACE; Wan 2.2 TI2V-5B, or one expert of a "
                   "Wan 2.2 A14B model (load the high-noise and the low-noise file with two of these nodes and "
                   "connect them to WanCore Sampler's model and low_noise_model).")
    FUNCTION = "load"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The diffusion model, for WanCore Sampler (an A14B low-noise expert: its "
                       "low_noise_model input).",)

    @classmethod
    def INPUT_TYPES(cls):
        files, tip = _files("diffusion_models", "unet_gguf")
        return {"required": {
            "model_name": (files, tip),
            "weight_dtype": (list(_DTYPES) + list(_FP8), {"default": "auto", "tooltip": _DIT_DTYPE_TIP}),
            "attention": (["sdpa", "auto", "sage", "flash"], {
                "default": "sdpa",
                "tooltip": "Attention kernel. sdpa: PyTorch's, always available; auto: the fastest installed "
                           "(SageAttention, FlashAttention, else sdpa); sage / flash: that package."}),
        }, "optional": {
            "memory": (MEMORY_OPTIONS, {"tooltip": "WanCore Memory Options used by every sampler of this model "
                                                   "whose own 'memory' input is not connected."}),
            "loras": (LORAS, {"tooltip": "WanCore LoRA Loader: LoRAs merged into the weights at load (no cost per "
                                         "step; not exact with fp8 storage: prefer the sampler's 'loras' there)."}),
        }}

    def load(self, model_name: str, weight_dtype: str, attention: str, memory=None, loras=None):
        from ..wan_core import DiTSource

        path = host.full_path("diffusion_models", model_name)
        host.make_room_to_load(path)
        # the file and load options travel with the model: multi-GPU workers load their own copy from them
        fp8 = _FP8.get(weight_dtype)
        source = DiTSource(path, dtype=None if fp8 else _DTYPES[weight_dtype], weight_dtype=fp8, attention=attention,
                           loras=tuple(loras or ()))
        return (LoadedDiT(source.load(host.offload_device()), memory, source),)


class WanCoreLoadVAE:
    """Wan VAE: Wan 2.1 (wan_2.1_vae.safetensors, Wan2.1_VAE.pth) or Wan 2.2 (wan2.2_vae.safetensors)."""

    CATEGORY = "WanCore/loaders"
    DESCRIPTION = ("Load a Wan VAE from models/vae (official .pth, ComfyUI or diffusers format): the Wan 2.1 VAE "
                   "(Wan 2.1 models and Wan 2.2 A14B) or the Wan 2.2 VAE (48 channels, for TI2V-5B only); which "
                   "one is read from the weights.")
    FUNCTION = "load"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE, for image-to-video encode, WanCore Decode and WanCore Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        files, tip = _files("vae")
        return {"required": {
            "vae_name": (files, tip),
            "weight_dtype": (["fp32", "bf16", "fp16"], {
                "default": "fp32",
                "tooltip": "fp32 as the official pipeline (exact); bf16 / fp16 halve the VAE's memory."}),
        }}

    def load(self, vae_name: str, weight_dtype: str):
        from ..wan_core import load_vae

        path = host.full_path("vae", vae_name)
        host.make_room_to_load(path)
        return (load_vae(path, dtype=_DTYPES[weight_dtype], device=host.offload_device()),)


class WanCoreLoadTextEncoder:
    """umT5-XXL text encoder with its tokenizer."""

    CATEGORY = "WanCore/loaders"
    DESCRIPTION = ("Load the umT5-XXL text encoder from models/text_encoders (e.g. "
                   "umt5_xxl_fp8_e4m3fn_scaled.safetensors, or the official .pth with spiece.model beside it).")
    FUNCTION = "load"
    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The text encoder, for WanCore Text Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        files, tip = _files("text_encoders", "clip_gguf")
        return {"required": {
            "text_encoder_name": (files, tip),
            "weight_dtype": (list(_DTYPES), {"default": "auto", "tooltip": _DTYPE_TIP}),
        }}

    def load(self, text_encoder_name: str, weight_dtype: str):
        from ..wan_core import load_text_encoder

        path = host.full_path("text_encoders", text_encoder_name)
        host.make_room_to_load(path)
        return (load_text_encoder(path, dtype=_DTYPES[weight_dtype], device=host.offload_device()),)


class WanCoreLoadCLIPVision:
    """CLIP ViT-H/14 vision tower used by Wan I2V / FLF2V."""

    CATEGORY = "WanCore/loaders"
    DESCRIPTION = ("Load the CLIP ViT-H/14 image encoder that Wan image-to-video needs from models/clip_vision "
                   "(clip_vision_h.safetensors, or the official open-clip .pth).")
    FUNCTION = "load"
    RETURN_TYPES = (CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The image encoder, for WanCore Image To Video Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        files, tip = _files("clip_vision")
        return {"required": {
            "clip_name": (files, tip),
            "weight_dtype": (list(_DTYPES), {"default": "auto", "tooltip": _DTYPE_TIP}),
        }}

    def load(self, clip_name: str, weight_dtype: str):
        from ..wan_core import load_clip_vision

        path = host.full_path("clip_vision", clip_name)
        host.make_room_to_load(path)
        return (load_clip_vision(path, dtype=_DTYPES[weight_dtype], device=host.offload_device()),)
