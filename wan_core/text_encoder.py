"""umT5-XXL text encoder used by Wan 2.1 to turn prompts into ``[L, 4096]`` context tokens.

The encoder is the T5 v1.1 layout as trained for umT5: RMS norms without bias, attention
without the 1/sqrt(d) scale, a learned bidirectional relative-position bias in *every*
layer (32 buckets, max distance 128), and a gated FFN ``fc2(fc1(x) * gelu_tanh(gate(x)))``.
Parameter names are the official Wan 2.1 ones (``token_embedding.weight``,
``blocks.N.attn.q.weight``, ``blocks.N.pos_embedding.embedding.weight``, ``norm.weight``),
so the official ``models_t5_umt5-xxl-enc-bf16.pth`` loads with ``strict=True``.

Precision policy (data below, ``PRECISION``, a :class:`~wan_core.layers.PrecisionPolicy`,
honoured in forward):
- ``FP32_PARAMS`` (``PRECISION.keep_fp32``): the norm scales and the relative-position tables (< 0.01 % of the
  parameters) are stored float32 whatever the rest is stored in; that is lossless for the
  bf16/fp16 files and keeps them out of fp8. They are used in the compute dtype, as upstream.
- Every other weight (embedding, attention, FFN) may be stored in any float dtype and is cast
  to the compute dtype at the point of use: ``UMT5Encoder.compute_dtype`` or, when None, the
  storage dtype of the Linear weights (for fp8 storage: bf16 on CUDA, float32 elsewhere).
  Upstream computes in bf16; on CPU use float32.
- RMS statistics and the attention softmax are always float32, as upstream.
- In float16 the residual stream is clamped after an overflow, as upstream (``_fp16_clamp``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .configs import T5Config
from .layers import CastLinear, PrecisionPolicy
from .tokenizer import UMT5Tokenizer

if TYPE_CHECKING:
    from .checkpoint import LoadReport

PRECISION = PrecisionPolicy(keep_fp32=("norm", "pos_embedding"))
#: Parameter-name fragments stored in float32 whatever the storage dtype of the rest.
FP32_PARAMS: tuple[str, ...] = PRECISION.keep_fp32
#: Whether parameter ``name`` (official umT5 name) is stored in float32.
keeps_fp32 = PRECISION.keeps_fp32


class TanhGELU(nn.Module):
    """GELU, tanh approximation, written out term by term like the official ``t5.GELU``.

    ``F.gelu(approximate="tanh")`` rounds once; the official code rounds after every term,
    which differs in bf16. umT5 was trained and is run upstream with this form.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class RMSNorm(nn.Module):
    """T5 "LayerNorm": scale only, no mean subtraction, statistics in float32. ``[..., dim]``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * y.to(x.dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """Bidirectional T5 bucket index of every (query, key) pair: ``[length, length]`` int64.

    Half the buckets are for keys after the query. In each half, distances below
    ``num_buckets // 4`` get their own bucket; larger ones share log-spaced buckets up to
    ``max_distance``, beyond which everything lands in the last bucket.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]                    # key position - query position
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    # clamp(min=1) only keeps log() finite; those entries take the exact branch below.
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """Mirror the official ``fp16_clamp``: after an overflow, clamp to +-(fp16 max - 1000).

    Upstream checks ``isinf(x).any()`` on the host; clamping to the full fp16 range when there
    is no inf is a no-op for finite values, so choosing the bound on the device gives the same
    numbers without a GPU sync per layer. bf16 and fp32 are left untouched, as upstream.
    """
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    bound = torch.where(torch.isinf(x).any(), big - 1000.0, big).to(x.dtype)
    return torch.clamp(x, min=-bound, max=bound)


class RelativePositionBias(nn.Module):
    """Learned per-head bias for each relative-position bucket. Table ``(num_buckets, num_heads)``."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``buckets [L, L]`` int64 -> bias ``[1, heads, L, L]``."""
        return F.embedding(buckets, self.embedding.weight).to(dtype).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head self-attention, no bias terms, no logit scaling (T5 folds it into init)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = CastLinear(dim, dim_attn, bias=False)
        self.k = CastLinear(dim, dim_attn, bias=False)
        self.v = CastLinear(dim, dim_attn, bias=False)
        self.o = CastLinear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x [B, L, dim]``, ``bias [B or 1, heads, L, L]`` (position bias + mask) -> ``[B, L, dim]``."""
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=self.num_heads) for proj in (self.q, self.k, self.v))
        # Explicit scores instead of SDPA: the encoder runs once per prompt, and this keeps
        # the official numerics (logits in compute dtype, softmax in float32).
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias
        weights = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        return self.o(rearrange(torch.matmul(weights, v), "b h l d -> b l (h d)"))


class T5FeedForward(nn.Module):
    """Gated FFN: ``fc2(fc1(x) * gelu_tanh(gate(x)))``; ``gate.0`` is the GELU branch (HF ``wi_0``)."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(CastLinear(dim, dim_ffn, bias=False), TanhGELU())
        self.fc1 = CastLinear(dim, dim_ffn, bias=False)
        self.fc2 = CastLinear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    """Pre-norm self-attention + FFN with its own relative-position table (umT5: one per layer)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_is_pad: torch.Tensor | None) -> torch.Tensor:
        """``x [B, L, dim]``; ``buckets [L, L]``; ``key_is_pad [B, 1, 1, L]`` bool or None."""
        bias = self.pos_embedding(buckets, x.dtype)
        if key_is_pad is not None:
            # Official: padded keys get exactly finfo.min (replacing the position bias).
            bias = bias.masked_fill(key_is_pad, torch.finfo(x.dtype).min)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """umT5 encoder stack: token ids ``[B, L]`` -> hidden states ``[B, L, dim]``.

    ``compute_dtype`` (settable attribute): dtype of the arithmetic; None follows the
    storage dtype of the Linear weights (see the module docstring).
    """

    precision: ClassVar[PrecisionPolicy] = PRECISION
    checkpoint_report: LoadReport | None   # what the loader read (None when built directly)

    def __init__(self, config: T5Config, *, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if config.shared_pos:
            raise ValueError("UMT5Encoder implements umT5 (a position table in every layer); "
                             "T5Config.shared_pos=True describes the original T5 layout, which Wan never uses.")
        if config.dim_attn % config.num_heads:
            raise ValueError(f"T5Config.dim_attn={config.dim_attn} is not divisible by num_heads={config.num_heads}.")
        self.config = config
        self.compute_dtype = compute_dtype
        self.checkpoint_report = None
        self.token_embedding = nn.Embedding(config.vocab, config.dim)
        self.blocks = nn.ModuleList([T5Block(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.dim, config.eps)

    def resolved_compute_dtype(self) -> torch.dtype:
        """``compute_dtype`` or, when None, the dtype the Linear weights are stored in."""
        w = self.blocks[0].attn.q.weight if len(self.blocks) else self.token_embedding.weight
        return self.precision.compute_dtype(self.compute_dtype, w)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``ids [B, L]`` int64, ``mask [B, L]`` (1 real token, 0 padding) -> ``[B, L, dim]``.

        Outputs at padded positions are not meaningful (upstream trims them); real-token
        outputs do not depend on how much padding follows.
        """
        dtype = self.resolved_compute_dtype()
        # 1. token embeddings (no scaling, no absolute positions)
        x = self.token_embedding(ids).to(dtype)   # the module: a GGUF table dequantizes only these rows
        # 2. bucket indices are shared by all layers; each layer has its own bias table
        buckets = relative_position_buckets(ids.shape[1], self.config.num_buckets,
                                            self.config.max_distance, device=ids.device)
        key_is_pad = None if mask is None else (mask == 0).view(ids.shape[0], 1, 1, ids.shape[1])
        # 3. blocks, then the final RMS norm
        for block in self.blocks:
            x = block(x, buckets, key_is_pad)
        return self.norm(x)


@torch.no_grad()
def encode_text(model: UMT5Encoder, tokenizer: UMT5Tokenizer, prompts: Sequence[str],
                device: torch.device | str) -> list[torch.Tensor]:
    """Encode prompts the way the official ``T5EncoderModel.__call__`` does.

    Returns one tensor per prompt, ``[L_i, dim]`` on ``device`` in the model's compute dtype,
    trimmed to the real tokens including the closing ``</s>`` (the DiT zero-pads it to 512).
    """
    ids, mask = tokenizer(list(prompts))
    lengths = mask.gt(0).sum(dim=1).tolist()
    # The padding changes no real token's output (masked keys get exactly zero weight;
    # tests/unit/test_text_encoder_parity.py), so it is not computed: each prompt runs alone
    # at its own length (512 -> ~30 tokens for a usual prompt, the cost shrinks about as
    # much), which also keeps a prompt's numbers independent of what it is batched with.
    return [model(row[None, :n].to(device))[0] for row, n in zip(ids, lengths)]


__all__ = ["UMT5Encoder", "encode_text", "relative_position_buckets", "PRECISION", "FP32_PARAMS", "keeps_fp32"]
