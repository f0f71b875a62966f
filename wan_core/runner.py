"""One DiT evaluation, split so memory and speed features plug in without touching the model.

``DiTRunner(dit)(x, t, context, clip_fea, y, branch=...)`` equals ``dit(x, t, context,
clip_fea, y)``; it runs ``dit.prepare`` -> the blocks -> ``dit.finish`` and lets two
optional collaborators change *how* the blocks run:

- a :class:`BlockExecutor` decides where each block's weights live while it runs (block
  swap streams them from CPU to the GPU one block ahead; the default runs them in place);
- a :class:`StepCache` may skip the blocks on a step and reuse the residual of an earlier
  step (TeaCache, MagCache), with separate state per CFG branch ("cond" / "uncond").

The sampler tells the runner which step it is on with :meth:`DiTRunner.begin_step`; a new
run starts with :meth:`DiTRunner.begin_run`. Neither collaborator may change the numbers
when disabled: the tests compare against a plain ``dit(...)`` bit for bit.

Contract: an executor never modifies ``tokens`` in place (a step cache computes the residual
``out - tokens`` from the same tensor), passes over the blocks whose index is in
``inputs.skip_blocks`` (Skip Layer Guidance), and a sampler evaluates each branch once per step.

Per-call options: ``rope`` (:class:`~wan_core.dit.RopeOptions`: positions of a context window,
RIFLEx) and ``skip_blocks``. A call that skips blocks bypasses the step cache (its residual
is not the branch's usual one, so it is neither reused nor stored).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol

from torch import Tensor, nn

from .configs import DiTConfig
from .dit import BlockInputs, RopeOptions, WanDiT

__all__ = ["BlockExecutor", "StepCache", "InPlaceBlocks", "DiTRunner"]


class BlockExecutor(Protocol):
    """Runs the transformer blocks on ``tokens`` ``[B, L, dim]`` (float32) in order."""

    def run(self, blocks: nn.ModuleList, tokens: Tensor, inputs: BlockInputs) -> Tensor: ...


class StepCache(Protocol):
    """Decides per step and branch whether the blocks must run, and stores what they did."""

    def begin_run(self, total_steps: int) -> None: ...

    def should_compute(self, branch: str, step: int, tokens: Tensor, inputs: BlockInputs) -> bool: ...

    def store(self, branch: str, tokens_in: Tensor, tokens_out: Tensor) -> None: ...

    def reuse(self, branch: str, tokens_in: Tensor) -> Tensor: ...

    def summary(self) -> str: ...


class InPlaceBlocks:
    """Default executor: every block runs wherever its weights already are."""

    def run(self, blocks: nn.ModuleList, tokens: Tensor, inputs: BlockInputs) -> Tensor:
        skip = inputs.skip_blocks
        for i, block in enumerate(blocks):
            if i not in skip:
                tokens = block(tokens, inputs)
        return tokens


class DiTRunner:
    """Callable DiT forward with pluggable block execution and step caching.

    Args:
        dit: a :class:`wan_core.dit.WanDiT`.
        executor: where blocks run (default :class:`InPlaceBlocks`).
        step_cache: optional :class:`StepCache`.
    """

    def __init__(self, dit: WanDiT, executor: BlockExecutor | None = None, step_cache: StepCache | None = None) -> None:
        self.dit = dit
        self.executor = executor or InPlaceBlocks()
        self.step_cache = step_cache
        self.step = 0
        self.total_steps = 0

    @property
    def cfg(self) -> DiTConfig:
        return self.dit.cfg

    def begin_run(self, total_steps: int) -> None:
        """Called once before the first step of a sampling run."""
        self.step, self.total_steps = 0, total_steps
        if self.step_cache is not None:
            self.step_cache.begin_run(total_steps)

    def begin_step(self, step: int) -> None:
        """Called before the model evaluations of step ``step`` (0-based)."""
        self.step = step

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None = None,
                 y: Tensor | None = None, branch: str = "cond", *, rope: RopeOptions | None = None,
                 skip_blocks: Iterable[int] = (), vace_strength: float | None = None) -> Tensor:
        """Velocity ``[B, 16, F, H, W]`` float32, as :meth:`WanDiT.forward`.

        branch: the step-cache state this call belongs to ("cond", "uncond"; a context window
        appends ``/w<i>``). rope: positions / RIFLEx. skip_blocks: block indices not run.
        vace_strength: a VACE DiT's context scale for this call (``y`` is its VACE context).
        """
        # rope only when given: the plain call stays the plain call (wrappers and spies see it unchanged)
        extra = {} if rope is None else {"rope": rope}
        if vace_strength is not None:
            extra["vace_strength"] = vace_strength
        tokens, inputs = self.dit.prepare(x, t, context, clip_fea, y, **extra)
        skip = frozenset(int(i) for i in skip_blocks)
        if skip:
            n = len(self.dit.blocks)
            if not all(0 <= i < n for i in skip):
                raise ValueError(f"skip_blocks {sorted(skip)} must be block indices 0..{n - 1}")
            inputs = dataclasses.replace(inputs, skip_blocks=skip)
            return self.dit.finish(self.executor.run(self.dit.blocks, tokens, inputs), inputs)
        cache = self.step_cache
        if cache is not None and not cache.should_compute(branch, self.step, tokens, inputs):
            tokens = cache.reuse(branch, tokens)
        else:
            out = self.executor.run(self.dit.blocks, tokens, inputs)
            if cache is not None:
                cache.store(branch, tokens, out)
            tokens = out
        return self.dit.finish(tokens, inputs)
