"""Wan Core: Wan 2.1 video generation in plain PyTorch (no ComfyUI imports).

Public API (documented in the README):

Loading (any published layout; config inferred from tensor shapes)::

    load_dit(path, dtype=None, device="cpu", attention="sdpa") -> WanDiT (T2V / I2V / FLF2V)
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
    sample(..., guidance=GuidanceOptions(slg_blocks=(9,), cfg_zero_star=True, riflex=True),
           context=ContextOptions(context_frames=81, overlap=48, schedule="static", fuse="pyramid"))

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

Limits and NaN guards (``wan_core.limits``: MAX_STEPS, MAX_SIZE, MAX_FRAMES, ...)::

    check_run_arguments(width=..., steps=..., cfg=...)   ValueError naming the limit, before any load
    NonFiniteError                                      NaN/Inf in a prediction, the latents or a VAE chunk

The run plan (one for generate(), the CLI and the nodes)::

    with prepare_run(dit, Job(w, h, frames), RunOptions(vram_budget=8 << 30), "cuda") as plan:
        with plan.text_encoder(te): ...; with plan.sampling() as runner: sample(..., runner=runner)
        with plan.decode(vae) as tiling: decode_tiled(vae, latents, **tiling.kwargs())

Control videos (edges / grey-scale / soft edges / blur, pad and box masks; kornia, in chunks)::

    control = preprocess_control(frames[0..1], ControlOptions(mode="canny", pad=(0, 0, 0, 0)), device="cuda")
    control.frames [T, H', W', 3], control.mask [1, H', W'] (1 = generate)  -> encode_vace / generate(control_video=)
    plan_control_chunks(frames.shape, options, budget_bytes) -> ControlChunks(frames per chunk, device bytes)

Wan2.1-Fun (VideoX-Fun) Control and InP (``wan_core.fun``; the model kind decides)::

    encode_fun_control(vae, w, h, frames, control_video=..., start_image=None, reference_image=None,
                       clip_vision=None) -> FunControlEmbeds;  sample(dit, ..., fun=FunControlEmbeds)
    encode_fun_inpaint(vae, w, h, frames, image=None, end_image=None, clip_vision=...) -> ImageEmbeds
    generate(dit=<Fun Control>, control_video=..., image=<start>, reference_images=[<V1.1 ref>])

The whole job::

    generate(dit=..., vae=..., text_encoder=..., prompt=..., ...) -> frames [T, H, W, 3] in 0..1

Wan 2.2 (A14B two-expert T2V / I2V, TI2V-5B with the 48-channel Wan 2.2 VAE)::

    pair = load_expert_pair("Wan2.2-T2V-A14B/")          # or two files / transformer + transformer_2
    generate_a14b(experts=pair, vae=..., text_encoder=..., prompt=..., image=None) -> frames
    sample(pair.high, ..., moe=MoESampling(pair.low, MOE_T2V_A14B))    # expert switch at t >= 875
    moe_for(pair.cfg, boundary=None, cfg_high=None, cfg_low=None)      # official MoEOptions, values replaced
    a14b_defaults(pair.cfg) -> (MoEOptions, shift, steps)              # published A14B settings
    normalize_latents22 / denormalize_latents22                        # raw <-> DiT space, 48 channels
    generate_ti2v(dit=load_dit("wan2.2_ti2v_5B.safetensors"), vae=load_vae("wan2.2_vae.safetensors"), ...)
    ti2v_size(image_w, image_h, max_area=704*1280) -> (w, h); fit_image(image, w, h)   # official TI2V I2V size/crop
    A14B_VIDEO_DEFAULTS, TI2V_DEFAULTS                                 # official frames, fps, sizes
    apply_expert_loras(pair, high_specs, low_specs, mode)              # per-expert LoRAs, all or nothing

Several GPUs from one host process (a pool of worker processes, one per GPU, started once)::

    pool = WorkerPool(PoolConfig(parse_devices("0,1,2,3"), ParallelConfig(ulysses=4)))
    latents = pool.sample(PoolJob(DiTSource("wan2.1_t2v_14B_fp8.safetensors"), text, settings, shape=shape),
                          callback=..., interrupt=...)      # rank 0's latents; PoolError names a failed rank
    WorkerPools().get(config) -> the one live pool (another config closes it); pool.close()
"""
import logging

from .checkpoint import inspect_checkpoint
from .clip_vision import encode_image
from .conditioning import (NEGATIVE_PROMPT, NEGATIVE_PROMPT_FLF2V, NEGATIVE_PROMPT_I2V, ImageEmbeds, TextEmbeds,
                           ConditioningError, check_conditioning, check_video_size, encode_image_conditioning, i2v_size, image_to_tensor, latent_shape,
                           make_noise)
from .configs import CLIPVisionConfig, DiTConfig, T5Config, VAEConfig
from .files import CheckpointError
from .compile import compile_blocks
from .layers import enable_fp8_matmul
from .loaders import TextEncoder, load_clip_vision, load_dit, load_text_encoder, load_vae
from .lora import LoraError, LoraReport, LoraSpec, applied_loras, apply_loras
from .offload import BlockSwap, on_device
from .planner import MemoryPlan, PlanError, dit_sizes, plan_memory, tokens_for
from .run_plan import (CompiledModels, CompileSpec, Job, RunOptions, RunPlan, StepCacheSpec, prepare_run)
from .runner import ContextKVCache, DiTRunner, context_kv_bytes
from .context_windows import ContextOptions
from .dit import RopeOptions
from .distributed import DistributedError, ParallelConfig
from .guidance import GuidanceOptions
from . import limits
from .errors import NonFiniteError
from .limits import check_run_arguments
from .pipeline import SamplerSettings, StepInfo, default_settings, generate, sample
from .schedulers import flow_schedule
from .step_cache import MagCache, TeaCache
from .text_cache import PromptCache
from .vae_tiling import decode_tiled, encode_tiled
from .vace import WanVaceDiT
from .vace_conditioning import VaceEmbeds, encode_vace
from .fun import FUN_DEFAULTS, FunControlEmbeds, encode_fun_control, encode_fun_inpaint
from .control_preprocess import (CONTROL_MODES, ControlChunks, ControlFrames, ControlOptions, plan_control_chunks,
                                 preprocess_control)
from .video import read_video, write_image, write_mp4
from .vae22 import VAE22Config, WanVAE22
from .moe import (MOE_I2V_A14B, MOE_T2V_A14B, ExpertPair, ExpertRunner, MoEOptions, MoESampling,
                  a14b_defaults, apply_expert_loras, expert_stages, moe_for)
from .vae22 import denormalize_latents22, normalize_latents22
from .conditioning22 import encode_image_latents
from .loaders22 import check_vae_for_dit, expert_paths, load_expert_pair
from .ti2v import TI2V_DEFAULTS, FirstFrameRunner, encode_ti2v_image, ti2v_latent_shape
from .ti2v import fit_image, ti2v_size
from .generate22 import A14B_VIDEO_DEFAULTS, generate_a14b, generate_ti2v
# Building blocks the ComfyUI nodes (and other hosts) use: the nodes import only from here.
from .conditioning import image_embeds_from
from .context_windows import plan_shape
from .extend import check_overlap, extension_inputs, join_videos
from .files import INDEX_SUFFIX, weights_in_folder
from .guidance import parse_blocks, parse_cfg_schedule
from .layers import weight_storage
from .pipeline import frames_from_video, video_to_tensor
from .planner import free_vram_bytes
from .quant import is_quantized
from .run_plan import decode_stage, image_encode_stage, stage_bytes, text_encoder_stage
from .vae import denormalize_latents, normalize_latents
from .worker_pool import DiTSource, PoolConfig, PoolError, PoolJob, WorkerPool, WorkerPools, parse_devices

__version__ = "0.1.0"

# A library logs, the application decides where it goes: without this, Python's last-resort
# handler would print wan_core's warnings (never its INFO load lines) to stderr on its own.
# See the load lines with logging.basicConfig(level=logging.INFO).
logging.getLogger("wan_core").addHandler(logging.NullHandler())

__all__ = [
    "load_dit", "load_vae", "load_text_encoder", "load_clip_vision", "inspect_checkpoint", "TextEncoder", "DiTRunner", "ContextKVCache", "context_kv_bytes",
    "encode_image", "encode_image_conditioning", "sample", "generate", "default_settings", "SamplerSettings",
    "StepInfo", "TextEmbeds", "ImageEmbeds", "NonFiniteError", "CheckpointError", "check_video_size",
    "latent_shape", "make_noise", "i2v_size", "image_to_tensor", "flow_schedule", "write_mp4", "read_video",
    "write_image",
    "DiTConfig", "VAEConfig", "T5Config", "CLIPVisionConfig", "NEGATIVE_PROMPT", "NEGATIVE_PROMPT_I2V",
    "NEGATIVE_PROMPT_FLF2V", "BlockSwap", "on_device", "plan_memory", "MemoryPlan", "PlanError", "dit_sizes",
    "tokens_for", "enable_fp8_matmul", "compile_blocks", "LoraSpec", "LoraReport", "LoraError", "apply_loras",
    "applied_loras", "TeaCache", "MagCache", "PromptCache", "decode_tiled", "encode_tiled", "limits",
    "check_run_arguments", "RunOptions", "StepCacheSpec", "CompileSpec", "Job", "RunPlan", "prepare_run",
    "CompiledModels", "check_conditioning", "ConditioningError", "GuidanceOptions", "ContextOptions", "RopeOptions",
    "ParallelConfig", "DistributedError",
    "WorkerPool", "WorkerPools", "PoolConfig", "PoolJob", "PoolError", "DiTSource", "parse_devices",
    "WanVaceDiT", "VaceEmbeds", "encode_vace",
    "FunControlEmbeds", "encode_fun_control", "encode_fun_inpaint", "FUN_DEFAULTS",
    "ControlOptions", "ControlFrames", "ControlChunks", "preprocess_control", "plan_control_chunks", "CONTROL_MODES",
    "WanVAE22", "VAE22Config", "MoEOptions", "MoESampling", "ExpertPair", "ExpertRunner", "expert_stages",
    "MOE_T2V_A14B", "MOE_I2V_A14B", "a14b_defaults", "moe_for", "normalize_latents22", "denormalize_latents22",
    "encode_image_latents",
    "load_expert_pair", "expert_paths", "check_vae_for_dit", "TI2V_DEFAULTS", "FirstFrameRunner",
    "encode_ti2v_image", "ti2v_latent_shape", "fit_image", "ti2v_size",
    "generate_a14b", "generate_ti2v", "A14B_VIDEO_DEFAULTS", "apply_expert_loras",
    "__version__",
    "image_embeds_from", "plan_shape", "check_overlap", "extension_inputs", "join_videos", "INDEX_SUFFIX", "weights_in_folder", "parse_blocks", "parse_cfg_schedule", "weight_storage", "frames_from_video", "video_to_tensor", "free_vram_bytes", "is_quantized", "decode_stage", "image_encode_stage", "stage_bytes", "text_encoder_stage", "denormalize_latents", "normalize_latents",
]
