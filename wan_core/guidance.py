"""Guidance options of a sampling run: Skip Layer Guidance, CFG-Zero*, a CFG schedule, RIFLEx.

Classifier-free guidance as the official Wan 2.1 pipelines do it is
``guided = uncond + cfg * (cond - uncond)`` on the DiT's velocity. :class:`GuidanceOptions`
changes it in ways users combine with Wan; the defaults change nothing (``sample()`` with
``GuidanceOptions()`` is bit-identical to the plain run, tests/unit/test_guidance.py):

- **Skip Layer Guidance** (SLG; as popularised for Wan by Wan2GP and ComfyUI-WanVideoWrapper):
  the unconditional pass skips the blocks in ``slg_blocks`` on steps whose fraction
  ``step / steps`` lies in ``[slg_start, slg_end)``, so the guidance pushes away from a
  "structurally weakened" prediction. Published Wan defaults: block 9 (1.3B), 10 (14B),
  20-80 % of the steps (:data:`SLG_DEFAULT_BLOCKS`).
- **CFG-Zero*** (Fan et al. 2025, arXiv 2503.18886): per sample, the optimised scale
  ``s* = <cond, uncond> / (||uncond||^2 + 1e-8)`` over all latent elements, and
  ``guided = s* uncond + cfg (cond - s* uncond)``. Zero-init: the first
  ``zero_init_steps`` steps output a zero velocity (the official code zeroes step 0 with its
  ``zero_init_steps = 0`` default; ours counts steps, so 1 is the official setting).
- **CFG schedule**: ``cfg_schedule = ((start_step, cfg), ...)``: from 0-based step
  ``start_step`` on, that cfg (until the next entry); a cfg of 1 runs no unconditional pass
  (half the cost), e.g. ``((10, 1.0),)`` guides the first 10 steps only.
- **RIFLEx** (``riflex``): lowers the intrinsic temporal RoPE frequency (see
  :class:`wan_core.dit.RopeOptions`) so videos longer than the trained 81 frames do not
  repeat; ``riflex_k`` defaults to the published Wan 2.1 index 6.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from .dit import RIFLEX_K, RopeOptions

__all__ = ["GuidanceOptions", "SLG_DEFAULT_BLOCKS", "cfg_zero_star_scale", "guide", "parse_blocks",
           "parse_cfg_schedule"]

# Published SLG blocks per model width (dim 1536 = 1.3B, 5120 = 14B).
SLG_DEFAULT_BLOCKS: dict[str, tuple[int, ...]] = {"1.3B": (9,), "14B": (10,)}
CFG_ZERO_STAR_EPS = 1e-8   # the official denominator guard


@dataclass(frozen=True)
class GuidanceOptions:
    """How the conditional and unconditional predictions are combined; defaults: official CFG.

    slg_blocks: block indices the unconditional pass skips (empty = SLG off).
    slg_start / slg_end: step fractions 0..1; SLG acts on steps with ``start <= i/steps < end``.
    cfg_zero_star: use the CFG-Zero* optimised scale. zero_init_steps: zero the velocity of
    the first K steps (0 = off). cfg_schedule: ``((start_step, cfg), ...)``, sorted by step.
    riflex: lower the intrinsic temporal RoPE frequency (RIFLEx) for the whole video length.
    riflex_k: its 1-based index (published for Wan 2.1: 6).
    """

    slg_blocks: tuple[int, ...] = ()
    slg_start: float = 0.2
    slg_end: float = 0.8
    cfg_zero_star: bool = False
    zero_init_steps: int = 0
    cfg_schedule: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    riflex: bool = False
    riflex_k: int = RIFLEX_K

    def __post_init__(self) -> None:
        object.__setattr__(self, "slg_blocks", tuple(int(b) for b in self.slg_blocks))
        object.__setattr__(self, "cfg_schedule", tuple((int(s), float(c)) for s, c in self.cfg_schedule))
        if any(b < 0 for b in self.slg_blocks):
            raise ValueError(f"slg_blocks must be block indices >= 0; got {self.slg_blocks}")
        if not 0.0 <= self.slg_start <= self.slg_end <= 1.0:
            raise ValueError(f"SLG range must satisfy 0 <= slg_start <= slg_end <= 1; got "
                             f"{self.slg_start}..{self.slg_end}")
        if self.zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be >= 0; got {self.zero_init_steps}")
        steps = [s for s, _ in self.cfg_schedule]
        if any(s < 0 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"cfg_schedule must list (start_step >= 0, cfg) pairs by increasing step; "
                             f"got {self.cfg_schedule}")
        for _, c in self.cfg_schedule:
            if not (math.isfinite(c) and 0.0 <= c <= 100.0):
                raise ValueError(f"every cfg in cfg_schedule must be a finite number in 0..100; got {c}")
        if self.riflex_k < 1:
            raise ValueError(f"riflex_k must be >= 1 (1-based frequency index); got {self.riflex_k}")

    @property
    def is_default(self) -> bool:
        return self == GuidanceOptions()

    def cfg_at(self, step: int, cfg: float) -> float:
        """The guidance scale of 0-based ``step``: the last schedule entry at or before it, else ``cfg``."""
        for start, value in self.cfg_schedule:
            if start > step:
                break
            cfg = value
        return cfg

    def skip_blocks_at(self, step: int, total: int) -> tuple[int, ...]:
        """Blocks the unconditional pass of ``step`` (0-based, of ``total``) skips."""
        if not self.slg_blocks or total < 1:
            return ()
        frac = step / total
        return self.slg_blocks if self.slg_start <= frac < self.slg_end else ()

    def rope(self, latent_frames: int, time_offset: int = 0) -> RopeOptions | None:
        """DiT RoPE options for a video of ``latent_frames``; None when nothing changes."""
        if not self.riflex and time_offset == 0:
            return None
        return RopeOptions(time_offset=time_offset, riflex_k=self.riflex_k if self.riflex else 0,
                           riflex_length=latent_frames if self.riflex else 0)

    def describe(self) -> str:
        """One line for the log; "" for the defaults."""
        parts = []
        if self.slg_blocks:
            parts.append(f"SLG blocks {list(self.slg_blocks)} at {self.slg_start:.0%}-{self.slg_end:.0%}")
        if self.cfg_zero_star:
            parts.append("CFG-Zero*")
        if self.zero_init_steps:
            parts.append(f"zero-init {self.zero_init_steps} step(s)")
        if self.cfg_schedule:
            parts.append("cfg schedule " + ", ".join(f"{c:g} from step {s}" for s, c in self.cfg_schedule))
        if self.riflex:
            parts.append(f"RIFLEx k={self.riflex_k}")
        return "; ".join(parts)


def cfg_zero_star_scale(cond: Tensor, uncond: Tensor) -> Tensor:
    """CFG-Zero*'s ``s* = <cond, uncond> / (||uncond||^2 + 1e-8)`` per sample, shape ``[B, 1, ..., 1]``
    (float32), over every element but the batch."""
    c, u = cond.float().flatten(1), uncond.float().flatten(1)
    s = (c * u).sum(dim=1) / (u.pow(2).sum(dim=1) + CFG_ZERO_STAR_EPS)
    return s.view(-1, *([1] * (cond.ndim - 1)))


def guide(cond: Tensor, uncond: Tensor, cfg: float, zero_star: bool = False) -> Tensor:
    """Guided velocity: official CFG, or CFG-Zero* with ``zero_star``."""
    if not zero_star:
        return uncond + cfg * (cond - uncond)
    s = cfg_zero_star_scale(cond, uncond).to(uncond.dtype)
    scaled = uncond * s
    return scaled + cfg * (cond - scaled)


def parse_blocks(text: str) -> tuple[int, ...]:
    """``"9"`` / ``"9,10"`` -> block indices (the CLI's and the node's text form); "" -> ()."""
    text = text.strip()
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"SLG blocks must be block numbers separated by commas (e.g. 9 or 9,10); "
                         f"got {text!r}") from None


def parse_cfg_schedule(text: str | Sequence[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """``"0:6,10:3,30:1"`` -> ``((0, 6.0), (10, 3.0), (30, 1.0))`` (start step : cfg); "" -> ()."""
    if not isinstance(text, str):
        return tuple((int(s), float(c)) for s, c in text)
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        step, sep, cfg = part.partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((int(step), float(cfg)))
        except ValueError:
            raise ValueError(f"a cfg schedule is START_STEP:CFG pairs separated by commas (e.g. 0:6,10:3,30:1); "
                             f"got {text!r}") from None
    return tuple(out)

