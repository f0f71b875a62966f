"""ViT-H/14 visual tower of open-clip xlm-roberta-large, as Wan 2.1 I2V uses it.

Wan conditions image-to-video on the hidden states after all blocks but the last, without
the post-norm (``use_31_block=True`` upstream, ComfyUI's ``penultimate_hidden_states``):
``[B, 257, 1280]`` for a 224x224 image. Parameter names are the official ``visual.*`` names
with the prefix removed (``cls_embedding``, ``transformer.N.attn.to_qkv.weight``, ...);
``post_norm`` and ``head`` are kept so the official tower loads with ``strict=True``, but
forward never uses them.

Precision policy (data below, ``PRECISION``, a :class:`~wan_core.layers.PrecisionPolicy`,
honoured in forward):
- ``FP32_PARAMS`` (``PRECISION.keep_fp32``): class/position/patch embeddings and the LayerNorms (0.2 % of the
  parameters) are stored float32 whatever the rest is stored in (lossless for fp16 files,
  keeps them out of fp8). The embeddings are used in the compute dtype, as upstream.
- Every other weight may be stored in any float dtype and is cast to the compute dtype at
  the point of use: ``CLIPVisionTower.compute_dtype`` or, when None, the storage dtype of the
  Linear weights (for fp8 storage: bf16 on CUDA, float32 elsewhere). Upstream runs the tower
  under fp16 autocast.
- LayerNorm always runs in float32 and casts back, as the official ``clip.LayerNorm`` does.
- Preprocessing (resize, normalise) runs in float32, as upstream feeds the tower fp32 pixels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .configs import CLIPVisionConfig
from .layers import CastLinear, PrecisionPolicy

if TYPE_CHECKING:
    from .checkpoint import LoadReport

PRECISION = PrecisionPolicy(keep_fp32=("embedding", "norm"))
#: Parameter-name fragments stored in float32 whatever the storage dtype of the rest.
FP32_PARAMS: tuple[str, ...] = PRECISION.keep_fp32
#: Whether parameter ``name`` (official visual-tower name, no prefix) is stored in float32.
keeps_fp32 = PRECISION.keeps_fp32


def _reuse_buffers(x: torch.Tensor) -> bool:
    """Whether a block may write the temporaries it owns in place: on the CPU, where each
    fresh activation buffer is memory the allocator may have to map and fault in again, and
    only when no gradient is recorded (autograd needs the out-of-place values)."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input and storage dtypes; returns input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """Fused-QKV multi-head attention (``to_qkv`` rows are q, k, v in that order)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = CastLinear(width, 3 * width)
        self.proj = CastLinear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, width]`` -> ``[B, N, width]``."""
        q, k, v = rearrange(self.to_qkv(x), "b l (qkv h d) -> qkv b h l d", qkv=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)          # scale 1/sqrt(head_dim)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block; the MLP uses exact (erf) GELU, as ViT-H/14 was trained."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = SelfAttention(cfg.width, cfg.num_heads)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = nn.Sequential(CastLinear(cfg.width, cfg.mlp_dim), nn.GELU(),
                                 CastLinear(cfg.mlp_dim, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, width]`` -> ``[B, N, width]``; never writes ``x``.

        On the CPU without gradients the block reuses the buffers it made itself: the second
        residual add goes into the first one's result and the exact GELU runs in place on the
        fresh MLP hidden ``[B, N, mlp_dim]`` (same kernels on the same operands: bit-identical,
        fewer fresh buffers for the allocator to fault in). With gradients, or on a GPU (whose
        caching allocator reuses memory anyway), the plain out-of-place form runs.
        """
        if not _reuse_buffers(x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x))             # a fresh tensor: the caller's x is kept
        fc1, gelu, fc2 = self.mlp
        hidden = torch.ops.aten.gelu_(fc1(self.norm2(x)), approximate=gelu.approximate)
        return x.add_(fc2(hidden))


class CLIPVisionTower(nn.Module):
    """Pixels ``[B, 3, S, S]`` (already normalised, see ``preprocess``) -> ``[B, N, width]``.

    ``N = (S / patch)^2 + 1`` (class token first). ``compute_dtype`` (settable attribute):
    dtype of the arithmetic; None follows the storage dtype of the Linear weights.
    """

    precision: ClassVar[PrecisionPolicy] = PRECISION
    checkpoint_report: LoadReport | None   # what the loader read (None when built directly)

    def __init__(self, config: CLIPVisionConfig, *, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if config.width % config.head_dim:
            raise ValueError(f"CLIP width {config.width} is not a multiple of head_dim {config.head_dim}.")
        self.config = config
        self.compute_dtype = compute_dtype
        self.checkpoint_report = None
        w, p = config.width, config.patch_size
        scale = w ** -0.5  # the official init; real weights replace it
        self.cls_embedding = nn.Parameter(scale * torch.randn(1, 1, w))
        self.pos_embedding = nn.Parameter(scale * torch.randn(1, config.num_tokens, w))
        self.patch_embedding = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        self.pre_norm = LayerNorm(w, eps=config.eps)
        self.transformer = nn.ModuleList([AttentionBlock(config) for _ in range(config.num_layers)])
        self.post_norm = LayerNorm(w, eps=config.eps)             # unused: Wan skips it
        self.head = nn.Parameter(scale * torch.randn(w, config.out_dim))  # unused: Wan skips it

    def resolved_compute_dtype(self) -> torch.dtype:
        """``compute_dtype`` or, when None, the dtype the Linear weights are stored in."""
        return self.precision.compute_dtype(self.compute_dtype, self.transformer[0].attn.to_qkv.weight)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, S, S]`` normalised with CLIP mean/std -> features ``[B, N, width]``."""
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(f"CLIP vision expects pixels [B, 3, {size}, {size}] (run preprocess first); "
                             f"got {tuple(pixels.shape)}.")
        dtype = self.resolved_compute_dtype()
        x = pixels.to(dtype)
        # 1. patches -> tokens, class token first, learned absolute positions, pre-norm
        x = F.conv2d(x, self.patch_embedding.weight.to(dtype), stride=self.config.patch_size)
        x = x.flatten(2).transpose(1, 2)
        cls = self.cls_embedding.to(dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding.to(dtype)
        x = self.pre_norm(x)
        # 2. every block but the last; no post-norm (Wan's penultimate features)
        for block in self.transformer[:-1]:
            x = block(x)
        return x


def preprocess(images: torch.Tensor, config: CLIPVisionConfig) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in -1..1 -> CLIP input ``[B, 3, S, S]`` float32, S = image_size.

    Exactly the official ``CLIPModel.visual``: bicubic resize of the whole image to S x S
    (no crop, no antialias, align_corners=False, no clamp of the overshoot), map to 0..1,
    then ``(x - mean) / std``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"preprocess expects images [B, 3, H, W] in -1..1; got {tuple(images.shape)}.")
    size = (config.image_size, config.image_size)
    x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(config.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_image(model: CLIPVisionTower, images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in -1..1 -> penultimate CLIP features ``[B, N, width]``.

    Runs on the device of the model's patch embedding, in the model's compute dtype.
    """
    device = model.patch_embedding.weight.device
    return model(preprocess(images.to(device), model.config))


__all__ = ["CLIPVisionTower", "preprocess", "encode_image", "PRECISION", "FP32_PARAMS", "keeps_fp32"]
