"""ComfyUI node classes of Wan Core (thin adapters over ``wan_core``).

Node ids start with ``WanCore`` and, once released, are never renamed; inputs are never
renamed, reordered or removed, only appended as optional ones at the end
(``tests/data/node_inputs_snapshot.json`` holds the contract). Only relative imports:
``import nodes`` would be ComfyUI's own module.

Classes are declared in the V1 style; on ComfyUI >= 0.3.64 each reaches the host as a V3
``io.ComfyNode`` rendered from that declaration (:mod:`.schema`, :mod:`.v3`, the root
``comfy_entrypoint``): adding a class to both mappings below is all a new node needs.
"""
from .conditioning import WanCoreEmptyVideoEmbeds, WanCoreImageToVideoEncode, WanCoreTextEncode
from .core_types import WanCoreDiTToModel, WanCoreImageEmbedsFromCore, WanCoreTextEmbedsFromConditioning
from .fun import WanCoreFunControlEncode
from .long_video import WanCoreContextOptions, WanCoreExtendVideo, WanCoreGuidanceOptions
from .loaders import WanCoreLoadCLIPVision, WanCoreLoadDiT, WanCoreLoadTextEncoder, WanCoreLoadVAE
from .multigpu import WanCoreMultiGPUOptions
from .options import WanCoreCompileOptions, WanCoreLoraLoader, WanCoreMemoryOptions, WanCoreStepCache
from .preprocess import WanCoreControlPreprocess
from .sampling import WanCoreSampler
from .vace import WanCoreVACEEncode
from .vae import WanCoreDecode, WanCoreEncode
from .wan22 import WanCoreImageToVideoEncode22, WanCoreMoEOptions

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "WanCoreLoadDiT": WanCoreLoadDiT,
    "WanCoreLoadVAE": WanCoreLoadVAE,
    "WanCoreLoadTextEncoder": WanCoreLoadTextEncoder,
    "WanCoreLoadCLIPVision": WanCoreLoadCLIPVision,
    "WanCoreTextEncode": WanCoreTextEncode,
    "WanCoreEmptyVideoEmbeds": WanCoreEmptyVideoEmbeds,
    "WanCoreImageToVideoEncode": WanCoreImageToVideoEncode,
    "WanCoreSampler": WanCoreSampler,
    "WanCoreDecode": WanCoreDecode,
    "WanCoreEncode": WanCoreEncode,
    "WanCoreMemoryOptions": WanCoreMemoryOptions,
    "WanCoreLoraLoader": WanCoreLoraLoader,
    "WanCoreStepCache": WanCoreStepCache,
    "WanCoreCompileOptions": WanCoreCompileOptions,
    "WanCoreContextOptions": WanCoreContextOptions,
    "WanCoreGuidanceOptions": WanCoreGuidanceOptions,
    "WanCoreExtendVideo": WanCoreExtendVideo,
    "WanCoreVACEEncode": WanCoreVACEEncode,
    "WanCoreControlPreprocess": WanCoreControlPreprocess,
    "WanCoreTextEmbedsFromConditioning": WanCoreTextEmbedsFromConditioning,
    "WanCoreImageEmbedsFromCore": WanCoreImageEmbedsFromCore,
    "WanCoreDiTToModel": WanCoreDiTToModel,
    "WanCoreMultiGPUOptions": WanCoreMultiGPUOptions,
    "WanCoreMoEOptions": WanCoreMoEOptions,
    "WanCoreImageToVideoEncode22": WanCoreImageToVideoEncode22,
    "WanCoreFunControlEncode": WanCoreFunControlEncode,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "WanCoreLoadDiT": "WanCore Load Diffusion Model",
    "WanCoreLoadVAE": "WanCore Load VAE",
    "WanCoreLoadTextEncoder": "WanCore Load Text Encoder",
    "WanCoreLoadCLIPVision": "WanCore Load CLIP Vision",
    "WanCoreTextEncode": "WanCore Text Encode",
    "WanCoreEmptyVideoEmbeds": "WanCore Empty Video Embeds",
    "WanCoreImageToVideoEncode": "WanCore Image To Video Encode",
    "WanCoreSampler": "WanCore Sampler",
    "WanCoreDecode": "WanCore Decode",
    "WanCoreEncode": "WanCore Encode",
    "WanCoreMemoryOptions": "WanCore Memory Options",
    "WanCoreLoraLoader": "WanCore LoRA Loader",
    "WanCoreStepCache": "WanCore Step Cache",
    "WanCoreCompileOptions": "WanCore Compile Options",
    "WanCoreContextOptions": "WanCore Context Options",
    "WanCoreGuidanceOptions": "WanCore Guidance Options",
    "WanCoreExtendVideo": "WanCore Extend Video",
    "WanCoreVACEEncode": "WanCore VACE Encode",
    "WanCoreControlPreprocess": "WanCore Control Preprocess",
    "WanCoreTextEmbedsFromConditioning": "WanCore Text Embeds From Conditioning",
    "WanCoreImageEmbedsFromCore": "WanCore Image Embeds From Core",
    "WanCoreDiTToModel": "WanCore DiT To Model",
    "WanCoreMultiGPUOptions": "WanCore Multi-GPU Options",
    "WanCoreMoEOptions": "WanCore MoE Options (Wan 2.2 A14B)",
    "WanCoreImageToVideoEncode22": "WanCore Image To Video Encode (Wan 2.2)",
    "WanCoreFunControlEncode": "WanCore Fun Control Encode",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
