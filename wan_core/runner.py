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

Step-invariant work: the text (and CLIP image) context of a guidance branch does not change
across the steps of a run, so each block's cross-attention K/V are computed on the branch's
first call and reused, and so is the embedded text / image context (:class:`ContextKVCache`,
bit-identical, cleared by ``begin_run``). On by default when the blocks run on the CPU; on a
GPU the run plan decides (:func:`wan_core.run_plan.prepare_run`: on when
:func:`context_kv_bytes` fits beside the resident blocks it chose, off otherwise, said in the
plan's line); a runner built by hand on a GPU opts in with ``context_cache=True``.

Per-call options: ``rope`` (:class:`~wan_core.dit.RopeOptions`: positions of a context window,
RIFLEx) and ``skip_blocks``. A call that skips blocks bypasses the step cache (its residual
is not the branch's usual one, so it is neither reused nor stored).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from .configs import DiTConfig
from .dit import BlockInputs, RopeOptions, WanDiT

__all__ = ["BlockExecutor", "StepCache", "InPlaceBlocks", "DiTRunner", "ContextKVCache", "BranchContext",
           "context_kv_bytes", "CFG_BRANCHES"]


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


#: guidance branches a sampling run evaluates ("cond", "uncond"): the cache's default bound, and
#: what the run plan counts (context_kv_bytes(..., branches=CFG_BRANCHES))
CFG_BRANCHES = 2


def context_kv_bytes(cfg: DiTConfig, batch: int, dtype: torch.dtype, branches: int = CFG_BRANCHES,
                     image_tokens: int | None = None, text_rows: int | None = None) -> int:
    """Bytes :class:`ContextKVCache` holds for ``branches`` guidance branches: per branch and block,
    K and V ``[batch, text_rows + image_tokens, dim]`` in the compute ``dtype``, and per branch the
    embedded context: text ``[batch, text_rows, dim]`` in ``dtype``, image tokens float32.
    ``text_rows`` defaults to ``text_len``, the bound: the padded context has that many rows, the
    collapsed one (:mod:`wan_core.text_pad`: the L real rows + 1, float32 or on the CPU) never
    more; the run plan counts the bound. ``image_tokens`` defaults to 257 (i2v) / ``image_pos_len`` (flf2v) / 0
    (t2v). 14B t2v, bf16, B=1, 2 branches: 40 * 2 * 512 * 5120 * 2 * 2 + 2 * 512 * 5120 * 2 = 0.85 GB."""
    if image_tokens is None:
        image_tokens = 0 if not cfg.has_image_input else (cfg.image_pos_len if cfg.model_type == "flf2v" else 257)
    text = cfg.text_len if text_rows is None else text_rows
    itemsize = torch.empty((), dtype=dtype).element_size()
    kv = cfg.num_layers * 2 * batch * (text + image_tokens) * cfg.dim * itemsize
    embedded = batch * cfg.dim * (text * itemsize + image_tokens * 4)
    return branches * (kv + embedded)


@dataclass
class BranchContext:
    """What one guidance branch's context gives a run: the embedded text / image context
    (``WanDiT.prepare``'s steps 3-4, ``(BlockInputs.context, BlockInputs.context_img)``, None
    until the branch's first call) and each block's cross-attention K/V (``kv``, keyed by the
    ``CrossAttention`` module, the ``BlockInputs.cross_kv`` of the branch's calls)."""

    kv: dict = field(default_factory=dict)
    embedded: tuple[Tensor, Tensor | None] | None = None

    def tensors(self) -> Iterator[Tensor]:
        for entry in (*self.kv.values(), self.embedded or ()):
            yield from (t for t in entry if t is not None)


class ContextKVCache:
    """The embedded context and cross-attention K/V of every block, per guidance branch, for one run.

    An entry belongs to a branch's base name ("cond", "uncond"; a context window's ``/w<i>``
    suffix shares its branch's entry) and remembers the raw ``context`` / ``clip_fea`` it was
    built from: a call whose inputs differ (another prompt, edited in place) replaces the
    entry, so the cache never changes a number. At most ``max_branches`` entries (least
    recently used dropped): memory is bounded by ``max_branches`` x :func:`context_kv_bytes`
    for one branch.
    """

    def __init__(self, max_branches: int = CFG_BRANCHES) -> None:
        self.max_branches = max_branches
        self._entries: OrderedDict[str, tuple[tuple, BranchContext]] = OrderedDict()

    @staticmethod
    def _key(t: Tensor | None) -> tuple:
        # inference tensors (ComfyUI runs nodes under inference_mode) have no version counter
        version = None if t is None or t.is_inference() else t._version
        return () if t is None else (t, version, t.shape, t.dtype, t.device)

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        if len(a) != len(b):
            return False
        if not a:
            return True
        if a[1] is not None and a[0]._version != a[1]:
            return False  # the stored tensor was written in place since the entry was built
        if a[0] is b[0] and a[1] is not None:
            return True  # the same tensor, not written since (the sampler's usual case)
        return a[2:] == b[2:] and torch.equal(a[0], b[0])

    def branch(self, branch: str, context: Tensor, clip_fea: Tensor | None) -> BranchContext:
        """The :class:`BranchContext` of ``branch`` built from these inputs (empty when new)."""
        name = branch.split("/", 1)[0]
        keys = (self._key(context), self._key(clip_fea))
        found = self._entries.get(name)
        if found is not None and all(self._same(a, b) for a, b in zip(found[0], keys)):
            self._entries.move_to_end(name)
            return found[1]
        self._entries.pop(name, None)
        while len(self._entries) >= self.max_branches:
            self._entries.popitem(last=False)
        made = BranchContext()
        self._entries[name] = (keys, made)
        return made

    def entry(self, branch: str, context: Tensor, clip_fea: Tensor | None) -> dict:
        """The per-block K/V dict of :meth:`branch`."""
        return self.branch(branch, context, clip_fea).kv

    def clear(self) -> None:
        self._entries.clear()

    def nbytes(self) -> int:
        """Bytes of the cached tensors now held (K/V and embedded contexts)."""
        return sum(t.numel() * t.element_size() for _, held in self._entries.values() for t in held.tensors())


class DiTRunner:
    """Callable DiT forward with pluggable block execution and step caching.

    Args:
        dit: a :class:`wan_core.dit.WanDiT`.
        executor: where blocks run (default :class:`InPlaceBlocks`).
        step_cache: optional :class:`StepCache`.
        context_cache: keep each block's cross-attention K/V per guidance branch for the run
            (:class:`ContextKVCache`, exact); None = on when the blocks run on the CPU (host
            memory; on a GPU it costs :func:`context_kv_bytes` of VRAM: the run plan turns it
            on when that fits, a runner built by hand opts in).
    """

    def __init__(self, dit: WanDiT, executor: BlockExecutor | None = None, step_cache: StepCache | None = None,
                 context_cache: bool | None = None) -> None:
        self.dit = dit
        self.executor = executor or InPlaceBlocks()
        self.step_cache = step_cache
        self.context_cache = context_cache
        self.context_kv = ContextKVCache()
        self.step = 0
        self.total_steps = 0

    @property
    def cfg(self) -> DiTConfig:
        return self.dit.cfg

    def begin_run(self, total_steps: int) -> None:
        """Called once before the first step of a sampling run."""
        self.step, self.total_steps = 0, total_steps
        self.context_kv.clear()  # weights (LoRA) or prompts may differ from the last run
        if self.step_cache is not None:
            self.step_cache.begin_run(total_steps)

    def begin_step(self, step: int) -> None:
        """Called before the model evaluations of step ``step`` (0-based)."""
        self.step = step

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None = None,
                 y: Tensor | None = None, branch: str = "cond", *, rope: RopeOptions | None = None,
                 skip_blocks: Iterable[int] = (), vace_strength: float | None = None,
                 full_ref: Tensor | None = None) -> Tensor:
        """Velocity ``[B, 16, F, H, W]`` float32, as :meth:`WanDiT.forward`.

        branch: the step-cache state this call belongs to ("cond", "uncond"; a context window
        appends ``/w<i>``). rope: positions / RIFLEx. skip_blocks: block indices not run.
        vace_strength: a VACE DiT's context scale for this call (``y`` is its VACE context).
        full_ref: a Fun V1.1 Control DiT's reference latent ``[B, 16, H, W]`` (:mod:`wan_core.fun`).
        """
        # rope only when given: the plain call stays the plain call (wrappers and spies see it unchanged)
        extra = {} if rope is None else {"rope": rope}
        if vace_strength is not None:
            extra["vace_strength"] = vace_strength
        if full_ref is not None:
            extra["full_ref"] = full_ref
        use_cache = self.context_cache
        if use_cache is None:   # the text embedding stays on the compute device under block swap
            use_cache = self.dit.text_embedding[0].weight.device.type == "cpu"
        held = self.context_kv.branch(branch, context, clip_fea) if use_cache else None
        if held is not None and held.embedded is not None:
            extra["embedded"] = held.embedded
        tokens, inputs = self.dit.prepare(x, t, context, clip_fea, y, **extra)
        if held is not None:
            held.embedded = (inputs.context, inputs.context_img)
            inputs = dataclasses.replace(inputs, cross_kv=held.kv)
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
