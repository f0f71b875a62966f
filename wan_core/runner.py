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
``out - tokens`` from the same tensor), and a sampler evaluates each branch once per step.
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

__all__ = ["BlockExecutor", "StepCache", "InPlaceBlocks", "DiTRunner"]


class BlockExecutor(Protocol):
    """Runs the transformer blocks on ``tokens`` ``[B, L, dim]`` (float32) in order."""

    def run(self, blocks: nn.ModuleList, tokens: Tensor, inputs) -> Tensor: ...


class StepCache(Protocol):
    """Decides per step and branch whether the blocks must run, and stores what they did."""

    def begin_run(self, total_steps: int) -> None: ...

    def should_compute(self, branch: str, step: int, tokens: Tensor, inputs) -> bool: ...

    def store(self, branch: str, tokens_in: Tensor, tokens_out: Tensor) -> None: ...

    def reuse(self, branch: str, tokens_in: Tensor) -> Tensor: ...

    def summary(self) -> str: ...


class InPlaceBlocks:
    """Default executor: every block runs wherever its weights already are."""

    def run(self, blocks: nn.ModuleList, tokens: Tensor, inputs) -> Tensor:
        for block in blocks:
            tokens = block(tokens, inputs)
        return tokens


class DiTRunner:
    """Callable DiT forward with pluggable block execution and step caching.

    Args:
        dit: a :class:`wan_core.dit.WanDiT`.
        executor: where blocks run (default :class:`InPlaceBlocks`).
        step_cache: optional :class:`StepCache`.
    """

    def __init__(self, dit, executor: BlockExecutor | None = None, step_cache: StepCache | None = None) -> None:
        self.dit = dit
        self.executor = executor or InPlaceBlocks()
        self.step_cache = step_cache
        self.step = 0
        self.total_steps = 0

    @property
    def cfg(self):
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
                 y: Tensor | None = None, branch: str = "cond") -> Tensor:
        """Velocity ``[B, 16, F, H, W]`` float32, as :meth:`WanDiT.forward`."""
        tokens, inputs = self.dit.prepare(x, t, context, clip_fea, y)
        cache = self.step_cache
        if cache is not None and not cache.should_compute(branch, self.step, tokens, inputs):
            tokens = cache.reuse(branch, tokens)
        else:
            out = self.executor.run(self.dit.blocks, tokens, inputs)
            if cache is not None:
                cache.store(branch, tokens, out)
            tokens = out
        return self.dit.finish(tokens, inputs)
