"""VAE nodes: Wan 2.1 LATENT <-> IMAGE frames, optionally tiled in space to bound memory."""
from __future__ import annotations

from . import host, plans
from .types import LATENT_CHANNELS, MEMORY_OPTIONS, VAE, VAE_SPACE_STRIDE

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


def _tile(tiling: str, tile_size: int, tile_overlap: int) -> tuple[object, dict]:
    """Widgets -> ``tile`` argument and keyword options of :mod:`wan_core.vae_tiling` (latent pixels)."""
    if tiling == "off":
        return None, {}
    if tiling == "auto":
        return "auto", {}
    if tiling != "custom":
        raise ValueError(f"tiling must be auto, off or custom; got {tiling!r}")
    return max(1, tile_size // VAE_SPACE_STRIDE), {"overlap": tile_overlap // VAE_SPACE_STRIDE}


class WanCoreDecode:
    """Wan 2.1 latents -> video frames."""

    CATEGORY = "WanCore/vae"
    DESCRIPTION = ("Decode a Wan 2.1 LATENT (from WanCore Sampler, Load Latent or core Wan nodes) into frames "
                   "for core Create Video / Save Video or Save Image.")
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The frames as an IMAGE batch [frames, height, width, 3], 0..1.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (VAE, {"tooltip": "From WanCore Load VAE."}),
                             "latent": ("LATENT", {"tooltip": "Wan 2.1 latents [B, 16, T', H/8, W/8]."}),
                             **tiling_inputs()},
                "optional": {"memory": (MEMORY_OPTIONS, {
                    "tooltip": "WanCore Memory Options: with tiling 'auto', its vae_tile and VRAM budget decide "
                               "the tiles. Not connected: tiles only when a frame does not fit the free memory."})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def decode(self, vae, latent, tiling: str, tile_size: int, tile_overlap: int, memory=None, unique_id=None):
        from ..wan_core import decode_tiled

        z = latent["samples"]
        if z.ndim != 5 or z.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"WanCore Decode needs Wan 2.1 video latents [B, 16, T', h, w]; got shape "
                             f"{tuple(z.shape)} (an image model's latent?).")
        _tile(tiling, tile_size, tile_overlap)   # validates the widgets
        # this node's tiling, unless "auto": then the memory options' (auto, off or custom)
        own = {"auto": None, "off": "off", "custom": int(tile_size)}[tiling]
        overlap = {"overlap": tile_overlap // VAE_SPACE_STRIDE} if tiling == "custom" else {}
        progress = host.Progress(z.shape[2], unique_id)
        with plans.decode_stage(vae, plans.run_options(memory, vae_tile=own), z.shape) as tiles:
            video = decode_tiled(vae, z, normalized=False, output_device="cpu",
                                 on_progress=lambda done, total: progress.update(done, total), **tiles.kwargs(),
                                 **overlap)
        # [B, 3, T, H, W] in -1..1 -> [B*T, H, W, 3] in 0..1 (ComfyUI flattens video frames into the batch)
        frames = video.float().add(1).div(2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1)
        return (frames.contiguous(),)


class WanCoreEncode:
    """Video frames -> Wan 2.1 latents (for video-to-video)."""

    CATEGORY = "WanCore/vae"
    DESCRIPTION = ("Encode frames (an IMAGE batch of 4n+1 frames, sides multiples of 16) into a Wan 2.1 LATENT, "
                   "e.g. the input video of video-to-video. Resize with core Upscale Image and pick frames with "
                   "core Image From Batch first if needed.")
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Latents {'samples': [1, 16, (frames-1)/4+1, H/8, W/8]} in raw VAE space.",)

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
        _tile(tiling, tile_size, tile_overlap)   # validates the widgets
        # "auto": the run plan's encode tile (on a GPU the memory plan's, on the CPU vae_tiling's rule)
        own = {"auto": "auto", "off": "off", "custom": int(tile_size)}[tiling]
        overlap = {"overlap": tile_overlap // VAE_SPACE_STRIDE} if tiling == "custom" else {}
        progress = host.Progress(1, unique_id)
        with plans.image_encode_stage(vae, what="VAE (input video)", size=(int(w), int(h), int(t)),
                                      options=plans.run_options(vae_tile=own)) as tiles:
            z = encode_tiled(vae, video_to_tensor(images[..., :3]), normalize=False, output_device="cpu",
                             on_progress=lambda done, total: progress.update(done, total), **tiles.kwargs(),
                             **overlap)
        return ({"samples": z.float()},)
