"""Wan 2.1 VACE: the T2V DiT plus a control branch (reference images, control video, masks).

Official code: ``wan/modules/vace_model.py`` (``VaceWanModel``) in Wan-Video/Wan2.1; diffusers
``WanVACETransformer3DModel`` is the parity reference (tests/unit/test_vace_parity.py).

Parameters, in the official state-dict names (an official file loads with ``strict=True``):

- everything of the T2V :class:`~wan_core.dit.WanDiT` (``patch_embedding``, ``blocks.N.*``,
  ``head.*`` ...);
- ``vace_patch_embedding``: Conv3d ``vace_in_dim`` (96) -> ``dim``, kernel = stride = the
  patch; its input is the VACE context ``[B, 96, F, H, W]`` = 16 latent channels of the
  inactive frames + 16 of the reactive frames + 64 mask channels (8 x 8 pixels per latent
  pixel), built by :mod:`wan_core.vace_conditioning`;
- ``vace_blocks.0..n-1``: the base block shape plus ``after_proj`` (Linear dim -> dim) on
  every block and ``before_proj`` (Linear dim -> dim) on block 0 only.

Data flow of one call (``prepare`` -> ``blocks`` -> ``finish`` as for the base DiT):

1. the base ``prepare``: tokens ``x0`` ``[B, L, dim]`` from the noisy latents, time, text, RoPE;
2. the control stream ``c`` = ``vace_patch_embedding(y)`` as tokens ``[B, L, dim]`` (float32);
   vace block 0 starts with ``c = before_proj(c) + x0``; each vace block j then runs the base
   block computation on ``c`` (same modulation input, text and RoPE as the base blocks) and
   emits the hint ``after_proj(c)``;
3. base block ``vace_layers[j]`` adds ``hint_j * strength`` to its output (the official
   ``context_scale``). ``strength`` 0 (or no ``y``) skips the branch: the output is the base
   model's bit for bit.

Memory: the vace blocks read only ``c``, ``x0`` and the per-call inputs, never the base
stream, so hint j is computed just before base block ``vace_layers[j]`` needs it
(:class:`VaceStream`). Two ``[B, L, dim]`` tensors of the branch are alive at once (``c``
and one hint) instead of all n hints the official code keeps (14B at 480p x 81: 8 x 0.67 GB
float32). The numbers are the same in either order.

Block swap (:class:`wan_core.offload.BlockSwap`): with every block resident the vace blocks
are resident too; while blocks stream (K < N) the vace blocks stay on their masters and each
is copied to the device for its own call (:func:`wan_core.offload.on_device`, synchronous:
14B fp8, 8 x 0.36 GB per model call). The memory planner counts one vace block in flight then
(``DiTSizes.swap_streamed_bytes``) and the control stream ``c`` + one hint in the
activations: VACE-14B fp8 at 832x480x81 fits an 8 GiB budget. Context windows slice ``y``
with the latents, so each window gets its own hints. A step cache that reuses a step skips
the branch with the blocks (its residual includes the hints).

Attachment layers are configuration, not tensors. Published files: 1.3B has 15 vace blocks
at layers 0, 2, ..., 28 (the official default, every 2nd layer); 14B has 8 at 0, 5, ..., 35
(its config.json). Both equal ``range(0, num_layers, num_layers // n)``
(:func:`vace_layers_for`), which is how a file's layers are inferred from its block count.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .configs import DiTConfig
from .dit import BlockInputs, RopeOptions, WanBlock, WanDiT
from .layers import CastLinear
from .offload import on_device

__all__ = ["WanVaceDiT", "VaceBlock", "VaceAttachedBlock", "VaceStream", "VaceBlockInputs", "vace_layers_for",
           "check_strength"]


def vace_layers_for(num_layers: int, count: int) -> tuple[int, ...]:
    """Base layers of ``count`` vace blocks in a ``num_layers`` DiT: ``range(0, num_layers,
    num_layers // count)`` (1.3B: 30, 15 -> 0, 2, ..., 28; 14B: 40, 8 -> 0, 5, ..., 35).

    Raises ValueError when that rule does not give exactly ``count`` layers.
    """
    if not 1 <= count <= num_layers:
        raise ValueError(f"{count} VACE blocks cannot attach to a DiT of {num_layers} blocks")
    layers = tuple(range(0, num_layers, num_layers // count))
    if len(layers) != count:
        raise ValueError(f"{count} VACE blocks do not spread evenly over {num_layers} DiT blocks "
                         f"(every {num_layers // count}th gives {len(layers)}); not a published VACE layout")
    return layers


def check_strength(strength: float) -> float:
    """The VACE strength (context scale) as a float: finite and >= 0, else ValueError."""
    s = float(strength)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"VACE strength must be a finite number >= 0 (1.0 = the official scale); got {strength!r}")
    return s


class VaceBlock(WanBlock):
    """One block of the control branch: ``(c, x0, inputs) -> (c, hint)``.

    ``c`` and ``x0`` ``[B, L, dim]`` float32; the hint ``after_proj(c)`` is in the compute
    dtype (the official model runs it under its bf16 autocast). Block 0 first maps the
    embedded control tokens with ``before_proj`` and adds the video tokens ``x0``.
    """

    def __init__(self, cfg: DiTConfig, first: bool) -> None:
        super().__init__(cfg)
        if first:
            self.before_proj = CastLinear(cfg.dim, cfg.dim)
            nn.init.zeros_(self.before_proj.weight)    # official init: a fresh branch adds nothing
            nn.init.zeros_(self.before_proj.bias)
        self.after_proj = CastLinear(cfg.dim, cfg.dim)
        nn.init.zeros_(self.after_proj.weight)
        nn.init.zeros_(self.after_proj.bias)

    def forward(self, c: Tensor, x0: Tensor | None, inp: BlockInputs) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        cd = inp.compute_dtype
        if hasattr(self, "before_proj"):
            assert x0 is not None, "VACE block 0 needs the video tokens"
            c = self.before_proj(c.to(cd)).float() + x0
        c = super().forward(c, inp)
        return c, self.after_proj(c.to(cd))


class VaceStream:
    """The control branch of one DiT call, advanced lazily in block order.

    ``add_hint(j, x)`` runs the vace blocks up to ``j`` (once each) and returns ``x + hint_j *
    strength``. Hints must be asked for in increasing order (the base blocks run in order;
    a block skipped by Skip Layer Guidance just leaves its hint unused). Made fresh by every
    :meth:`WanVaceDiT.prepare`, so the model itself keeps no per-call state.
    """

    def __init__(self, blocks: nn.ModuleList, c: Tensor, x0: Tensor, inputs: BlockInputs, strength: float) -> None:
        self._blocks = blocks
        self._c: Tensor | None = c
        self._x0: Tensor | None = x0        # read by vace block 0 only
        self._inputs = inputs
        self.strength = strength
        self._done = 0            # vace blocks run so far
        self._hint: Tensor | None = None

    def add_hint(self, j: int, x: Tensor) -> Tensor:
        """``x`` ``[B, L, dim]`` float32 plus hint ``j`` scaled by the strength (a new tensor)."""
        if j < self._done - 1 or j >= len(self._blocks):
            raise RuntimeError(f"VACE hint {j} asked out of order (hints 0..{self._done - 1} already made "
                               f"of {len(self._blocks)}); the DiT blocks must run in order")
        while self._done <= j:
            assert self._c is not None
            block = self._blocks[self._done]
            # no-op when the block is on the device; under block swap it is copied in for this call
            with on_device(block, self._c.device, empty_cache=False):
                self._c, self._hint = block(self._c, self._x0, self._inputs)
            self._done += 1
            self._x0 = None                    # only vace block 0 reads the video tokens
        if self._done == len(self._blocks):   # the last hint: the stream is no longer needed
            self._c = None
        assert self._hint is not None
        return x + self._hint * self.strength


@dataclass(frozen=True)
class VaceBlockInputs(BlockInputs):
    """:class:`~wan_core.dit.BlockInputs` plus the call's control branch."""

    vace: VaceStream | None = None


class VaceAttachedBlock(WanBlock):
    """A base block that adds VACE hint ``hint`` after itself (same parameters as WanBlock)."""

    def __init__(self, cfg: DiTConfig, hint: int) -> None:
        super().__init__(cfg)
        self.hint = hint

    def forward(self, x: Tensor, inp: BlockInputs) -> Tensor:
        x = super().forward(x, inp)
        stream = getattr(inp, "vace", None)
        return x if stream is None else stream.add_hint(self.hint, x)


class WanVaceDiT(WanDiT):
    """Wan 2.1 VACE DiT (1.3B / 14B) built from a :class:`DiTConfig` with ``vace_layers``.

    Same constructor options as :class:`WanDiT`. Calls take the VACE context as ``y``
    ``[B, vace_in_dim, F, H, W]`` (same latent grid as ``x``; reference frames are part of
    both) and a ``vace_strength``; ``y=None`` runs the plain T2V model.
    """

    def __init__(self, cfg: DiTConfig, *, compute_dtype: torch.dtype | None = None,
                 attention_backend: str = "sdpa") -> None:
        layers = cfg.vace_layers
        if not layers:
            raise ValueError("a VACE DiT needs cfg.vace_layers (the base layers its hints attach after)")
        if cfg.model_type != "t2v":
            raise ValueError(f"VACE extends the text-to-video DiT; got model_type {cfg.model_type!r}")
        if layers[0] != 0 or any(b <= a for a, b in zip(layers, layers[1:])) or layers[-1] >= cfg.num_layers:
            raise ValueError(f"vace_layers {list(layers)} must start at 0 and increase strictly below "
                             f"num_layers={cfg.num_layers}")
        super().__init__(cfg, compute_dtype=compute_dtype, attention_backend=attention_backend)
        hint_of = {layer: j for j, layer in enumerate(layers)}
        self.blocks = nn.ModuleList(VaceAttachedBlock(cfg, hint_of[i]) if i in hint_of else WanBlock(cfg)
                                    for i in range(cfg.num_layers))
        self.vace_blocks = nn.ModuleList(VaceBlock(cfg, first=j == 0) for j in range(len(layers)))
        self.vace_patch_embedding = nn.Conv3d(cfg.vace_in_dim, cfg.dim, kernel_size=cfg.patch_size,
                                              stride=cfg.patch_size)

    def prepare(self, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None = None,
                y: Tensor | None = None, *, rope: RopeOptions | None = None,
                vace_strength: float = 1.0,
                embedded: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, BlockInputs]:
        """Base steps 1-4, plus the control branch when ``y`` is given and the strength > 0.

        y: VACE context ``[B, vace_in_dim, F, H, W]`` (``VaceEmbeds.latents`` batched) or None.
        embedded: as :meth:`WanDiT.prepare`.
        """
        strength = check_strength(vace_strength)
        tokens, inputs = super().prepare(x, t, context, clip_fea, None, rope=rope, embedded=embedded)
        if y is None or strength == 0.0:
            return tokens, inputs          # the base model, bit for bit
        cfg = self.cfg
        if y.ndim != 5 or y.shape[0] != x.shape[0] or y.shape[1] != cfg.vace_in_dim or y.shape[2:] != x.shape[2:]:
            raise ValueError(f"the VACE context must be [B={x.shape[0]}, {cfg.vace_in_dim}, {', '.join(map(str, x.shape[2:]))}] "
                             f"(same latent grid as x, reference frames included); got {tuple(y.shape)}")
        # float32 like patch_embedding (``patch_embedding`` is in the float32 policy's fragments)
        w, b = self.vace_patch_embedding.weight, self.vace_patch_embedding.bias
        c = F.conv3d(y.to(tokens.device).float(), w.float(), b.float(), stride=cfg.patch_size)
        c = rearrange(c, "b c f h w -> b (f h w) c").contiguous()
        stream = VaceStream(self.vace_blocks, c, tokens, inputs, strength)
        fields = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}  # shallow: no tensor copies
        return tokens, VaceBlockInputs(**fields, vace=stream)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None = None,
                y: Tensor | None = None, *, rope: RopeOptions | None = None, vace_strength: float = 1.0) -> Tensor:
        """Velocity ``[B, 16, F, H, W]`` float32; arguments as :meth:`WanDiT.forward` except
        ``y`` (the VACE context, see :meth:`prepare`) and ``vace_strength`` (>= 0, official 1.0)."""
        tokens, inputs = self.prepare(x, t, context, clip_fea, y, rope=rope, vace_strength=vace_strength)
        for block in self.blocks:
            tokens = block(tokens, inputs)
        return self.finish(tokens, inputs)
