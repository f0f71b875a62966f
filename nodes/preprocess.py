"""WanCore Control Preprocess: a control video (edges, grey-scale, soft edges, blur) and its mask
from IMAGE frames, with padding for outpainting and a box for inpainting, on the host's GPU.

The work is ``wan_core.preprocess_control`` (kornia filters, a chunk of frames at a time); this
node only turns its widgets into a ``wan_core.ControlOptions``.
"""
from __future__ import annotations

from . import host

__all__ = ["WanCoreControlPreprocess", "CONTROL_MODES", "PAD_FILLS", "MAX_CANNY_THRESHOLD", "MAX_BLUR_SIGMA",
           "MAX_PAD"]

# wan_core.control_preprocess's values, repeated so that importing the pack imports no engine
# (tests/unit/test_control_preprocess.py checks that they agree).
CONTROL_MODES = ("canny", "scribble", "grayscale", "blur", "none")
PAD_FILLS = ("grey", "edge")
MAX_CANNY_THRESHOLD = 8.0
MAX_BLUR_SIGMA = 16.0
MAX_SIZE = 4096
MAX_PAD = MAX_SIZE - 16


def _pad(side: str) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": MAX_PAD, "step": 8,
                    "tooltip": f"Pixels added on the {side} for outpainting (grey or repeated edge; 1 in the mask). "
                               "The padded width and height must be multiples of 16."})


def _box(what: str, default: int = 0) -> tuple:
    return ("INT", {"default": default, "min": 0, "max": MAX_SIZE, "step": 1,
                    "tooltip": f"Inpainting box {what}, in pixels of the input frames; box_width or box_height 0 = "
                               "no box. The box is grey in the control frames and 1 in the mask."})


class WanCoreControlPreprocess:
    """IMAGE frames -> control frames (IMAGE) + mask (MASK) for WanCore VACE Encode."""

    CATEGORY = "WanCore/conditioning"
    DESCRIPTION = ("Control video for VACE from any frames, built in (kornia, on the GPU, a few frames at a time): "
                   "canny edges (ComfyUI Canny's defaults), scribble (soft sketch-like edges), grayscale, blur or "
                   "none; then optional padding for outpainting and a box for inpainting, whose mask (1 = generate, "
                   "0 = keep) goes to control_mask. Depth and pose come from preprocessor packs; their IMAGE output "
                   "plugs into WanCore VACE Encode the same way.")
    FUNCTION = "preprocess"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("control_video", "control_mask")
    OUTPUT_TOOLTIPS = ("Control frames (white edges on black, grey-scale, blurred or the frames), padded; for "
                       "control_video of WanCore VACE Encode.",
                       "One mask for all frames, 1 = generate (padding, box), 0 = keep; all ones without padding or "
                       "box. For control_mask of WanCore VACE Encode.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The frames to turn into a control video (a video's frames or one "
                                           "image)."}),
            "mode": (list(CONTROL_MODES), {
                "default": "canny",
                "tooltip": "canny: white edges on black. scribble: soft, sketch-like edges. grayscale: luma "
                           "(ITU-R 601). blur: Gaussian blur (layout control). none: the frames as they are (pad / "
                           "box only)."}),
            "low_threshold": ("FLOAT", {"default": 0.4, "min": 0.01, "max": MAX_CANNY_THRESHOLD, "step": 0.01,
                                        "tooltip": "canny: weaker edges kept only when connected to strong ones "
                                                   "(kornia units: a black-to-white step is about 2.6 at blur 1)."}),
            "high_threshold": ("FLOAT", {"default": 0.8, "min": 0.01, "max": MAX_CANNY_THRESHOLD, "step": 0.01,
                                         "tooltip": "canny: edges stronger than this are always kept; at least "
                                                    "low_threshold. Higher = fewer edges."}),
            "blur_sigma": ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_BLUR_SIGMA, "step": 0.1,
                                     "tooltip": "Gaussian blur in pixels: canny / scribble smooth the frames first "
                                                "(1.0 = ComfyUI Canny's 5x5 blur), blur blurs by it; 0 = none."}),
            "scribble_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "scribble: 0 = soft grey edges; above 0 = binary lines "
                                                        "where the soft edge reaches it."}),
            "pad_left": _pad("left"),
            "pad_top": _pad("top"),
            "pad_right": _pad("right"),
            "pad_bottom": _pad("bottom"),
            "pad_fill": (list(PAD_FILLS), {"default": "grey",
                                           "tooltip": "Padding: grey (VACE's 'unknown', recommended) or the edge "
                                                      "pixels repeated."}),
            "box_x": _box("left edge"),
            "box_y": _box("top edge"),
            "box_width": _box("width"),
            "box_height": _box("height"),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, low_threshold=None, high_threshold=None):
        # naming these inputs here makes ComfyUI skip its own min/max check of them: done here
        for name, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
            if value is not None and not 0.01 <= value <= MAX_CANNY_THRESHOLD:
                return f"{name} {value} is outside 0.01..{MAX_CANNY_THRESHOLD:g}."
        if low_threshold is not None and high_threshold is not None and low_threshold > high_threshold:
            return f"low_threshold ({low_threshold}) must not be above high_threshold ({high_threshold})."
        return True

    def preprocess(self, image, mode: str, low_threshold: float, high_threshold: float, blur_sigma: float,
                   scribble_threshold: float, pad_left: int, pad_top: int, pad_right: int, pad_bottom: int,
                   pad_fill: str, box_x: int, box_y: int, box_width: int, box_height: int, unique_id=None):
        from ..wan_core import ControlOptions, plan_control_chunks, preprocess_control

        box = (box_x, box_y, box_width, box_height) if box_width > 0 and box_height > 0 else None
        options = ControlOptions(mode=mode, low_threshold=low_threshold, high_threshold=high_threshold,
                                 blur_sigma=blur_sigma, scribble_threshold=scribble_threshold,
                                 pad=(pad_left, pad_top, pad_right, pad_bottom), pad_fill=pad_fill, box=box)
        device = host.torch_device()
        chunks = plan_control_chunks(tuple(image.shape), options)   # the engine's chunking; ValueError names the value
        if device.type != "cpu":
            host.make_room(chunks.device_bytes, device)   # ComfyUI frees that much of its own models, if needed
        progress = host.Progress(int(image.shape[0]), unique_id)

        def tick(done: int, total: int) -> None:
            progress.update(done, total)
            host.check_interrupt()

        result = preprocess_control(image, options, device=device, callback=tick)
        return result.frames, result.mask
