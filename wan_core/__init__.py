"""Wan Core: Wan 2.1 video generation in plain PyTorch (no ComfyUI imports).

Public API (documented in the README):

Loading (any published layout; config inferred from tensor shapes)::

    load_dit(path, dtype=None, device="cpu")          -> WanDiT (T2V / I2V / FLF2V)
    load_vae(path, dtype=torch.float32, device="cpu") -> WanVAE
    load_text_encoder(path, dtype=None, device="cpu", tokenizer_path=None) -> TextEncoder
    load_clip_vision(path, dtype=None, device="cpu")  -> CLIPVisionTower
    inspect_checkpoint(path)                          -> Detected (kind, layout, config, quant)

Stages::

    TextEncoder.encode([prompt, negative])            -> [L, 4096] tensors
    encode_image(clip, images[-1..1])                 -> [B, 257, 1280] CLIP tokens
    WanVAE.encode(video[-1..1]) / WanVAE.decode(latents)
    encode_image_conditioning(vae, clip, image, frames, width, height, end_image=None) -> ImageEmbeds
    sample(dit, TextEmbeds, SamplerSettings, shape=..., image=..., init_latents=..., callback=..., interrupt=...)

Memory (fp8 storage, block swap, planner)::

    load_dit(path, weight_dtype="keep" | "fp8_e4m3fn" | "fp8_e5m2")   fp8 Linear weights, upcast per call
    plan = plan_memory(budget_bytes, dit_sizes(cfg, "fp8_e4m3fn"), tokens_for(w, h, frames), ...)
    swap = BlockSwap(plan.resident_blocks, "cuda").setup(dit)
    sample(dit, ..., runner=DiTRunner(dit, executor=swap)); swap.release()
    with on_device(vae, "cuda"): vae.decode(latents)

Speed (step caches, LoRA, compile)::

    runner = DiTRunner(dit, step_cache=TeaCache.for_model(dit, threshold=0.08))
    with applied_loras(dit, [LoraSpec("style.safetensors", 0.8)]) as report: sample(..., runner=runner)
    compile_blocks(dit)                                  # off by default; falls back to eager

The whole job::

    generate(dit=..., vae=..., text_encoder=..., prompt=..., ...) -> frames [T, H, W, 3] in 0..1
"""
from .checkpoint import inspect_checkpoint
from .clip_vision import encode_image
from .conditioning import (NEGATIVE_PROMPT, NEGATIVE_PROMPT_FLF2V, NEGATIVE_PROMPT_I2V, ImageEmbeds, TextEmbeds,
                           check_video_size, encode_image_conditioning, i2v_size, image_to_tensor, latent_shape,
                           make_noise)
from .configs import CLIPVisionConfig, DiTConfig, T5Config, VAEConfig
from .files import CheckpointError
from .compile import compile_blocks
from .fp8 import enable_fp8_matmul
from .loaders import TextEncoder, load_clip_vision, load_dit, load_text_encoder, load_vae
from .lora import LoraError, LoraReport, LoraSpec, applied_loras, apply_loras
from .offload import BlockSwap, on_device
from .planner import MemoryPlan, PlanError, dit_sizes, plan_memory, tokens_for
from .runner import DiTRunner
from .pipeline import NonFiniteError, SamplerSettings, StepInfo, default_settings, generate, sample
from .schedulers import flow_schedule
from .step_cache import MagCache, TeaCache
from .text_cache import PromptCache
from .vae_tiling import decode_tiled, encode_tiled
from .video import read_video, write_mp4

__version__ = "0.1.0"

__all__ = [
    "load_dit", "load_vae", "load_text_encoder", "load_clip_vision", "inspect_checkpoint", "TextEncoder", "DiTRunner",
    "encode_image", "encode_image_conditioning", "sample", "generate", "default_settings", "SamplerSettings",
    "StepInfo", "TextEmbeds", "ImageEmbeds", "NonFiniteError", "CheckpointError", "check_video_size",
    "latent_shape", "make_noise", "i2v_size", "image_to_tensor", "flow_schedule", "write_mp4", "read_video",
    "DiTConfig", "VAEConfig", "T5Config", "CLIPVisionConfig", "NEGATIVE_PROMPT", "NEGATIVE_PROMPT_I2V",
    "NEGATIVE_PROMPT_FLF2V", "BlockSwap", "on_device", "plan_memory", "MemoryPlan", "PlanError", "dit_sizes",
    "tokens_for", "enable_fp8_matmul", "compile_blocks", "LoraSpec", "LoraReport", "LoraError", "apply_loras",
    "applied_loras", "TeaCache", "MagCache", "PromptCache", "decode_tiled", "encode_tiled", "__version__",
]
