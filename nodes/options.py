"""Option nodes: memory settings, LoRA files and a step cache, each a small value for the
loader / sampler / decode nodes' optional inputs.

They only describe a request (frozen values, cheap to cache in ComfyUI's graph); the nodes
that consume them do the work, so connecting one never changes a saved workflow's widgets.
"""
from __future__ import annotations

from . import host
from .types import COMPILE, LORAS, MEMORY_OPTIONS, STEP_CACHE, MemoryOptions

__all__ = ["WanCoreCompileOptions", "WanCoreLoraLoader", "WanCoreMemoryOptions", "WanCoreStepCache"]


class WanCoreMemoryOptions:
    """VRAM budget, block swap, text-encoder placement and VAE tiling of a run."""

    CATEGORY = "WanCore/options"
    DESCRIPTION = ("Memory settings for WanCore Load Diffusion Model / Sampler / Text Encode / Decode. "
                   "Everything 'auto' plans from the free VRAM: the DiT blocks that do not fit stay in system "
                   "RAM and are streamed to the GPU one block ahead (same numbers, slower). The plan is logged "
                   "in one line. Without a GPU (--cpu) it runs in place.")
    FUNCTION = "options"
    RETURN_TYPES = (MEMORY_OPTIONS,)
    RETURN_NAMES = ("memory",)
    OUTPUT_TOOLTIPS = ("Memory options, for the 'memory' input of the loader, sampler, text encode or decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vram_budget_gb": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5, "round": 0.01,
                "tooltip": "GPU memory the run may use, in GiB. 0: the free VRAM when each stage starts. "
                           "E.g. 8 on an 8 GB card shared with the desktop: the planner keeps 0.5 GiB spare."}),
            "resident_blocks": ("INT", {
                "default": -1, "min": -1, "max": 1000,
                "tooltip": "DiT blocks kept on the GPU while sampling (the rest are streamed from RAM). "
                           "-1: the planner's choice for the budget; 0 streams all (least VRAM)."}),
            "text_encoder_on_cpu": (["auto", "yes", "no"], {
                "default": "auto",
                "tooltip": "Run umT5 on the CPU (slow, no VRAM). auto: only when it does not fit the budget."}),
            "vae_tile": (["auto", "off", "custom"], {
                "default": "auto",
                "tooltip": "VAE decode tiling when WanCore Decode's tiling is 'auto': auto tiles only when a "
                           "frame does not fit the budget; off never tiles; custom uses vae_tile_size."}),
            "vae_tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                      "tooltip": "custom vae_tile: tile side in pixels (a multiple of 8)."}),
        }}

    def options(self, vram_budget_gb: float, resident_blocks: int, text_encoder_on_cpu: str, vae_tile: str,
                vae_tile_size: int):
        return (MemoryOptions(float(vram_budget_gb), int(resident_blocks), text_encoder_on_cpu, vae_tile,
                              int(vae_tile_size)),)


class WanCoreLoraLoader:
    """One LoRA file and its strength, chained after earlier ones."""

    CATEGORY = "WanCore/loaders"
    DESCRIPTION = ("A LoRA from models/loras (official, ComfyUI, diffusers/PEFT or kohya names; low-rank or "
                   "full-delta distillation LoRAs). Chain several. Into WanCore Sampler: applied unmerged while "
                   "it samples (exact, also with fp8 weights and block swap). Into the loader: merged into the "
                   "weights once (no cost per step; with fp8 storage small LoRAs lose precision). Keys that "
                   "match nothing in the model are logged by name.")
    FUNCTION = "load"
    RETURN_TYPES = (LORAS,)
    RETURN_NAMES = ("loras",)
    OUTPUT_TOOLTIPS = ("The LoRAs so far, for the 'loras' input of the sampler, the DiT loader or a LoRA loader.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (host.filename_list("loras"), {"tooltip": "A file in ComfyUI's models/loras/ folder."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Scale of the LoRA (times alpha/rank); 0 turns it off, "
                                                  "negative subtracts it."}),
            },
            "optional": {
                "loras": (LORAS, {"tooltip": "Earlier LoRAs (another WanCore LoRA Loader); this one is added "
                                             "after them."}),
            },
        }

    def load(self, lora_name: str, strength: float, loras=None):
        from ..wan_core import LoraSpec

        spec = LoraSpec(host.full_path("loras", lora_name), float(strength))
        return (tuple(loras or ()) + (spec,),)


class WanCoreStepCache:
    """TeaCache / MagCache: skip the transformer blocks on steps that change little."""

    CATEGORY = "WanCore/options"
    DESCRIPTION = ("Step cache for WanCore Sampler: on steps where the model's output is predicted to change "
                   "little, the transformer blocks are skipped and the last change is reused (about 1.5-2.5x "
                   "faster at some quality cost). Published settings: TeaCache mode e with threshold 0.08 (1.3B) "
                   "/ 0.2 (14B); MagCache 0.12 with K 2. The sampler logs how many steps were reused.")
    FUNCTION = "options"
    RETURN_TYPES = (STEP_CACHE,)
    RETURN_NAMES = ("step_cache",)
    OUTPUT_TOOLTIPS = ("Step cache settings, for the 'step_cache' input of WanCore Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "method": (["teacache", "magcache"], {
                "default": "teacache",
                "tooltip": "teacache: skips while the accumulated change of the time embedding stays below the "
                           "threshold. magcache: skips while the predicted output-magnitude error stays below it."}),
            "threshold": ("FLOAT", {
                "default": -1.0, "min": -1.0, "max": 10.0, "step": 0.01, "round": 0.001,
                "tooltip": "Higher skips more (faster, less exact). -1: recommended for the model (TeaCache e: "
                           "0.08 for 1.3B, 0.2 for 14B; MagCache 0.12); 0: never skip (identical output)."}),
            "start_step": ("INT", {
                "default": -1, "min": -1, "max": 1000,
                "tooltip": "First step that may be skipped. -1: the method's default (TeaCache e: 1, e0: 5; "
                           "MagCache: after retention_ratio of the run)."}),
            "end_step": ("INT", {"default": -1, "min": -1, "max": 1000,
                                 "tooltip": "Steps from this one on always run. -1: only the last step always runs."}),
            "mode": (["e", "e0"], {
                "default": "e",
                "tooltip": "TeaCache only: e (time embedding, the official default) or e0 (time projection, "
                           "the official use_ret_steps variant with its own coefficients)."}),
            "magcache_k": ("INT", {"default": 2, "min": 1, "max": 20,
                                   "tooltip": "MagCache only: most steps skipped in a row (official 2; 4 is "
                                              "faster and rougher)."}),
            "retention_ratio": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "MagCache only: fraction of the run at the start that always "
                                                     "computes (official 0.2), unless start_step is set."}),
        }}

    def options(self, method: str, threshold: float, start_step: int, end_step: int, mode: str, magcache_k: int,
                retention_ratio: float):
        from ..wan_core import StepCacheSpec

        def auto(v):   # the widgets' -1 is wan_core's None ("the default")
            return None if v < 0 else v

        return (StepCacheSpec(method, auto(float(threshold)), auto(int(start_step)), auto(int(end_step)), mode,
                              int(magcache_k), float(retention_ratio)),)


class WanCoreCompileOptions:
    """torch.compile of the transformer blocks (off unless this node is connected)."""

    CATEGORY = "WanCore/options"
    DESCRIPTION = ("Compile the DiT's transformer blocks with torch.compile for WanCore Sampler (faster sampling "
                   "on a GPU after a one-time compile of a minute or more per new video size; needs triton on "
                   "the GPU or a C++ compiler on the CPU). If compiling fails the blocks run normally and the "
                   "console says why. Disconnect it to return to the plain model.")
    FUNCTION = "options"
    RETURN_TYPES = (COMPILE,)
    RETURN_NAMES = ("compile",)
    OUTPUT_TOOLTIPS = ("Compile settings, for the 'compile' input of WanCore Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "backend": (["inductor", "eager", "aot_eager"], {
                "default": "inductor",
                "tooltip": "inductor generates fast kernels; eager / aot_eager only trace (for debugging)."}),
            "mode": (["default", "max-autotune-no-cudagraphs"], {
                "default": "default",
                "tooltip": "max-autotune-no-cudagraphs searches for faster kernels (a much longer first run). "
                           "CUDA-graph modes are not offered: block swap moves weights every step."}),
            "dynamic": (["auto", "yes", "no"], {
                "default": "auto",
                "tooltip": "Shape-generic graphs. auto: specialise first, generalise once the size changes."}),
        }}

    def options(self, backend: str, mode: str, dynamic: str):
        from ..wan_core import CompileSpec

        return (CompileSpec(backend, None if mode == "default" else mode,
                            {"auto": None, "yes": True, "no": False}[dynamic]),)
