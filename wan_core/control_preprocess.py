"""Control videos from plain frames: edges, grey-scale, soft edges, blur, and the pad / box masks.

VACE (and any control model) takes a control video — edges, depth, pose, grey-scale — as
frames at the video size, plus a mask (1 = generate, 0 = keep). This module builds the
common ones from a video with kornia's filters, on any device: the frames go to the device
and back a chunk at a time (one transfer each way), so that an 81-frame 720p video needs a
bounded amount of device memory (:func:`plan_control_chunks`), and the filters run on one
frame at a time, so the result does not depend on the chunk size (a convolution over a batch
of one frame rounds differently from one over several, which can move a canny edge pixel).
Depth and pose come from the dedicated preprocessor packs.

Modes (input ``[T, H, W, 3]`` float 0..1, ComfyUI's IMAGE; output the same layout, float32):

- ``canny``: ``kornia.filters.canny`` (luma by ITU-R 601, Gaussian blur, unnormalised Sobel
  magnitude, non-maximum suppression, hysteresis) with ``low_threshold`` / ``high_threshold``
  in kornia's units — a black-to-white step gives 4 unblurred and about 2.6 at ``blur_sigma``
  1 — and a blur kernel of ``2 * ceil(2 * sigma) + 1`` pixels (sigma 1 -> 5x5, so the defaults
  0.4 / 0.8 / 1.0 are ComfyUI's core Canny node; sigma 0 = no blur). White edges on black.
- ``scribble``: soft edges, a sketch-like control: luma, Gaussian blur (``blur_sigma``), the
  normalised Sobel gradient magnitude, scaled so that a black-to-white step edge under the
  same blur gives 1, clipped to 0..1; ``scribble_threshold`` above 0 makes it binary (1 where
  the soft edge reaches the threshold). White lines on black, exactly 0 in flat regions
  (values below 1/255, the blur's rounding, are set to 0).
- ``grayscale``: ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` in all three channels.
- ``blur``: Gaussian blur of each channel (``blur_sigma``, borders replicated).
- ``none``: the frames as they are (for the pad / box masks alone).

Masks (for VACE inpainting and outpainting; sizes in pixels of the input frames):

- ``pad = (left, top, right, bottom)``: the frames are padded (``pad_fill`` "grey" = 0.5, the
  neutral value of VACE's control space, or "edge" = the border pixels repeated) and the mask
  is 1 on the padding. The padded width and height must be multiples of 16, the size Wan
  samples (the error names the nearest pads that are).
- ``box = (x, y, width, height)``: a rectangle to regenerate: grey in the control frames,
  1 in the mask.

The mask is one frame for the whole video, ``[1, H', W']`` (ComfyUI's MASK convention for
"all frames"; WanCore VACE Encode takes it as it is); all ones when nothing is padded or
boxed: "generate everything, following the control".
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import SIZE_MULTIPLE
from .limits import MAX_FRAMES, MAX_SIZE, MIN_SIZE

__all__ = ["CONTROL_MODES", "PAD_FILLS", "MAX_CANNY_THRESHOLD", "MAX_BLUR_SIGMA", "DEFAULT_CHUNK_BYTES",
           "ControlOptions", "ControlFrames", "ControlChunks", "preprocess_control", "plan_control_chunks",
           "check_control_input", "control_mask", "blur_kernel_size"]

CONTROL_MODES = ("canny", "scribble", "grayscale", "blur", "none")
PAD_FILLS = ("grey", "edge")
MAX_CANNY_THRESHOLD = 8.0   # kornia's magnitude of a 0..1 image is at most 4 * sqrt(2) = 5.66 (a diagonal step)
MAX_BLUR_SIGMA = 16.0       # pixels; a 65 x 65 kernel
MAX_PAD = MAX_SIZE - MIN_SIZE
DEFAULT_CHUNK_BYTES = 512 << 20   # device memory a chunk of frames may use (720p canny: 17 frames a chunk)
GREY = 0.5                  # 0 in VACE's -1..1 control space: "nothing known here"

# Peak device bytes while one frame is filtered (_control_frame), measured with
# wan_core.memsim.DeviceMemory on the CPU (real tensors, every storage an op creates counted;
# tests/unit/test_control_preprocess.py measures again and checks the plan is never below):
# per input pixel, the float32 frame, the filters' intermediates and the contiguous output
# (measured canny 160.6, scribble 28.2-32.2, grayscale 28.0, blur 48.4-48.8 at sigma 1, none 12.0),
# plus the blur's border-padded copy per blurred channel; padding is a later step holding the
# frame, the filtered frame (at most 12 B/px), the padded frame and its contiguous copy (12 each).
# A chunk adds its frames in and out: 12 B per input pixel and 12 B per output pixel and frame.
_BYTES_PER_PIXEL = {"canny": 164, "scribble": 32, "grayscale": 28, "blur": 36, "none": 12}
_BLURRED_CHANNELS = {"canny": 1, "scribble": 1, "grayscale": 0, "blur": 3, "none": 0}


@dataclass(frozen=True)
class ControlOptions:
    """What :func:`preprocess_control` makes of a video (see the module docstring).

    mode: one of ``CONTROL_MODES``. low_threshold / high_threshold: canny hysteresis in
    kornia's magnitude units, ``0 < low <= high <= MAX_CANNY_THRESHOLD``. blur_sigma: pixels,
    ``0..MAX_BLUR_SIGMA`` (canny / scribble pre-blur, the blur of "blur"; 0 = none).
    scribble_threshold: 0..1, 0 = soft edges, above 0 = binary lines. pad: (left, top, right,
    bottom) pixels >= 0; pad_fill: "grey" or "edge". box: (x, y, width, height) pixels of the
    input frame to regenerate, or None.
    """

    mode: str = "canny"
    low_threshold: float = 0.4
    high_threshold: float = 0.8
    blur_sigma: float = 1.0
    scribble_threshold: float = 0.0
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    pad_fill: str = "grey"
    box: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in CONTROL_MODES:
            raise ValueError(f"unknown control mode {self.mode!r}; choose one of {', '.join(CONTROL_MODES)}.")
        for name in ("low_threshold", "high_threshold", "blur_sigma", "scribble_threshold"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value!r}.")
        if not 0.0 < self.low_threshold <= self.high_threshold <= MAX_CANNY_THRESHOLD:
            raise ValueError(f"canny thresholds must satisfy 0 < low_threshold <= high_threshold <= "
                             f"{MAX_CANNY_THRESHOLD:g}; got low_threshold {self.low_threshold:g}, high_threshold "
                             f"{self.high_threshold:g} (a black-to-white step measures about 2.6 at blur_sigma 1; "
                             "ComfyUI's Canny defaults are 0.4 and 0.8).")
        if not 0.0 <= self.blur_sigma <= MAX_BLUR_SIGMA:
            raise ValueError(f"blur_sigma {self.blur_sigma:g} is outside 0..{MAX_BLUR_SIGMA:g} pixels "
                             "(MAX_BLUR_SIGMA in wan_core.control_preprocess); 0 = no blur.")
        if not 0.0 <= self.scribble_threshold <= 1.0:
            raise ValueError(f"scribble_threshold {self.scribble_threshold:g} is outside 0..1 "
                             "(0 = soft edges, above 0 = binary lines).")
        _check_ints("pad (left, top, right, bottom)", self.pad, 4)
        if any(p < 0 or p > MAX_PAD for p in self.pad):
            raise ValueError(f"pad {tuple(self.pad)} (left, top, right, bottom): each must be 0..{MAX_PAD} pixels.")
        if self.pad_fill not in PAD_FILLS:
            raise ValueError(f"unknown pad_fill {self.pad_fill!r}; choose one of {', '.join(PAD_FILLS)}.")
        if self.box is not None:
            _check_ints("box (x, y, width, height)", self.box, 4)
            x, y, w, h = self.box
            if x < 0 or y < 0 or w < 1 or h < 1:
                raise ValueError(f"box {tuple(self.box)} (x, y, width, height): x and y must be >= 0, width and "
                                 "height >= 1 pixel.")


@dataclass(frozen=True)
class ControlFrames:
    """The result of :func:`preprocess_control`.

    frames: ``[T, H', W', 3]`` float32 in 0..1 on the input's device (H' = top + H + bottom,
    W' = left + W + right); mask: ``[1, H', W']`` float32, 1 = generate, 0 = keep, one mask for
    every frame.
    """

    frames: Tensor
    mask: Tensor


@dataclass(frozen=True)
class ControlChunks:
    """How :func:`preprocess_control` splits a video: ``frames`` per chunk and the planned peak
    ``device_bytes`` of one chunk (above the budget only when a single frame needs more).
    ``frame_bytes`` is the part of it that filtering one frame takes."""

    frames: int
    device_bytes: int
    frame_bytes: int


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_ints(name: str, values, count: int) -> None:
    if (not isinstance(values, tuple) or len(values) != count
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)):
        raise ValueError(f"{name} must be a tuple of {count} whole numbers of pixels; got {values!r}.")


def blur_kernel_size(sigma: float) -> int:
    """Side of the Gaussian kernel for ``sigma`` pixels: ``2 * ceil(2 * sigma) + 1`` (5 at sigma
    1, as ComfyUI's Canny node; 1 = no blur at sigma 0)."""
    return 2 * math.ceil(2.0 * sigma) + 1


def _padded_size(options: ControlOptions, height: int, width: int) -> tuple[int, int]:
    left, top, right, bottom = options.pad
    return top + height + bottom, left + width + right


def check_control_input(frames_shape: tuple[int, ...], options: ControlOptions) -> None:
    """Refuse a video :func:`preprocess_control` cannot take, naming the value; numbers only."""
    if len(frames_shape) != 4 or frames_shape[-1] != 3:
        raise ValueError(f"control frames must be [T, H, W, 3] (ComfyUI IMAGE, RGB); got shape {tuple(frames_shape)}.")
    t, h, w, _ = frames_shape
    if not 1 <= t <= MAX_FRAMES:
        raise ValueError(f"the control video has {t} frames; 1..{MAX_FRAMES} are accepted (MAX_FRAMES in "
                         "wan_core.limits).")
    for name, v in (("width", w), ("height", h)):
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise ValueError(f"control frame {name} {v} is outside {MIN_SIZE}..{MAX_SIZE} pixels "
                             "(MIN_SIZE/MAX_SIZE in wan_core.limits).")
    if options.mode == "canny" and blur_kernel_size(options.blur_sigma) // 2 >= min(h, w):
        raise ValueError(f"blur_sigma {options.blur_sigma:g} is too large for {w}x{h} frames: canny's "
                         f"{blur_kernel_size(options.blur_sigma)}-pixel blur needs frames larger than its radius; "
                         "use a smaller blur_sigma.")
    left, top, right, bottom = options.pad
    if any(options.pad):
        ph, pw = _padded_size(options, h, w)
        problems = []
        for name, size, pads, last in (("width", pw, f"{w} + left {left} + right {right}", "right"),
                                       ("height", ph, f"{h} + top {top} + bottom {bottom}", "bottom")):
            if size > MAX_SIZE:
                problems.append(f"padded {name} {size} = {pads} is above the maximum {MAX_SIZE} (MAX_SIZE in "
                                "wan_core.limits)")
            elif size % SIZE_MULTIPLE:
                pad = right if last == "right" else bottom
                down = pad - size % SIZE_MULTIPLE
                up = pad + SIZE_MULTIPLE - size % SIZE_MULTIPLE
                fix = f"{last} {up}" + (f" or {down}" if down >= 0 else "")
                problems.append(f"padded {name} {size} = {pads} is not a multiple of 16, which Wan needs; use {fix}")
        if problems:
            raise ValueError("; ".join(problems) + ".")
    if options.box is not None:
        x, y, bw, bh = options.box
        if x + bw > w or y + bh > h:
            raise ValueError(f"box (x {x}, y {y}, width {bw}, height {bh}) reaches past the {w}x{h} frame; "
                             "it is given in pixels of the input frames (before padding).")


def plan_control_chunks(frames_shape: tuple[int, ...], options: ControlOptions,
                        budget_bytes: int = DEFAULT_CHUNK_BYTES) -> ControlChunks:
    """Frames per chunk so one chunk's device memory stays within ``budget_bytes`` (at least one
    frame), from the measured bytes per pixel of ``options.mode`` (plus the padding)."""
    check_control_input(frames_shape, options)
    if not isinstance(budget_bytes, numbers.Integral) or budget_bytes < 1:
        raise ValueError(f"budget_bytes must be a positive whole number of bytes; got {budget_bytes!r}.")
    t, h, w, _ = frames_shape
    ph, pw = _padded_size(options, h, w)
    r = blur_kernel_size(options.blur_sigma) // 2
    mode = "none" if options.mode == "blur" and not r else options.mode
    work = _BYTES_PER_PIXEL[mode] * h * w + (4 * _BLURRED_CHANNELS[mode] * (h + 2 * r) * (w + 2 * r) if r else 0)
    if any(options.pad):
        work = max(work, 24 * h * w + 24 * ph * pw)
    per_frame = 12 * h * w + 12 * ph * pw          # a chunk's frame in, and its control frame out
    n = max(1, min(t, (budget_bytes - work) // per_frame))
    return ControlChunks(frames=int(n), device_bytes=int(n * per_frame + work), frame_bytes=int(work))


def preprocess_control(frames: Tensor, options: ControlOptions, *, device: torch.device | str | None = None,
                       budget_bytes: int = DEFAULT_CHUNK_BYTES,
                       callback: Callable[[int, int], None] | None = None) -> ControlFrames:
    """A control video (and its mask) from ``frames`` ``[T, H, W, 3]`` float in 0..1.

    Runs on ``device`` (default: the frames' device), moving one chunk of frames there and
    back at a time (see :func:`plan_control_chunks`) and filtering one frame at a time, so the
    result is the same whatever the chunk size; the result is on the frames' device; ``callback(done_frames, total_frames)`` after each chunk
    (a host's progress bar; it may raise to interrupt). Everything is checked before anything
    is allocated; ValueError names the value.
    """
    if not isinstance(frames, Tensor) or not frames.is_floating_point():
        raise ValueError("control frames must be a floating-point tensor [T, H, W, 3] in 0..1 (ComfyUI IMAGE); "
                         f"got {type(frames).__name__}" + (f" of {frames.dtype}" if isinstance(frames, Tensor) else ""))
    if not isinstance(options, ControlOptions):
        raise ValueError(f"options must be a wan_core.ControlOptions; got {type(options).__name__}.")
    chunks = plan_control_chunks(tuple(frames.shape), options, budget_bytes)
    device = frames.device if device is None else torch.device(device)
    t, h, w, _ = frames.shape
    ph, pw = _padded_size(options, h, w)
    out = torch.empty(t, ph, pw, 3, dtype=torch.float32, device=frames.device)
    scale = _scribble_scale(options.blur_sigma, device) if options.mode == "scribble" else 1.0
    in_place = device == out.device   # on the result's device the frames are written straight into it
    for start in range(0, t, chunks.frames):
        stop = min(t, start + chunks.frames)
        chunk = frames[start:stop].to(device=device, dtype=torch.float32)                  # one transfer in
        done = out[start:stop] if in_place else torch.empty(stop - start, ph, pw, 3, device=device)
        for i in range(stop - start):
            done[i] = _control_frame(chunk[i:i + 1], options, scale)[0]
        if not in_place:
            out[start:stop].copy_(done)                                                     # one transfer out
        del chunk, done
        if callback is not None:
            callback(stop, t)
    mask = control_mask(options, h, w, device=frames.device)
    if options.box is not None:
        left, top = options.pad[0], options.pad[1]
        bx, by, bw, bh = options.box
        out[:, top + by:top + by + bh, left + bx:left + bx + bw, :] = GREY
    return ControlFrames(frames=out, mask=mask)


def control_mask(options: ControlOptions, height: int, width: int,
                 device: torch.device | str = "cpu") -> Tensor:
    """The ``[1, H', W']`` mask of ``options`` for ``height x width`` input frames: 1 on the
    padding and in the box (generate), 0 elsewhere (keep); all ones with neither."""
    left, top, right, bottom = options.pad
    ph, pw = _padded_size(options, height, width)
    if not any(options.pad) and options.box is None:
        return torch.ones(1, ph, pw, device=device)
    mask = torch.ones(1, ph, pw, device=device)
    mask[:, top:top + height, left:left + width] = 0.0
    if options.box is not None:
        bx, by, bw, bh = options.box
        mask[:, top + by:top + by + bh, left + bx:left + bx + bw] = 1.0
    return mask


def _control_frame(frame: Tensor, options: ControlOptions, scribble_scale: float) -> Tensor:
    """One frame ``[1, H, W, 3]`` (0..1, on the compute device) -> its control frame ``[1, H', W', 3]``."""
    y = _pad(_apply(frame.permute(0, 3, 1, 2), options, scribble_scale), options)
    return y.permute(0, 2, 3, 1)


def _apply(x: Tensor, options: ControlOptions, scribble_scale: float) -> Tensor:
    """Frames ``[n, 3, H, W]`` (0..1) -> their control frames ``[n, 3, H, W]``."""
    mode, sigma = options.mode, options.blur_sigma
    if mode == "canny":
        k = blur_kernel_size(sigma)
        s = sigma if sigma > 0.0 else 1.0   # kernel 1 skips kornia's blur, whose sigma must still be positive
        _magnitude, edges = kornia.filters.canny(x, options.low_threshold, options.high_threshold,
                                                 kernel_size=(k, k), sigma=(s, s))
        return edges.expand(-1, 3, -1, -1)
    if mode == "grayscale":
        return kornia.color.rgb_to_grayscale(x).expand(-1, 3, -1, -1)
    if mode == "blur":
        blurred = _blur(x, sigma)
        return x if blurred is x else blurred.clamp_(0.0, 1.0)   # rounding can reach 1 + 1e-7
    if mode == "scribble":
        soft = (_edge_magnitude(kornia.color.rgb_to_grayscale(x), sigma) * scribble_scale).clamp_(0.0, 1.0)
        # below one 8-bit level is blur rounding on flat regions (1e-7): exactly black there
        soft = soft.masked_fill_(soft < 1.0 / 255.0, 0.0)
        if options.scribble_threshold > 0.0:
            soft = (soft >= options.scribble_threshold).to(soft.dtype)
        return soft.expand(-1, 3, -1, -1)
    return x


def _blur(x: Tensor, sigma: float) -> Tensor:
    if sigma == 0.0:
        return x
    k = blur_kernel_size(sigma)
    return kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="replicate")


def _edge_magnitude(grey: Tensor, sigma: float) -> Tensor:
    """``[n, 1, H, W]`` -> the normalised Sobel gradient magnitude of the blurred image (exactly
    0 where the image is flat: no epsilon under the square root, unlike kornia.filters.sobel)."""
    grad = kornia.filters.spatial_gradient(_blur(grey, sigma), mode="sobel", normalized=True)   # [n, 1, 2, H, W]
    return torch.linalg.vector_norm(grad, dim=2)


def _scribble_scale(sigma: float, device: torch.device) -> float:
    """1 / the soft-edge magnitude of a black-to-white step under blur ``sigma`` (so that step gives 1)."""
    size = 4 * blur_kernel_size(sigma)
    step = torch.zeros(1, 1, size, size, device=device)
    step[..., size // 2:] = 1.0
    return 1.0 / float(_edge_magnitude(step, sigma).amax())


def _pad(y: Tensor, options: ControlOptions) -> Tensor:
    if not any(options.pad):
        return y
    left, top, right, bottom = options.pad
    pads = (left, right, top, bottom)   # F.pad: last dim (W) first
    if options.pad_fill == "grey":
        return F.pad(y, pads, mode="constant", value=GREY)
    return F.pad(y, pads, mode="replicate")
