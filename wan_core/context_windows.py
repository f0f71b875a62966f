"""Context windows: sample videos longer than Wan's 81 trained frames one window at a time.

The latent time axis (``T'`` frames, ``[16, T', H/8, W/8]``) is split into windows of
``context_frames`` pixel frames (``(context_frames - 1) // 4 + 1`` latent frames; 81 -> 21)
overlapping by ``overlap`` pixel frames (``max((overlap - 1) // 4 + 1, 0)`` latent frames;
48 -> 12; the conversions of ComfyUI's ``WanContextWindowsManual``). At every model
evaluation the DiT runs on each window alone (so the memory peak is one window's
activations) and the window velocities are fused per latent frame by a weighted average.
Each window sees the full text, the image conditioning of the frames it covers (for I2V /
FLF2V the known frames' mask and latents fall only into the windows that hold them), and
RoPE positions as its own clip (0..n-1) or, with ``global_positions``, its place in the video.

Schedules (window lists; the same semantics as ComfyUI 0.3.64 ``comfy/context_windows.py``,
cross-checked on a grid in tests/unit/test_context_windows.py):

- ``static``: windows start every ``length - overlap`` frames; the last one is moved back
  to end on the last frame. The same windows on every step.
- ``uniform``: starts shift per step by an ordered-halving offset (0, 1/2, 1/4, 3/4, ... of
  the video), so the seams move; windows that would wrap past the end are slid back to end
  on the last frame (ComfyUI ``standard_uniform``). ``stride`` > 1 adds dilated windows.
- ``looped``: like ``uniform`` but windows wrap around the end into the start, and the
  schedule closes the loop (ComfyUI ``looped_uniform`` with ``closed_loop``): the last and
  first frames are denoised together, for seamless loops.

Fuse methods (per-window weights, normalised by their per-frame sum so they add to 1):
``pyramid`` (1, 2, ..., peak, ..., 2, 1), ``flat`` (all 1), ``overlap-linear`` (1 inside,
linear ramps over the overlap on the sides that have a neighbour).

FreeNoise (Qiu et al. 2023): the initial noise after the first window repeats the frames of
the window before it in a seeded random order, so windows start from correlated noise.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .configs import VAE_TIME_STRIDE

__all__ = ["ContextOptions", "SCHEDULES", "FUSE_METHODS", "context_windows", "window_weights", "fuse_windows",
           "branch_evaluator", "plan_shape",
           "freenoise", "latent_frames", "ordered_halving"]

SCHEDULES: tuple[str, ...] = ("static", "uniform", "looped")
FUSE_METHODS: tuple[str, ...] = ("pyramid", "flat", "overlap-linear")
_RAMP_FLOOR = 1e-37   # overlap-linear ramps start above 0 so every frame keeps a weight


def latent_frames(pixel_frames: int) -> int:
    """Latent frames of ``pixel_frames`` (ComfyUI's rounding: ``max((n - 1) // 4 + 1, 0)``)."""
    return max((pixel_frames - 1) // VAE_TIME_STRIDE + 1, 0)


@dataclass(frozen=True)
class ContextOptions:
    """A context-window request; lengths in pixel frames.

    context_frames: window length, 4n+1 (default 81 = the trained length, 21 latent frames).
    overlap: frames shared by neighbouring windows (default 48 -> 12 latent frames).
    schedule: "static" | "uniform" | "looped". fuse: "pyramid" | "flat" | "overlap-linear".
    stride: dilated windows for "uniform"/"looped" (1 = none). global_positions: RoPE
    positions of the window in the whole video instead of 0..n-1. freenoise: FreeNoise
    initial noise (seeded by the run's seed). prompts: prompt travel, ``((start_frame,
    TextEmbeds), ...)`` in pixel frames: each window takes the prompt (and its negative) that
    starts last at or before the window's middle frame.
    """

    context_frames: int = 81
    overlap: int = 48
    schedule: str = "static"
    fuse: str = "pyramid"
    stride: int = 1
    global_positions: bool = False
    freenoise: bool = False
    # prompt travel: ((start pixel frame, TextEmbeds), ...) by increasing frame; a window uses
    # the last prompt starting at or before its middle frame (the run's own text before the first)
    prompts: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.context_frames < 5 or (self.context_frames - 1) % VAE_TIME_STRIDE:
            raise ValueError(f"context_frames must be 4n+1 and at least 5 (e.g. 81); got {self.context_frames}")
        if not 0 <= self.overlap < self.context_frames:
            raise ValueError(f"overlap must be 0 or more and below context_frames ({self.context_frames}); "
                             f"got {self.overlap}")
        if self.latent_overlap >= self.latent_length:
            raise ValueError(f"overlap {self.overlap} is {self.latent_overlap} latent frames, as long as the "
                             f"window ({self.latent_length}); lower it")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.fuse not in FUSE_METHODS:
            raise ValueError(f"fuse must be one of {', '.join(FUSE_METHODS)}; got {self.fuse!r}")
        starts = [int(s) for s, _ in self.prompts]
        if starts != sorted(set(starts)) or any(s < 0 for s in starts):
            raise ValueError(f"prompt travel needs (start frame >= 0, TextEmbeds) pairs by increasing frame; got "
                             f"starts {starts}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1; got {self.stride}")

    @property
    def latent_length(self) -> int:
        return latent_frames(self.context_frames)

    @property
    def latent_overlap(self) -> int:
        return latent_frames(self.overlap)

    def windows(self, num_frames: int, step: int = 0) -> list[list[int]]:
        """Latent-frame index lists of step ``step`` for a video of ``num_frames`` latent frames."""
        return context_windows(num_frames, self.latent_length, self.latent_overlap, self.schedule, step,
                               self.stride)

    def active(self, num_frames: int) -> bool:
        """Whether a video of ``num_frames`` latent frames needs more than one window."""
        return num_frames > self.latent_length

    def describe(self, num_frames: int) -> str:
        n = len(self.windows(num_frames))
        return (f"context windows: {n} x {self.context_frames} frames ({self.latent_length} latent), overlap "
                f"{self.overlap} ({self.latent_overlap} latent), {self.schedule}, {self.fuse}"
                f"{', global positions' if self.global_positions else ''}{', FreeNoise' if self.freenoise else ''}"
                f"{f', {len(self.prompts)} travel prompt(s)' if self.prompts else ''}; "
                f"peak = one window's activations")


# --------------------------------------------------------------------------- schedules (pure)

def ordered_halving(i: int) -> float:
    """The 64-bit bit-reversal of ``i`` as a fraction: 0, 1/2, 1/4, 3/4, 1/8, ... for i = 0, 1, 2, ..."""
    return int(format(i, "064b")[::-1], 2) / (1 << 64)


def _static(n: int, length: int, overlap: int) -> list[list[int]]:
    out = []
    for start in range(0, n, length - overlap):
        if start + length >= n:   # the last window ends on the last frame, keeping its length
            out.append(list(range(n - length, n)))
            break
        out.append(list(range(start, start + length)))
    return out


def _uniform(n: int, length: int, overlap: int, step: int, stride: int, wrap: bool) -> list[list[int]]:
    offset = ordered_halving(step)
    pad = int(round(n * offset))
    strides = min(stride, int(math.ceil(math.log2(n / length))) + 1)
    out = []
    for s in (1 << j for j in range(strides)):
        if not wrap and (length - 1) * s + 1 > n:
            break   # longer than the video: sliding it back would run past the end (ComfyUI does so)
        stop = n + pad - (0 if wrap else overlap)
        for j in range(int(offset * s) + pad, stop, length * s - overlap):
            window = [e % n for e in range(j, j + length * s, s)]
            if len(set(window)) == len(window):   # a wrapped dilated window may meet itself: dropped
                out.append(window)
    return out


def _rolls_over(window: list[int], n: int) -> int:
    """Index where ``window`` wraps to a smaller frame, or -1."""
    prev = -1
    for i, v in enumerate(window):
        if v % n < prev:
            return i
        prev = v % n
    return -1


def _slide_to_end(window: list[int], n: int) -> list[int]:
    """The window's pattern, unwrapped from its first frame and moved to end on frame n-1."""
    rel = [(v - window[0] + n) % n for v in window]
    return [v + n - rel[-1] - 1 for v in rel]


def _unwrapped(windows: list[list[int]], n: int, length: int) -> list[list[int]]:
    """``standard_uniform``: slide wrapping windows to the end, add a window at the wrap point
    when the next one lacks that frame, drop repeats."""
    windows = [list(w) for w in windows]
    repeats = []
    i = 0
    while i < len(windows):
        at = _rolls_over(windows[i], n)
        if at >= 0:
            wrap_frame = windows[i][at]
            windows[i] = _slide_to_end(windows[i], n)
            if wrap_frame not in windows[(i + 1) % len(windows)]:
                windows.insert(i + 1, list(range(wrap_frame, wrap_frame + length)))
        if any(windows[i] == windows[k] for k in range(i)):
            repeats.append(i)
        i += 1
    return [w for k, w in enumerate(windows) if k not in set(repeats)]


def context_windows(num_frames: int, length: int, overlap: int, schedule: str = "static", step: int = 0,
                    stride: int = 1) -> list[list[int]]:
    """Window index lists over ``num_frames`` latent frames (lengths in latent frames).

    A video that fits one window (``looped``: strictly shorter; otherwise not longer) gets
    the single window ``0..num_frames-1``.
    """
    if num_frames < 1 or length < 1 or not 0 <= overlap < length:
        raise ValueError(f"need num_frames >= 1, length >= 1 and 0 <= overlap < length; got {num_frames}, "
                         f"{length}, {overlap}")
    if schedule == "looped":
        if num_frames < length:
            return [list(range(num_frames))]
        return _uniform(num_frames, length, overlap, step, stride, wrap=True)
    if num_frames <= length:
        return [list(range(num_frames))]
    if schedule == "static":
        return _static(num_frames, length, overlap)
    if schedule == "uniform":
        return _unwrapped(_uniform(num_frames, length, overlap, step, stride, wrap=False), num_frames, length)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")


def window_weights(window: list[int], num_frames: int, fuse: str, overlap: int) -> Tensor:
    """Fuse weights ``[len(window)]`` float32 of one window (overlap in latent frames)."""
    n = len(window)
    if fuse == "flat":
        return torch.ones(n)
    if fuse == "pyramid":
        half = (n + 1) // 2
        up = list(range(1, half + 1))
        return torch.tensor(up + up[: n - half][::-1], dtype=torch.float32)
    if fuse == "overlap-linear":
        w = torch.ones(n)
        if overlap > 0:
            if min(window) > 0:   # a neighbour on the left: ramp up over the overlap
                w[:overlap] = torch.linspace(_RAMP_FLOOR, 1, overlap)
            if max(window) < num_frames - 1:   # one on the right: ramp down
                w[-overlap:] = torch.linspace(1, _RAMP_FLOOR, overlap)
        return w
    raise ValueError(f"fuse must be one of {', '.join(FUSE_METHODS)}; got {fuse!r}")


def fuse_windows(x: Tensor, windows: list[list[int]], evaluate: Callable[[int, list[int]], Tensor], fuse: str,
                 overlap: int, dim: int = 2) -> Tensor:
    """Weighted average of per-window outputs along ``dim`` (time of ``[B, C, T', h, w]``).

    evaluate(i, window) returns the output for ``x`` restricted to ``window`` (its frames on
    ``dim``). Output float32 like ``x``'s shape; every frame must be in some window.
    """
    total = x.shape[dim]
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    count = torch.zeros(total, dtype=torch.float32, device=x.device)
    view = [1] * x.ndim
    view[dim] = -1
    for i, window in enumerate(windows):
        out = evaluate(i, window).float()
        w = window_weights(window, total, fuse, overlap).to(x.device)
        idx = torch.tensor(window, device=x.device)
        acc.index_add_(dim, idx, out * w.view(view))
        count.index_add_(0, idx, w)
    if not bool((count > 0).all()):
        raise RuntimeError("context windows left latent frames uncovered; this is a bug in the schedule")
    return acc / count.view(view)


def freenoise(noise: Tensor, length: int, overlap: int, seed: int, dim: int = 1) -> Tensor:
    """FreeNoise initial noise: after the first window, each block of ``length - overlap`` frames
    repeats the frames of the block before it shuffled by a CPU generator seeded with ``seed``.

    noise: ``[16, T', h, w]`` (time on ``dim``); lengths in latent frames; returns a new tensor.
    """
    out = noise.clone()
    total, delta = noise.shape[dim], length - overlap
    g = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    for start in range(0, max(total - length, 0), delta):
        place = start + length
        n = min(delta, total - place)
        if n <= 0:
            break
        source = torch.randperm(n, generator=g) + start
        out.index_copy_(dim, torch.arange(place, place + n), out.index_select(dim, source))
    return out


def branch_evaluator(runner, clip: Tensor | None, y: Tensor | None, latent_frames: int, guidance=None,
                     context: ContextOptions | None = None,
                     interrupt: Callable[[], None] | None = None) -> Callable[..., Tensor]:
    """The sampler's model call for one CFG branch, with or without context windows.

    Returns ``evaluate(x, t, text, branch, step, skip_blocks=()) -> velocity`` (x ``[1, 16, T',
    h, w]``): one runner call when the video fits one window (bit-identical to the plain run),
    else one call per window of ``context.windows(T', step)`` fused with ``context.fuse``.
    Window ``k`` slices ``x`` and ``y`` (mask + image latents) to its frames, keeps the full
    text and CLIP tokens, and uses step-cache branch ``"<branch>/w<k>"``. guidance: a
    :class:`~wan_core.guidance.GuidanceOptions` (RIFLEx: single-window runs and windows with
    global positions; own-clip windows keep the trained RoPE), or None. interrupt: called
    before every window after the first (the sampler calls it before each evaluation).
    """
    windowed = context is not None and context.active(latent_frames)
    blocks = len(runner.dit.blocks)
    if guidance is not None and any(b >= blocks for b in guidance.slg_blocks):
        raise ValueError(f"SLG blocks {list(guidance.slg_blocks)}: this DiT has blocks 0..{blocks - 1} "
                         "(published: 9 for 1.3B, 10 for 14B)")

    def rope(length: int, offset: int = 0):
        return guidance.rope(length, offset) if guidance is not None else None

    def window_text(window: list[int], text: Tensor, branch: str) -> Tensor:
        middle = window[len(window) // 2] * VAE_TIME_STRIDE   # pixel frame of the window's middle latent
        chosen = None
        for start, embeds in context.prompts:
            if start <= middle:
                chosen = embeds
        if chosen is None:
            return text
        return (chosen.negative if branch.startswith("uncond") else chosen.positive).to(text.device, text.dtype)[None]

    def evaluate(x: Tensor, t: Tensor, text: Tensor, branch: str, step: int, skip_blocks=()) -> Tensor:
        if not windowed:
            return runner(x, t, text, clip, y, branch=branch, rope=rope(latent_frames), skip_blocks=skip_blocks)

        def one(k: int, window: list[int]) -> Tensor:
            if k and interrupt is not None:
                interrupt()
            idx = torch.tensor(window, device=x.device)
            yw = None if y is None else y.index_select(2, idx)
            # own-clip windows are within the trained length: RoPE as trained (no RIFLEx);
            # global positions extrapolate like one long clip, so RIFLEx (if asked) covers them all
            r = rope(max(latent_frames, window[0] + len(window)), window[0]) if context.global_positions else None
            return runner(x.index_select(2, idx), t, window_text(window, text, branch), clip, yw,
                          branch=f"{branch}/w{k}", rope=r, skip_blocks=skip_blocks)

        return fuse_windows(x, context.windows(latent_frames, step), one, context.fuse, context.latent_overlap)

    return evaluate


def plan_shape(shape: tuple[int, ...], context: ContextOptions | None) -> tuple[int, ...]:
    """The latent shape the memory plan must budget for: one window's frames when windows run."""
    if context is None or not context.active(shape[-3]):
        return tuple(shape)
    return (*shape[:-3], context.latent_length, *shape[-2:])
