"""Optional ``torch.compile`` of the DiT's transformer blocks (off unless asked for).

Only the blocks are compiled: they are ~99 % of the DiT's work, and every block has the same
code, so one graph serves them all (measured: 12 blocks -> 1 unique graph, no recompiles),
while ``prepare`` / ``finish`` stay eager. Each block's ``forward`` is replaced by an
instance attribute wrapping ``torch.compile`` of the original bound method, so

- parameter names and the module tree do not change (loaders, LoRA, block swap unaffected),
- :class:`wan_core.runner.DiTRunner` and any ``BlockExecutor`` pick it up through
  ``block(tokens, inputs)`` with no change,
- :meth:`CompiledBlocks.restore` (or ``with compiled_blocks(dit):``) returns to the plain
  model exactly,
- unmerged LoRA hooks (:mod:`wan_core.lora`) added or removed after compiling are seen
  (dynamo is told to guard on module hooks; it recompiles once per hook set). Merged LoRAs
  change only parameter values, which compiled code reads at every call.

Dynamo's recompile limit (8 variants per graph) applies: many resolutions plus several LoRA
sets in one session can exceed it, after which dynamo itself runs new variants eagerly.

Compilation happens lazily on the first call of each new input shape/dtype (the token count
changes with resolution and frame count; ``dynamic=None`` lets dynamo generalise after the
first change). If compiling or running the compiled code fails (no C compiler for inductor
on CPU, no triton on GPU, an unsupported op), the call is re-run eagerly; when that succeeds
the blocks stay eager from then on and one warning says why. Errors the eager model raises
too (bad inputs, out of memory) propagate unchanged.

Modes: ``None`` (default inductor), ``"reduce-overhead"`` (CUDA graphs: do not combine with
block swap, whose weights move every step), ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``.
Speed-ups need a GPU; on CPU this only has to keep working (tests/unit/test_compile.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["CompiledBlocks", "compile_blocks", "compiled_blocks"]

log = logging.getLogger("wan_core")


@dataclass
class _State:
    """Shared by all blocks of one :func:`compile_blocks` call: one failure turns all eager."""

    failed: bool = False
    error: str = ""


class _CompiledForward:
    """Instance ``forward`` of one block: compiled, falling back to the eager method once."""

    def __init__(self, eager: Callable, compiled: Callable, state: _State) -> None:
        self.eager = eager
        self.compiled = compiled
        self.state = state

    def __call__(self, *args, **kwargs):
        if self.state.failed:
            return self.eager(*args, **kwargs)
        try:
            # Guard on module hooks (off by default in dynamo): without it a LoRA hook added
            # after compiling is silently ignored. Measured: LoRA hooks on all 12 blocks of a
            # test DiT add one graph, removing them returns to the first.
            with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
                return self.compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any compiler failure; eager decides below
            out = self.eager(*args, **kwargs)  # raises itself if the inputs are the problem
            self.state.failed = True
            self.state.error = _summary(err)
            log.warning("wan_core: torch.compile of the DiT blocks failed (%s); running them eagerly.",
                        self.state.error)
            return out


def _summary(err: BaseException) -> str:
    """One line naming the real cause (dynamo wraps backend errors in BackendCompilerFailed)."""
    inner = getattr(err, "inner_exception", None) or err.__cause__ or err
    lines = [line for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0][:300] if lines else ''}"


@dataclass
class CompiledBlocks:
    """Handle returned by :func:`compile_blocks`."""

    blocks: nn.ModuleList
    options: dict
    _state: _State = field(default_factory=_State, repr=False)

    @property
    def fell_back(self) -> bool:
        """True once compilation failed and the blocks run eagerly."""
        return self._state.failed

    def restore(self) -> None:
        """Give every block its plain ``forward`` back (idempotent)."""
        for block in self.blocks:
            if isinstance(block.__dict__.get("forward"), _CompiledForward):
                del block.forward


def compile_blocks(dit: nn.Module, mode: str | None = None, dynamic: bool | None = None,
                   backend: str = "inductor", fullgraph: bool = False) -> CompiledBlocks:
    """Compile each ``dit.blocks[i].forward`` in place with ``torch.compile``.

    Args:
        dit: a :class:`wan_core.dit.WanDiT` (anything with a ``blocks`` ModuleList).
        mode, dynamic, fullgraph, backend: passed to ``torch.compile``; ``backend="eager"``
            or ``"aot_eager"`` trace without generating code (tests, debugging).

    Returns:
        :class:`CompiledBlocks`; ``restore()`` undoes the patch. Compiling twice first
        restores the earlier compilation.
    """
    blocks = dit.blocks
    for block in blocks:  # re-compiling replaces, never stacks
        if isinstance(block.__dict__.get("forward"), _CompiledForward):
            del block.forward
    options = {"mode": mode, "dynamic": dynamic, "backend": backend, "fullgraph": fullgraph}
    handle = CompiledBlocks(blocks, options)
    for block in blocks:
        eager = type(block).forward.__get__(block)
        compiled = torch.compile(eager, **options)
        block.forward = _CompiledForward(eager, compiled, handle._state)
    log.info("wan_core: compiling %d DiT blocks on first use (torch.compile %s)", len(blocks),
             ", ".join(f"{k}={v}" for k, v in options.items() if v is not None))
    return handle


@contextmanager
def compiled_blocks(dit: nn.Module, **options) -> Iterator[CompiledBlocks]:
    """``with compiled_blocks(dit, mode=...):`` compiled inside, plain again on exit."""
    handle = compile_blocks(dit, **options)
    try:
        yield handle
    finally:
        handle.restore()
