"""Wan 2.1 diffusion transformer (DiT) for T2V, I2V and FLF2V.

Parameter names are the official Wan 2.1 state-dict names (``blocks.0.self_attn.q.weight``,
``head.modulation``, ``img_emb.proj.0.weight`` ...), so an official checkpoint loads with
``load_state_dict(sd, strict=True)``. There are no buffers: the RoPE table is computed per
call from the patch grid.

Data flow for one call (``forward`` = ``prepare`` -> ``blocks[i](x, inputs)`` -> ``finish``,
split so a block-swap engine can run the blocks one at a time):

1. patch embedding: ``[B, in_dim, F, H, W]`` -> tokens ``[B, F*H/2*W/2, dim]`` in (f, h, w) order
2. time: float64 sinusoid (cos first) -> ``time_embedding`` = ``e`` ``[B, dim]`` ->
   ``time_projection`` = ``e0`` ``[B, 6, dim]``, shared by all blocks (each adds its own bias)
3. text: context zero-padded to ``text_len`` -> ``text_embedding``; the padding is attended
   (no mask) like the official model, its equal pad rows collapsed to one row whose key weighs
   ``log(n)`` more (the same function, exact; :mod:`wan_core.text_pad` says where and why)
4. image (i2v / flf2v): CLIP tokens -> ``img_emb`` (plus ``emb_pos`` for flf2v)
5. blocks: self-attention with 3D RoPE, cross-attention (text + image), FFN, all gated by
   the modulation
6. head: modulated LayerNorm + Linear to 64 features per token, unpatchify

Precision policy (written once, here, as data: ``PRECISION``, a
:class:`~wan_core.layers.PrecisionPolicy`, also ``WanDiT.precision``):
- ``FP32_PARAMS`` (``PRECISION.keep_fp32``): parameters whose name contains one of these
  fragments stay float32 in storage whatever dtype the rest of the model is stored in, and
  are computed in float32.
  They are what the official code runs in fp32 under its bf16 autocast (time MLPs,
  modulation, norms, head) plus ``patch_embedding`` (ComfyUI keeps it fp32 too; the official
  autocast would run that conv in bf16) and the two LayerNorms / position embedding of
  ``img_emb``. Cost: about 1.3 % of the parameters (mostly ``time_projection``).
- Every other Linear (attention, FFN, text embedding, ``img_emb`` MLP) runs in the compute
  dtype: ``WanDiT.compute_dtype`` or, when None, the storage dtype of those Linear weights
  (fp32/bf16/fp16; bf16 on CUDA and fp32 on CPU for fp8 storage). Weights are cast at the
  point of use, so storage and compute dtypes may differ.
- The residual stream ``x``, modulation and gating run in float32, as in the official model.
- RoPE: tables are built in float64 like the official code and applied in ``ROPE_DTYPE``
  (float32; ``WanDiT.rope_dtype`` can be set per model). Float32 changes the fp32 tiny-model
  output by <= 1.7e-6 abs / 3e-7 relative against float64, which reproduces the official
  model bit for bit (tests/unit/test_dit_parity.py); that is far below bf16 rounding and
  avoids float64 work on the big q/k activations.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import BACKENDS, attention
from .configs import DiTConfig
from .fun import prepend_reference
from .layers import CastLinear, PrecisionPolicy
from .rope import (RIFLEX_K, RIFLEX_MARGIN, ROPE_DTYPE, ROPE_THETA, RopeOptions, apply_rope,  # noqa: F401
                   apply_rope_, rope_axis_dims, rope_frequencies, rope_tables)
from .text_pad import biased_attention, collapses_padding, pad_bias, text_rows

if TYPE_CHECKING:
    from .checkpoint import LoadReport

PRECISION = PrecisionPolicy(keep_fp32=(
    "patch_embedding", "time_embedding", "time_projection", "modulation", "norm",
    "head.head", "img_emb.proj.0.", "img_emb.proj.4.", "img_emb.emb_pos", "ref_conv",
))
FP32_PARAMS: tuple[str, ...] = PRECISION.keep_fp32
#: Whether parameter ``name`` (official DiT name) is stored and computed in float32.
keeps_fp32 = PRECISION.keeps_fp32


# --------------------------------------------------------------------------- layers


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (input, weights and output)."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the full feature dim with a learned weight; float32 in and out."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # written out (not F.rms_norm, torch >= 2.4 only) in the official order of operations
        x = x.float()
        # in place on the fresh product: same operations and order, one temporary fewer
        return (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)).mul_(self.weight.float())


def _layer_norm(x: Tensor, eps: float) -> Tensor:
    """Non-affine LayerNorm (official ``norm1``/``norm2``/``head.norm`` have no params)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` (float32 ``shift``/``scale`` ``[B, 1, dim]``)."""
    h = _layer_norm(x, eps)
    if h.dtype != shift.dtype:  # the out-of-place form promotes; keep its result dtype
        return h * (1 + scale) + shift
    # in place on the fresh norm output: same operations and order, two temporaries fewer
    return h.mul_(1 + scale).add_(shift)


# --------------------------------------------------------------------------- embeddings


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Timestep embedding ``[B, dim]`` float32: ``cat[cos(t w_i), sin(t w_i)]``, computed in
    float64 with ``w_i = 10000^(-i/(dim/2))`` for ``t`` in 0..1000 (official layout)."""
    half = dim // 2
    t64 = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t64[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


class MLPProj(nn.Module):
    """``img_emb``: CLIP tokens ``[B, N, clip_dim]`` -> image context ``[B, N, dim]`` float32.

    LayerNorm -> Linear -> GELU -> Linear -> LayerNorm (eps 1e-5). FLF2V adds the learned
    ``emb_pos`` ``[1, 2*257, clip_dim]`` to the tokens of the first and last frame first.
    """

    def __init__(self, clip_dim: int, dim: int, pos_len: int = 0) -> None:
        super().__init__()
        self.proj = nn.Sequential(FP32LayerNorm(clip_dim), CastLinear(clip_dim, clip_dim), nn.GELU(),
                                  CastLinear(clip_dim, dim), FP32LayerNorm(dim))
        if pos_len:
            self.emb_pos = nn.Parameter(torch.zeros(1, pos_len, clip_dim))

    def forward(self, clip_fea: Tensor, compute_dtype: torch.dtype) -> Tensor:
        x = clip_fea.float()
        if hasattr(self, "emb_pos"):
            x = x + self.emb_pos.float()
        x = self.proj[0](x).to(compute_dtype)
        x = self.proj[3](self.proj[2](self.proj[1](x)))
        return self.proj[4](x)


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockInputs:
    """Per-call tensors every block reads; built once by ``WanDiT.prepare``."""

    e0: Tensor                   # [B, 6, dim] float32 time projection
    e: Tensor                    # [B, dim] float32 time embedding (used by the head)
    context: Tensor              # [B, text_len, dim] compute dtype, embedded text
    context_img: Tensor | None   # [B, N_img, dim] float32 embedded CLIP tokens, i2v/flf2v
    rope: tuple[Tensor, Tensor]  # cos, sin [L, 1, head_dim/2]
    grid: tuple[int, int, int]   # patch grid (F', H', W'), L = F'*H'*W'
    compute_dtype: torch.dtype
    attention_backend: str
    # indices of blocks the executor passes over (Skip Layer Guidance's uncond pass); read by
    # the executors, never by a block, so compiled blocks keep one graph
    skip_blocks: frozenset[int] = frozenset()
    # self-attention op ``(q, k, v, backend) -> out`` over [B, L, H, D]; None = attention.attention.
    # Sequence parallelism (wan_core.distributed) passes one that attends across the ranks.
    self_attention: Callable[[Tensor, Tensor, Tensor, str], Tensor] | None = None
    # cross-attention K/V per block (``CrossAttention`` module -> (k, v, k_img, v_img)), filled by
    # the first call and read by later ones with the same text/image context; None = computed per
    # call. The runner owns it (wan_core.runner.ContextKVCache: one per guidance branch, per run).
    cross_kv: dict[nn.Module, tuple[Tensor, Tensor, Tensor | None, Tensor | None]] | None = None
    # leading tokens that are a Fun V1.1 reference frame (``full_ref``; ``grid`` counts it as one
    # more frame for RoPE), dropped by ``finish``; 0 for every other call
    ref_tokens: int = 0
    # float32 [1, 1, 1, N_text] added to the text logits: log(n) on the last context row when it
    # stands for n equal pad rows (wan_core.text_pad); None = every row is its own key
    text_bias: Tensor | None = None


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, L, heads*D]`` -> ``[B, L, heads, D]`` (a view), the layout ``attention`` takes."""
    return rearrange(x, "b l (h d) -> b l h d", h=heads)


def _merge_heads(x: Tensor) -> Tensor:
    """``[B, L, heads, D]`` (any strides) -> ``[B, L, heads*D]``, heads outermost in features."""
    return rearrange(x, "b l h d -> b l (h d)")


def _rope_fresh(x: Tensor, inp: BlockInputs) -> Tensor:
    """RoPE of a norm output nobody else holds: rotated in place when it already has the table
    dtype and no gradient is recorded (bit-identical to :func:`apply_rope`)."""
    cos, sin = inp.rope
    if x.dtype != cos.dtype or (torch.is_grad_enabled() and x.requires_grad):
        return apply_rope(x, cos, sin)
    return apply_rope_(x, cos, sin)


class SelfAttention(nn.Module):
    """Self-attention over video tokens with qk RMSNorm (full dim) and 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (CastLinear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: Tensor, inp: BlockInputs) -> Tensor:
        """``x`` ``[B, L, dim]`` (any float dtype) -> ``[B, L, dim]`` compute dtype."""
        cd, heads = inp.compute_dtype, self.num_heads
        x = x.to(cd)
        q = _rope_fresh(_split_heads(self.norm_q(self.q(x)), heads), inp).to(cd)
        k = _rope_fresh(_split_heads(self.norm_k(self.k(x)), heads), inp).to(cd)
        v = _split_heads(self.v(x), heads)
        attend = attention if inp.self_attention is None else inp.self_attention
        return self.o(_merge_heads(attend(q, k, v, inp.attention_backend)))


class CrossAttention(nn.Module):
    """Attention from video tokens to the text context (and, for i2v/flf2v, separately to
    the image context through ``k_img``/``v_img``/``norm_k_img``; the two results are summed
    before ``o``). The zero padding of the text is attended, as in the official model: padded,
    or collapsed to one key with ``inp.text_bias`` (:mod:`wan_core.text_pad`)."""

    def __init__(self, dim: int, num_heads: int, eps: float, image: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (CastLinear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        if image:
            self.k_img = CastLinear(dim, dim)
            self.v_img = CastLinear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def context_kv(self, inp: BlockInputs) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """K/V of the text (and image) context ``[B, N, heads, D]`` compute dtype; they depend
        on the context only, so a run computes them once per guidance branch (``inp.cross_kv``)."""
        cd, heads = inp.compute_dtype, self.num_heads
        ctx = inp.context.to(cd)
        k = _split_heads(self.norm_k(self.k(ctx)).to(cd), heads)
        v = _split_heads(self.v(ctx), heads)
        if not hasattr(self, "k_img"):
            return k, v, None, None
        if inp.context_img is None:
            raise ValueError("this DiT is an image-conditioned model (i2v/flf2v) and needs clip_fea")
        img = inp.context_img.to(cd)
        k_img = _split_heads(self.norm_k_img(self.k_img(img)).to(cd), heads)
        return k, v, k_img, _split_heads(self.v_img(img), heads)

    def forward(self, x: Tensor, inp: BlockInputs) -> Tensor:
        """``x`` ``[B, L, dim]`` -> ``[B, L, dim]`` compute dtype."""
        cd, heads = inp.compute_dtype, self.num_heads
        q = _split_heads(self.norm_q(self.q(x.to(cd))).to(cd), heads)
        cache = inp.cross_kv
        kv = None if cache is None else cache.get(self)
        if kv is None:
            kv = self.context_kv(inp)
            if cache is not None:
                cache[self] = kv
        k, v, k_img, v_img = kv
        bias = inp.text_bias
        out = attention(q, k, v, inp.attention_backend) if bias is None else biased_attention(q, k, v, bias)
        if k_img is not None:
            out = out + attention(q, k_img, v_img, inp.attention_backend)
        return self.o(_merge_heads(out))


def _reuse_buffers(x: Tensor) -> bool:
    """Whether a block writes the temporaries it owns in place (residual stream after its first
    add, gated outputs, the FFN hidden): on the CPU, where every fresh buffer over 32 MiB is
    newly mapped memory (glibc), page faults and all (FFN of 1,950 tokens at 1.3B widths: -5 %
    CPU time, bench/dit_profile.py), and only when no gradient is recorded. Bit-identical:
    the same kernels on the same operands. Not on a GPU: the caching allocator reuses memory
    there, and the run plan's activation figures (wan_core.planner, checked by wan_core.memsim)
    are those of the out-of-place form."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def _gated(y: Tensor, gate: Tensor, reuse: bool) -> Tensor:
    """``y * gate`` (float32 ``gate``), in place on the fresh ``y`` when it is float32 too."""
    if reuse and y.dtype == gate.dtype and y.shape == torch.broadcast_shapes(y.shape, gate.shape):
        return y.mul_(gate)
    return y * gate


def _residual(x: Tensor, y: Tensor, reuse: bool) -> Tensor:
    """``x + y`` into ``x`` (a float32 tensor the block made) when ``reuse``; ``y`` may be in the
    compute dtype (promoted inside the add exactly as in ``x + y``)."""
    return x.add_(y) if reuse and x.dtype == torch.promote_types(x.dtype, y.dtype) else x + y


class WanBlock(nn.Module):
    """One DiT block; the residual stream ``x`` ``[B, L, dim]`` is float32 in and out.

    ``x += self_attn(norm1(x)(1+scale1)+shift1)*gate1; x += cross_attn(norm3(x));
    x += ffn(norm2(x)(1+scale2)+shift2)*gate2`` with the six modulation vectors
    ``modulation + e0`` = [shift1, scale1, gate1, shift2, scale2, gate2].
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, image=cfg.has_image_input)
        self.ffn = nn.Sequential(CastLinear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 CastLinear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, inp: BlockInputs) -> Tensor:
        mod = self.modulation.float()
        per_token = inp.e0.dim() == 4
        if not per_token:       # one timestep per sample: [B, 6, dim]
            shift1, scale1, gate1, shift2, scale2, gate2 = (mod + inp.e0).chunk(6, dim=1)
        else:                   # per token (Wan 2.2 TI2V): [B, L, 6, dim] -> [B, L, dim] each, three per
            # phase: the same sums as adding all six at once (bit-identical), 3 float32 [L, dim] fewer live
            shift1, scale1, gate1 = (mod[:, :3] + inp.e0[:, :, :3]).unbind(2)
        cd = inp.compute_dtype
        # Each float32 norm output is cast to the compute dtype here, where it dies at once,
        # instead of inside the callee while this frame still holds it: the same casts in the
        # same order (bit-identical), one float32 [L, dim] fewer in each phase of the block
        # (wan_core.memsim: a 14B step's activations at 480p x 81 went from 4.74 to 3.93 GiB).
        # On the CPU the temporaries this block owns are reused in place (_reuse_buffers).
        reuse = _reuse_buffers(x)
        x = x + _gated(self.self_attn(_modulate(x, shift1, scale1, self.eps).to(cd), inp), gate1, reuse)
        if per_token:
            del shift1, scale1, gate1
        x = _residual(x, self.cross_attn(self.norm3(x).to(cd), inp), reuse)   # x is this block's own now
        if per_token:
            shift2, scale2, gate2 = (mod[:, 3:] + inp.e0[:, :, 3:]).unbind(2)
        return _residual(x, _gated(self._ffn(_modulate(x, shift2, scale2, self.eps).to(cd), reuse), gate2, reuse),
                         reuse)

    def _ffn(self, h: Tensor, reuse: bool) -> Tensor:
        """``ffn(h)``: Linear -> tanh GELU -> Linear; the GELU in place on the fresh hidden
        ``[B, L, ffn_dim]`` when ``reuse`` (the same kernel: bit-identical)."""
        if not reuse:
            return self.ffn(h)
        first, gelu, second = self.ffn
        return second(torch.ops.aten.gelu_(first(h), approximate=gelu.approximate))


class Head(nn.Module):
    """Modulated non-affine LayerNorm + Linear(dim, prod(patch)*out_dim), all float32."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.head = CastLinear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """``x`` ``[B, L, dim]``, ``e`` ``[B, dim]`` (or ``[B, L, dim]`` per token) -> ``[B, L, 64]`` float32."""
        if e.dim() == 2:
            shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        else:   # per-token timesteps (Wan 2.2 TI2V): [1, 1, 2, dim] + [B, L, 1, dim]
            shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(_modulate(x.float(), shift, scale, self.eps))


# --------------------------------------------------------------------------- model


class WanDiT(nn.Module):
    """Wan 2.1 DiT built from a :class:`DiTConfig`.

    Args:
        cfg: architecture (usually inferred from checkpoint shapes).
        compute_dtype: dtype of the attention/FFN/text Linears; None = the storage dtype of
            those weights (see the module docstring).
        attention_backend: one of :data:`wan_core.attention.BACKENDS` ("auto", "sdpa", "sage",
            "flash"); read by every forward (``BlockInputs.attention_backend``).
    """

    precision: ClassVar[PrecisionPolicy] = PRECISION
    checkpoint_report: LoadReport | None   # what the loader read (None when built directly)

    def __init__(self, cfg: DiTConfig, *, compute_dtype: torch.dtype | None = None,
                 attention_backend: str = "sdpa") -> None:
        super().__init__()
        if attention_backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {attention_backend!r}; choose one of {', '.join(BACKENDS)}")
        if cfg.dim % cfg.head_dim or cfg.head_dim % 2:
            raise ValueError(f"DiT dim {cfg.dim} must be a multiple of head_dim {cfg.head_dim} (even)")
        if cfg.model_type == "flf2v" and cfg.image_pos_len <= 0:
            raise ValueError("an flf2v DiT needs image_pos_len > 0 (rows of img_emb.emb_pos, 514 published)")
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.attention_backend = attention_backend
        self.checkpoint_report = None
        self.rope_dtype = ROPE_DTYPE  # settable, e.g. float64 to reproduce the official rounding
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(CastLinear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            CastLinear(dim, dim))
        self.time_embedding = nn.Sequential(CastLinear(cfg.freq_dim, dim), nn.SiLU(), CastLinear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), CastLinear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.has_image_input:
            pos_len = cfg.image_pos_len if cfg.model_type == "flf2v" else 0
            self.img_emb = MLPProj(cfg.clip_dim, dim, pos_len)
        if cfg.ref_in_dim:   # Fun V1.1 Control: the reference latent -> one frame of tokens
            self.ref_conv = nn.Conv2d(cfg.ref_in_dim, dim, kernel_size=cfg.patch_size[1:], stride=cfg.patch_size[1:])

    # -- precision -----------------------------------------------------------------

    def resolved_compute_dtype(self) -> torch.dtype:
        """``compute_dtype`` or, when None, the dtype the Linear weights are stored in (a GGUF
        DiT, whose blocks are quantized: bf16 on CUDA, float32 elsewhere). The text embedding
        gives the device: it stays on the compute device while block swap moves the blocks."""
        blocks = (self.blocks[0].self_attn.q.weight,) if len(self.blocks) else ()
        return self.precision.compute_dtype(self.compute_dtype, self.text_embedding[0].weight, *blocks)

    def cast_storage(self, dtype: torch.dtype) -> WanDiT:
        """Store parameters in ``dtype`` except those of ``FP32_PARAMS`` (kept float32).

        Refuses an fp8-stored model: casting its weights without their ``scale_weight`` would
        change the model (reload with ``load_dit(path, dtype=...)`` instead)."""
        self.precision.cast_storage(self, dtype)
        return self

    # -- forward in three parts ------------------------------------------------------

    def prepare(self, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None = None,
                y: Tensor | None = None, *, rope: RopeOptions | None = None,
                full_ref: Tensor | None = None,
                embedded: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, BlockInputs]:
        """Steps 1-4: tokens ``[B, L, dim]`` float32 and the per-call :class:`BlockInputs`.

        Arguments as in :meth:`forward`, plus ``embedded``: ``(inputs.context,
        inputs.context_img)`` of an earlier call with the same ``context`` / ``clip_fea`` (and
        weights), used instead of steps 3-4 (the text does not change across the steps of a
        run: :class:`wan_core.runner.ContextKVCache` keeps them per guidance branch).
        """
        cfg = self.cfg
        self._check_inputs(x, t, context, clip_fea, y)
        cd = self.resolved_compute_dtype()
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)

        # 1. patch embedding, float32 (see FP32_PARAMS)
        w, b = self.patch_embedding.weight, self.patch_embedding.bias
        tokens = F.conv3d(x.float(), w.float(), b.float(), stride=cfg.patch_size)
        grid = tuple(tokens.shape[2:])
        tokens = rearrange(tokens, "b c f h w -> b (f h w) c").contiguous()

        # 2. time, float32 from a float64 sinusoid
        e = self.time_embedding(sinusoidal_embedding(t.reshape(-1).to(x.device), cfg.freq_dim))
        if t.dim() == 2 and t.shape[1] > 1:   # per-token [B, L] (Wan 2.2 TI2V): e [B, L, dim], e0 [B, L, 6, dim]
            e = e.unflatten(0, tuple(t.shape))
        e0 = self.time_projection(e).unflatten(-1, (6, cfg.dim))

        # 3. text, zero-padded to text_len and attended without a mask (official behaviour; the
        #    pad rows collapsed to one weighted key where wan_core.text_pad does)
        # 4. image tokens
        ctx, ctx_img = embedded if embedded is not None else self._embed_context(context, clip_fea, cd)
        bias = pad_bias(ctx.shape[1], cfg.text_len, ctx.device)

        ref_tokens = 0
        if full_ref is not None:   # Fun V1.1: the reference frame's tokens go first, RoPE frame 0
            tokens, grid = prepend_reference(getattr(self, "ref_conv", None), cfg, tokens, grid, full_ref)
            ref_tokens = grid[1] * grid[2]
        tables = rope_tables(grid, cfg.head_dim, tokens.device, self.rope_dtype, rope)
        inputs = BlockInputs(e0=e0, e=e, context=ctx, context_img=ctx_img, rope=tables, grid=grid,
                             compute_dtype=cd, attention_backend=self.attention_backend, ref_tokens=ref_tokens,
                             text_bias=bias)
        return tokens, inputs

    def _embed_context(self, context: Tensor, clip_fea: Tensor | None,
                       cd: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """Steps 3-4: text ``[B, text_len, dim]`` in ``cd`` (``[B, L + 1, dim]`` with the padding
        collapsed: :mod:`wan_core.text_pad`), CLIP tokens ``[B, N, dim]`` float32 or None."""
        rows = text_rows(context.to(cd), self.cfg.text_len, collapses_padding(cd, context.device))
        ctx = self.text_embedding(rows)
        return ctx, self.img_emb(clip_fea, cd) if clip_fea is not None else None

    def finish(self, x: Tensor, inputs: BlockInputs) -> Tensor:
        """Step 6: tokens ``[B, L, dim]`` -> velocity ``[B, out_dim, F, H, W]`` float32 (the
        reference frame of a Fun V1.1 call dropped first: the head is per token)."""
        if inputs.ref_tokens:
            f, h, w = inputs.grid
            return self.unpatchify(self.head(x[:, inputs.ref_tokens:], inputs.e), (f - 1, h, w))
        return self.unpatchify(self.head(x, inputs.e), inputs.grid)

    def unpatchify(self, out: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Head output ``[B, L, prod(patch)*out_dim]`` (per token, so sequence parallelism runs the
        head on its chunk and gathers this) -> velocity ``[B, out_dim, F, H, W]`` float32."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        # tokens in (f, h, w) order; the 64 features of a token are (pt, ph, pw, c), c fastest
        return rearrange(out, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                         f=f, h=h, w=w, pt=pt, ph=ph, pw=pw).float()

    def forward(self, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None = None,
                y: Tensor | None = None, *, rope: RopeOptions | None = None,
                full_ref: Tensor | None = None) -> Tensor:
        """Predict the flow-matching velocity (noise - x0).

        Args:
            x: noisy latents ``[B, 16, F, H, W]`` (H, W multiples of the patch, i.e. even).
            t: timesteps ``[B]`` (or one value for the batch), float 0..1000.
            context: text embeddings ``[B, L, text_dim]``, ``L <= text_len``: the real tokens
                (zero rows allowed); zero-padded to ``text_len`` here.
            clip_fea: i2v: CLIP penultimate tokens ``[B, 257, clip_dim]``; flf2v: first- and
                last-frame tokens concatenated ``[B, 2*257, clip_dim]``. None for t2v.
            y: i2v/flf2v conditioning ``[B, in_dim-16, F, H, W]`` (mask 4 + VAE latents 16),
                concatenated to ``x`` on channels.
            rope: token positions / RIFLEx (:class:`RopeOptions`); None = the official ones.
            full_ref: Fun V1.1 Control only: the reference image's normalised latent
                ``[B, 16, H, W]`` (VideoX-Fun passes zeros without a reference image; None = no
                reference tokens at all). See :mod:`wan_core.fun`.

        Returns:
            ``[B, out_dim, F, H, W]`` float32.
        """
        tokens, inputs = self.prepare(x, t, context, clip_fea, y, rope=rope, full_ref=full_ref)
        for block in self.blocks:
            tokens = block(tokens, inputs)
        return self.finish(tokens, inputs)

    def _check_inputs(self, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None,
                      y: Tensor | None) -> None:
        cfg = self.cfg
        if x.ndim != 5:
            raise ValueError(f"DiT input x must be [B, C, F, H, W] latents, got shape {tuple(x.shape)}")
        channels = x.shape[1] + (0 if y is None else y.shape[1])
        if channels != cfg.in_dim:
            need = "y (mask + image latents)" if cfg.in_dim > x.shape[1] and y is None else "matching shapes"
            raise ValueError(f"{cfg.variant} takes {cfg.in_dim} input channels, got x {tuple(x.shape)}"
                             f"{'' if y is None else f' + y {tuple(y.shape)}'}; pass {need}")
        if y is not None and (y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]):
            raise ValueError(f"y {tuple(y.shape)} must match x {tuple(x.shape)} except in channels")
        for n, p, axis in zip(x.shape[2:], cfg.patch_size, "FHW"):
            if n % p:
                raise ValueError(f"latent {axis}={n} is not a multiple of the patch size {p}")
        tokens = math.prod(n // p for n, p in zip(x.shape[2:], cfg.patch_size))
        per_token = t.dim() == 2 and t.shape[1] > 1
        if per_token and t.shape != (x.shape[0], tokens):
            raise ValueError(f"per-token timesteps must be [B, {tokens}] (one per patch token), got {tuple(t.shape)}")
        if t.numel() not in (1, x.shape[0]) and not per_token:
            raise ValueError(f"t must hold 1 or B={x.shape[0]} timesteps, or [B, L] per-token ones; "
                             f"got shape {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B={x.shape[0]}, L, {cfg.text_dim}] text embeddings, "
                             f"got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens; the DiT takes at most "
                             f"text_len={cfg.text_len} (trim the text encoder output to its real length)")
        if cfg.has_image_input:
            if clip_fea is None:
                raise ValueError(f"{cfg.variant} is an image-conditioned model: pass clip_fea "
                                 "(CLIP vision tokens) and y")
            want = cfg.image_pos_len if cfg.model_type == "flf2v" else clip_fea.shape[1]
            if clip_fea.ndim != 3 or clip_fea.shape[0] != x.shape[0] or clip_fea.shape[1:] != (want, cfg.clip_dim):
                raise ValueError(f"clip_fea must be [B={x.shape[0]}, {want if cfg.model_type == 'flf2v' else 'N'}, "
                                 f"{cfg.clip_dim}], got {tuple(clip_fea.shape)}")
        elif clip_fea is not None:
            raise ValueError(f"{cfg.variant} has no CLIP image branch (a T2V model, or Wan 2.2) and takes no clip_fea")


__all__ = ["WanDiT", "BlockInputs", "RopeOptions", "RIFLEX_K", "rope_frequencies", "PRECISION", "FP32_PARAMS",
           "ROPE_DTYPE", "keeps_fp32", "rope_tables", "apply_rope", "sinusoidal_embedding", "rope_axis_dims"]
