"""VAE nodes: Wan LATENT <-> IMAGE frames, optionally tiled in space to bound memory.

Both VAEs: the Wan 2.1 VAE (16 channels, 8x8 pixels per latent pixel; Wan 2.1 and Wan 2.2
A14B) and the Wan 2.2 VAE (48 channels, 16x16; TI2V-5B), whose LATENTs follow ComfyUI's Wan
2.1 / Wan 2.2 conventions (raw VAE space)."""
from __future__ import annotations

from . import host, plans
from .types import MEMORY_OPTIONS, VAE, VAE_SPACE_STRIDE

__all__ = ["WanCoreDecode", "WanCoreEncode"]


def tiling_inputs() -> dict:
    """The tiling / tile_size / tile_overlap widgets (pixels)."""
    return {
        "tiling": (["auto", "off", "custom"], {
            "default": "auto",
            "tooltip": "auto: split each frame into tiles only when it would not fit in free memory (otherwise "
                       "exactly the untiled result); off: never tile; custom: tiles of tile_size pixels."}),
        "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                              "tooltip": "custom tiling: tile side in pixels (a multiple of 8)."}),
        "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 8,
                                 "tooltip": "custom tiling: pixels shared by neighbouring tiles, blended to hide "
                                            "seams (a multiple of 8)."}),
    }


def _tile(tiling: str, tile_size: int, tile_overlap: int, stride: int = VAE_SPACE_STRIDE) -> tuple[object, dict]:
    """Widgets -> ``tile`` argument and keyword options of :mod:`wan_core.vae_tiling` (latent
    pixels of a VAE with ``stride`` pixels per latent pixel)."""
    if tiling == "off":
        return None, {}
    if tiling == "auto":
        return "auto", {}
    if tiling != "custom":
        raise ValueError(f"tiling must be auto, off or custom; got {tiling!r}")
    return max(1, tile_size // stride), {"overlap": tile_overlap // stride}


def _stride(vae) -> int:
    """Pixels per latent pixel of ``vae``: 8 (Wan 2.1 VAE) or 16 (Wan 2.2 VAE)."""
    return int(getattr(vae, "space_stride", VAE_SPACE_STRIDE))


class WanCoreDecode:
    """Wan latents (2.1 VAE or 2.2 VAE) -> video frames."""

    CATEGORY = "WanCore/vae"
    DESCRIPTION = ("Decode a Wan LATENT (from WanCore Sampler, Load Latent or core Wan nodes; Wan 2.1 and A14B with the "
                   "Wan 2.1 VAE, Wan 2.2 TI2V-5B with the Wan 2.2 VAE) into frames "
                   "for core Create Video / Save Video or Save Image.")
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The frames as an IMAGE batch [frames, height, width, 3], 0..1.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (VAE, {"tooltip": "From WanCore Load VAE."}),
                             "latent": ("LATENT", {"tooltip": "Wan latents: [B, 16, T', H/8, W/8] (Wan 2.1 VAE) or "
                                                               "[B, 48, T', H/16, W/16] (Wan 2.2 VAE)."}),
                             **tiling_inputs()},
                "optional": {"memory": (MEMORY_OPTIONS, {
                    "tooltip": "WanCore Memory Options: with tiling 'auto', its vae_tile and VRAM budget decide "
                               "the tiles. Not connected: tiles only when a frame does not fit the free memory."})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def decode(self, vae, latent, tiling: str, tile_size: int, tile_overlap: int, memory=None, unique_id=None):
        from ..wan_core import decode_tiled

        z = latent["samples"]
        channels = vae.config.z_dim   # 16: the Wan 2.1 VAE, 48: the Wan 2.2 VAE
        if z.ndim != 5 or z.shape[1] != channels:
            other = {16: "a Wan 2.1 / Wan 2.2 A14B latent: decode it with the Wan 2.1 VAE",
                     48: "a Wan 2.2 TI2V-5B latent: decode it with the Wan 2.2 VAE (wan2.2_vae)"}
            hint = other.get(z.shape[1] if z.ndim == 5 else -1, "an image model's latent?")
            raise ValueError(f"WanCore Decode: this VAE decodes video latents [B, {channels}, T', h, w]; got shape "
                             f"{tuple(z.shape)} ({hint}).")
        stride = _stride(vae)
        _tile(tiling, tile_size, tile_overlap, stride)   # validates the widgets
        # this node's tiling, unless "auto": then the memory options' (auto, off or custom)
        own = {"auto": None, "off": "off", "custom": int(tile_size)}[tiling]
        overlap = {"overlap": tile_overlap // stride} if tiling == "custom" else {}
        progress = host.Progress(z.shape[2], unique_id)
        with plans.decode_stage(vae, plans.run_options(memory, vae_tile=own), z.shape) as tiles:
            video = decode_tiled(vae, z, normalized=False, output_device="cpu",
                                 on_progress=lambda done, total: progress.update(done, total), **tiles.kwargs(),
                                 **overlap)
        # [B, 3, T, H, W] in -1..1 -> [B*T, H, W, 3] in 0..1 (ComfyUI flattens video frames into the batch)
        frames = video.float().add(1).div(2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1)
        return (frames.contiguous(),)


class WanCoreEncode:
    """Video frames -> Wan latents (for video-to-video)."""

    CATEGORY = "WanCore/vae"
    DESCRIPTION = ("Encode frames (an IMAGE batch of 4n+1 frames, sides multiples of 16) into a Wan LATENT (16 "
                   "channels with the Wan 2.1 VAE, 48 with the Wan 2.2 VAE), e.g. the input video of video-to-video. Resize with core Upscale Image and pick frames with "
                   "core Image From Batch first if needed.")
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Latents {'samples': [1, 16, (frames-1)/4+1, H/8, W/8]} (Wan 2.1 VAE) or [1, 48, "
                       "(frames-1)/4+1, H/16, W/16] (Wan 2.2 VAE) in raw VAE space.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (VAE, {"tooltip": "From WanCore Load VAE."}),
                             "images": ("IMAGE", {"tooltip": "Video frames [T, H, W, 3], T = 4n+1 (1, 5, ..., "
                                                             "81), H and W multiples of 16."}),
                             **tiling_inputs()},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def encode(self, vae, images, tiling: str, tile_size: int, tile_overlap: int, unique_id=None):
        from ..wan_core import check_video_size, encode_tiled, video_to_tensor

        t, h, w = images.shape[0], images.shape[1], images.shape[2]
        try:
            check_video_size(int(w), int(h), int(t))
        except ValueError as err:
            raise ValueError(f"WanCore Encode: the frames are {w}x{h}, {t} frames: {err} Resize (core Upscale "
                             "Image) or pick frames (core Image From Batch) first.") from None
        stride = _stride(vae)
        _tile(tiling, tile_size, tile_overlap, stride)   # validates the widgets
        # "auto": the run plan's encode tile (on a GPU the memory plan's, on the CPU vae_tiling's rule)
        own = {"auto": "auto", "off": "off", "custom": int(tile_size)}[tiling]
        overlap = {"overlap": tile_overlap // stride} if tiling == "custom" else {}
        progress = host.Progress(1, unique_id)
        with plans.image_encode_stage(vae, what="VAE (input video)", size=(int(w), int(h), int(t)),
                                      options=plans.run_options(vae_tile=own)) as tiles:
            z = encode_tiled(vae, video_to_tensor(images[..., :3]), normalize=False, output_device="cpu",
                             on_progress=lambda done, total: progress.update(done, total), **tiles.kwargs(),
                             **overlap)
        return ({"samples": z.float()},)
