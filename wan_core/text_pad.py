"""The text context's zero padding, collapsed to one key in the cross-attention (exact).

The official Wan 2.1 model zero-pads the umT5 output ``[B, L, 4096]`` to ``text_len`` = 512
rows, embeds all of them and attends all 512 keys without a mask. Every pad row is the same
zero vector, so it embeds to the same context row, and all ``n = text_len - L`` pad keys
(``norm_k(W_k c_pad + b_k)``) and values are equal. Softmax attention over
``[L real keys; n equal keys]`` is therefore attention over ``[L real keys; 1 pad key]`` with
``log(n)`` added to the pad key's logit (``exp(s + log n) = n exp(s)``): the same function,
computed with ``text_len - L - 1`` fewer rows in the text embedding, the K/V projections and
the attention (a 32-token prompt: 33 keys instead of 512). Trailing all-zero rows of the
given context are pad rows too (a context padded upstream gives the same rows, bit for bit).

Accuracy against a float64 reference (12 heads x 128, 512 queries, L = 1 .. 300 real keys,
8 seeds, inputs representable in the dtype; max |error| of the attention output):
- float32: padded up to 2.7e-5, collapsed up to 4.4e-6 (one exp instead of n summed).
- bfloat16 / float16 with a float32 bias: padded 2.1e-2 / 2.7e-3, collapsed 1.1e-2 / 1.9e-3
  (mean |error| 1.1e-3 -> 0.86e-3 bf16 at L = 32).
- with the bias in the half dtype (``log(480)`` rounded to the bf16 spacing of 0.03: up to
  1.6 % off in the pad keys' weight) collapsed is the worse one: bf16 at L = 32 mean |error|
  2.0e-3 against 1.1e-3 padded, fp16 2.7e-4 against 1.4e-4.
SDPA's documented contract is a float mask *of the query's dtype*; PyTorch's CPU kernel also
takes a float32 mask with bf16 / fp16 queries (measured above, torch 2.13), a CUDA kernel is
not documented to. Hence :func:`collapses_padding`: float32 / float64 everywhere, half
precision only on the CPU; a half-precision GPU run keeps the padded path (not verified on a
GPU). The collapsed attention runs in SDPA whatever the attention backend (sage / flash take
no additive bias; they are for the long self-attention, this one has ``L + 1`` keys).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor   # loaded by `import torch` already

__all__ = ["collapses_padding", "real_rows", "text_rows", "pad_bias", "biased_attention"]

_FULL = (torch.float32, torch.float64)


def collapses_padding(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the text padding is collapsed for a compute ``dtype`` on ``device``: where the
    collapsed attention is at least as accurate as the padded one (module docstring)."""
    return dtype in _FULL or device.type == "cpu"


def real_rows(context: Tensor) -> int:
    """Rows of ``context`` ``[B, L, C]`` up to its last row that is not all zeros in some sample:
    the trailing zero rows are pad rows already (a context padded upstream collapses too). A
    fake tensor (wan_core.memsim: shapes only) counts all ``L``: the most a real one holds."""
    if isinstance(context, FakeTensor):
        return context.shape[1]
    kept = context.ne(0).any(dim=2).any(dim=0).nonzero()
    return int(kept[-1]) + 1 if kept.numel() else 0


def text_rows(context: Tensor, text_len: int, collapse: bool) -> Tensor:
    """The text rows to embed, ``[B, rows, C]``: ``context`` zero-padded to ``text_len``, or, to
    collapse, its real rows (:func:`real_rows`) plus one zero row standing for all the others
    (none when there are none left)."""
    if not collapse:
        return F.pad(context, (0, 0, 0, text_len - context.shape[1]))
    real = real_rows(context)
    return F.pad(context[:, :real], (0, 0, 0, min(1, text_len - real)))


def pad_bias(rows: int, text_len: int, device: torch.device) -> Tensor | None:
    """Float32 ``[1, 1, 1, rows]`` added to the text logits of an embedded context of ``rows``
    rows: ``log(n)`` on the last row when it stands for ``n = text_len - rows + 1 >= 2`` pad
    rows, 0 elsewhere; None when every key stands for itself (``rows == text_len``)."""
    if rows >= text_len:
        return None
    bias = torch.zeros(1, 1, 1, rows, dtype=torch.float32, device=device)
    bias[..., -1] = math.log(text_len - rows + 1)
    return bias


def biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """Softmax(Q K^T / sqrt(D) + bias) V per head, SDPA; ``q`` ``[B, Lq, H, D]``, ``k``/``v``
    ``[B, Lk, H, D]``, ``bias`` ``[1, 1, 1, Lk]`` float32 -> ``[B, Lq, H, D]`` (a view)."""
    if q.dtype in _FULL or q.device.type != "cpu":   # the documented form: the query's dtype (a no-op in float32)
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2)
