"""The documented limits of a run, in one place, and the checks that enforce them.

Every entry point (``generate``, ``sample``, ``SamplerSettings``, ``check_video_size``,
the CLI and the nodes) refuses a value outside these bounds before anything is allocated or
loaded, naming the limit, so a typo such as ``steps=100000000`` fails at once instead of
after minutes of work. The maxima are bounds on what is sane to ask for, not promises that
the job fits a machine: Wan 2.1 was trained at up to 1280x720 and 81 frames.

The node widgets use the same numbers (``nodes/types.py`` repeats them so that importing
the node pack imports no engine; ``tests/unit/test_limits.py`` checks that they agree).
Only the standard library is imported here.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["MAX_STEPS", "MIN_SIZE", "MAX_SIZE", "MAX_FRAMES", "MIN_CFG", "MAX_CFG", "MAX_SHIFT", "MAX_SEED",
           "MAX_AREA", "SAMPLER_NAMES", "check_steps", "check_cfg", "check_shift", "check_denoise", "check_seed",
           "check_sampler", "check_max_area", "check_size_limits", "check_run_arguments"]

MAX_STEPS = 1000                  # sampling steps (model evaluations of the full schedule); official 40-50
MIN_SIZE = 16                     # pixels per side; sides are multiples of 16
MAX_SIZE = 4096                   # pixels per side; Wan 2.1 was trained up to 1280x720
MAX_FRAMES = 1025                 # 4n+1; Wan 2.1 was trained on 81
MIN_CFG, MAX_CFG = 0.0, 100.0     # guidance scale; official 5.0, 1.0 = off, 0 = unconditional only
MAX_SHIFT = 100.0                 # schedule shift, above 0; official 3, 5 or 16
MAX_SEED = 2**64 - 1              # seeds are 0..2**64-1 (the noise generator's full range)
MAX_AREA = MAX_SIZE * MAX_SIZE    # I2V pixel budget (width * height); official 832*480 or 1280*720
# denoise: above 0, at most 1 (1 = from pure noise)
SAMPLER_NAMES = ("unipc", "dpm++", "euler")   # the registry is wan_core.schedulers.SAMPLERS


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_steps(steps) -> None:
    """``steps`` is an int in ``1..MAX_STEPS``."""
    if not _is_int(steps):
        raise ValueError(f"steps must be a whole number from 1 to {MAX_STEPS}; got {steps!r}.")
    if steps < 1:
        raise ValueError(f"steps {steps} is below 1: sampling needs at least one step.")
    if steps > MAX_STEPS:
        raise ValueError(f"steps {steps} is above the maximum {MAX_STEPS} (MAX_STEPS in wan_core.limits); "
                         "the official settings use 40 or 50.")


def check_cfg(cfg) -> None:
    """``cfg`` is a finite number in ``MIN_CFG..MAX_CFG``."""
    if not _is_real(cfg) or not math.isfinite(cfg):
        raise ValueError(f"cfg must be a finite number from {MIN_CFG:g} to {MAX_CFG:g}; got {cfg!r}.")
    if not MIN_CFG <= cfg <= MAX_CFG:
        raise ValueError(f"cfg {cfg:g} is outside {MIN_CFG:g}..{MAX_CFG:g} (MIN_CFG/MAX_CFG in wan_core.limits); "
                         "the official guidance scale is 5.0, 1.0 turns guidance off.")


def check_shift(shift) -> None:
    """``shift`` is a finite number above 0 and at most ``MAX_SHIFT``."""
    if not _is_real(shift) or not math.isfinite(shift):
        raise ValueError(f"shift must be a finite number above 0 and at most {MAX_SHIFT:g}; got {shift!r}.")
    if not 0.0 < shift <= MAX_SHIFT:
        raise ValueError(f"shift {shift:g} is outside (0, {MAX_SHIFT:g}] (MAX_SHIFT in wan_core.limits); "
                         "the official shifts are 5.0, 3.0 for I2V at 480p and 16 for FLF2V.")


def check_denoise(denoise) -> None:
    """``denoise`` is a finite number above 0 and at most 1."""
    if not _is_real(denoise) or not 0.0 < denoise <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"denoise must be above 0 and at most 1; got {denoise!r} "
                         "(1.0 samples from pure noise, below 1 is video-to-video).")


def check_seed(seed) -> None:
    """``seed`` is an int in ``0..MAX_SEED``."""
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number from 0 to 2**64-1 (MAX_SEED in wan_core.limits); "
                         f"got {seed!r}.")


def check_sampler(sampler) -> None:
    """``sampler`` is one of ``SAMPLER_NAMES``."""
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}.")


def check_max_area(max_area) -> None:
    """``max_area`` (I2V pixel budget) is an int in ``MIN_SIZE**2..MAX_AREA``."""
    if not _is_int(max_area) or not MIN_SIZE * MIN_SIZE <= max_area <= MAX_AREA:
        raise ValueError(f"max_area must be a whole number of pixels from {MIN_SIZE * MIN_SIZE} to {MAX_AREA} "
                         f"({MAX_SIZE}x{MAX_SIZE}, MAX_AREA in wan_core.limits); got {max_area!r}.")


def check_size_limits(width, height, frames) -> list[str]:
    """The upper bounds of a video size (the multiples are checked by ``check_video_size``):
    one problem string per value above its maximum, none when all fit."""
    problems = []
    for name, v, top, const in (("width", width, MAX_SIZE, "MAX_SIZE"), ("height", height, MAX_SIZE, "MAX_SIZE"),
                                ("frames", frames, MAX_FRAMES, "MAX_FRAMES")):
        if _is_real(v) and v > top:
            problems.append(f"{name} {v} is above the maximum {top} ({const} in wan_core.limits)")
    return problems


def check_run_arguments(*, width=None, height=None, frames=None, max_area=None, steps=None, cfg=None,
                        shift=None, sampler=None, seed=None, denoise=None) -> None:
    """Check every given (non-None) argument of a run against the limits above, in this order,
    raising ``ValueError`` at the first one out of bounds; width / height / frames go through
    :func:`wan_core.conditioning.check_video_size` (multiples and maxima). No tensors, no
    models: callers run it before loading anything."""
    if any(v is not None for v in (width, height, frames)):
        from .conditioning import check_video_size  # imports torch: only when a size is checked

        # a missing value (decided later, e.g. from the start image) is replaced by a valid one
        check_video_size(MIN_SIZE if width is None else width, MIN_SIZE if height is None else height,
                         1 if frames is None else frames)
    checks = ((max_area, check_max_area), (steps, check_steps), (cfg, check_cfg), (shift, check_shift),
              (sampler, check_sampler), (seed, check_seed), (denoise, check_denoise))
    for value, check in checks:
        if value is not None:
            check(value)
