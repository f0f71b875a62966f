"""GGML block quantization (the formats inside GGUF files): formats, torch dequantizers, layers.

A GGML-quantized weight is a sequence of fixed-size blocks along each row: ``block``
consecutive values of a row share one small header (an fp16 scale, sometimes a minimum or
6-bit sub-block scales) and are stored in 2 to 8 bits each. A ``[out, in]`` weight is
therefore a uint8 matrix ``[out, in / block * type_size]``; rows stay independent, so any
subset of rows (an embedding lookup) can be dequantized on its own.

Storage contract (docs/DEVELOPING.md): :class:`QuantLinear` is a
:class:`~wan_core.layers.CastLinear` whose ``weight`` parameter holds those raw block bytes
(uint8 ``[out, row_bytes]``, never trained, ``requires_grad=False``) and whose ``qtype``
names the format; the real weight is ``dequantize(weight, qtype, (out, in))``. It is
dequantized per call on the device the bytes are on (block swap streams the bytes, not the
float weight) and cast to the input's dtype. :class:`QuantEmbedding` is the same for the
umT5 token table, dequantizing only the looked-up rows. Anything that reads or rewrites a
Linear weight as floats must honour this (LoRA: unmerged only; the planner counts bytes).

The dequantizers are vectorized torch ports of the formats as ggml defines them; every one
computes in float32 with the same operations in the same order as the reference numpy
dequantizer of the ``gguf`` package (``gguf.quants.dequantize``), so the float32 result is
bit-identical to it (tests/unit/test_gguf_dequant.py) on any device.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import CastLinear, linear

__all__ = ["QuantFormat", "FORMATS", "FLOAT_TYPES", "dequantize", "dequantize_rows", "blocks_finite", "QuantLinear",
           "QuantEmbedding", "is_quantized", "quantized_param_shapes", "quant_stats"]

QK_K = 256  # super-block size of the K-quants


@dataclass(frozen=True)
class QuantFormat:
    """One GGML block format: ``block`` values are stored in ``type_size`` bytes."""

    name: str          # GGML name: "Q4_K"
    ggml_type: int     # GGML type id as stored in the file (gguf.GGMLQuantizationType)
    block: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of ``cols`` values (``cols`` must be a multiple of ``block``)."""
        return cols // self.block * self.type_size


# Ids and sizes are GGML's (ggml.h, gguf.constants.GGML_QUANT_SIZES).
FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("Q4_0", 2, 32, 18), QuantFormat("Q4_1", 3, 32, 20), QuantFormat("Q5_0", 6, 32, 22),
    QuantFormat("Q5_1", 7, 32, 24), QuantFormat("Q8_0", 8, 32, 34), QuantFormat("Q2_K", 10, QK_K, 84),
    QuantFormat("Q3_K", 11, QK_K, 110), QuantFormat("Q4_K", 12, QK_K, 144), QuantFormat("Q5_K", 13, QK_K, 176),
    QuantFormat("Q6_K", 14, QK_K, 210),
)}
#: Unquantized GGML types read as plain tensors: name -> (GGML id, torch dtype).
FLOAT_TYPES: dict[str, tuple[int, torch.dtype]] = {
    "F32": (0, torch.float32), "F16": (1, torch.float16), "BF16": (30, torch.bfloat16),
}


# --------------------------------------------------------------------------- helpers


def _f16(b: Tensor) -> Tensor:
    """``[n, 2]`` uint8 little-endian fp16 -> ``[n, 1]`` float32 (exact)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """``[n, k]`` bytes -> ``[n, 2k]``: the k low nibbles, then the k high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2).reshape(qs.shape[0], -1)


def _bits(b: Tensor, bits: int = 1) -> Tensor:
    """``[n, k]`` bytes -> ``[n, 8/bits, k]``: field j of every byte (shift ``j * bits``)."""
    shifts = torch.arange(0, 8, bits, device=b.device, dtype=torch.uint8).view(1, -1, 1)
    return (b.unsqueeze(1) >> shifts) & ((1 << bits) - 1)


def _u32_bits(b: Tensor) -> Tensor:
    """``[n, 4]`` bytes of a little-endian uint32 -> its 32 bits ``[n, 32]`` (bit 0 first)."""
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 1, 8)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(b.shape[0], 32)


def _k_scale_min(s: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K): two ``[n, 8]`` uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


# --------------------------------------------------------------------------- block kernels
# Each takes uint8 blocks [n, type_size] and returns float32 [n, block]. The integer work is
# done on bytes; the one full-size float32 tensor is then scaled in place (the same IEEE
# operations as the reference: (d * q) - m is (q * d) - m, exact integer offsets commute),
# which keeps the temporaries to one float32 copy of the weight.


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b[:, :2]))


def _q4_0(b: Tensor) -> Tensor:
    return _nibbles(b[:, 2:]).float().sub_(8).mul_(_f16(b[:, :2]))


def _q4_1(b: Tensor) -> Tensor:
    return _nibbles(b[:, 4:]).float().mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q5(qh: Tensor, qs: Tensor) -> Tensor:
    return _nibbles(qs) | (_u32_bits(qh) << 4)


def _q5_0(b: Tensor) -> Tensor:
    return _q5(b[:, 2:6], b[:, 6:]).float().sub_(16).mul_(_f16(b[:, :2]))


def _q5_1(b: Tensor) -> Tensor:
    return _q5(b[:, 4:8], b[:, 8:]).float().mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    # two halves of 32 bytes, each byte holding 4 values at shifts 0, 2, 4, 6
    q = _bits(qs.reshape(n * 2, 32), 2).reshape(n, 16, 16).float()
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, s, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = torch.cat((s[:, :8] & 0x0F, s[:, :8] >> 4), dim=-1)              # [n, 16]
    high = _bits(s[:, 8:12], 2).reshape(n, 16)                             # shifts 0,2,4,6 of 4 bytes
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).view(n, 16, 1)
    ql = _bits(qs.reshape(n * 2, 32), 2).reshape(n, 16, 16)
    qh = _bits(hmask, 1).reshape(n, 16, 16) ^ 1                            # offset 4 applies when the bit is 0
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return q.mul_(dl).reshape(n, QK_K)


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).view(n, 8, 1)
    # 4 chunks of 32 bytes; each chunk holds sub-block 2c in its low and 2c+1 in its high nibbles
    q = _bits(b[:, 16:].reshape(n * 4, 32), 4).reshape(n, 8, 32).float()
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).view(n, 8, 1)
    ql = _bits(b[:, 48:].reshape(n * 4, 32), 4).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 1).reshape(n, 8, 32)                           # bit j of byte i: sub-block j
    q = (ql | (qh << 4)).float()
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh, s, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * s.contiguous().view(torch.int8).float()).view(n, 16, 1)
    low = _bits(ql.reshape(n * 2, 64), 4).reshape(n, 8, 32)
    high = _bits(qh.reshape(n * 2, 32), 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(n, 16, 16)
    return q.mul_(d).reshape(n, QK_K)


_KERNELS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


# Byte offsets of the fp16 fields of each block (scales, minimums). Every other field is a
# small integer, so a block dequantizes to finite values exactly when these are finite.
_F16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


def blocks_finite(data: Tensor, qtype: str) -> bool:
    """Whether raw blocks (any shape ending in whole blocks) dequantize without NaN/Inf;
    reads only the fp16 fields, not the values."""
    blocks = data.reshape(-1, FORMATS[qtype].type_size)
    return all(bool(torch.isfinite(_f16(blocks[:, o:o + 2])).all()) for o in _F16_FIELDS[qtype])


def dequantize_rows(data: Tensor, qtype: str, cols: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows of raw blocks ``[..., row_bytes]`` uint8 -> ``[..., cols]`` in ``dtype``.

    Computed in float32 on ``data``'s device, one rounding to ``dtype`` at the end.
    """
    fmt = FORMATS[qtype]
    lead = data.shape[:-1]
    blocks = data.reshape(-1, fmt.type_size)
    out = _KERNELS[qtype](blocks).reshape(*lead, cols)
    return out if dtype == torch.float32 else out.to(dtype)


def dequantize(data: Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Raw blocks of a tensor of (torch-order) ``shape`` -> that tensor in ``dtype``."""
    return dequantize_rows(data, qtype, shape[-1], dtype).reshape(shape)


# --------------------------------------------------------------------------- layers


def _raw_rows(qtype: str, rows: int, row_len: int, what: str, device) -> nn.Parameter:
    """The empty uint8 parameter of ``rows`` rows of ``row_len`` values stored as ``qtype``
    blocks: ``[rows, row_len / block * type_size]``; ``what`` names ``row_len`` in the error."""
    fmt = FORMATS[qtype]
    if row_len % fmt.block:
        raise ValueError(f"{qtype} needs rows that are a multiple of {fmt.block}; got {what}={row_len}")
    return nn.Parameter(torch.empty(rows, fmt.row_bytes(row_len), dtype=torch.uint8, device=device),
                        requires_grad=False)


class QuantLinear(CastLinear):
    """Linear whose weight stays GGML-quantized: raw blocks dequantized at every call.

    ``weight``: uint8 ``[out_features, in_features / block * type_size]``; ``bias``: any
    float dtype ``[out_features]`` or None; ``qtype``: the :data:`FORMATS` key. The layer
    computes in the input's dtype, like every CastLinear; the float weight exists only for
    the duration of the call (one ``[out, in]`` float32 temporary plus its cast).
    """

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = True,
                 device: torch.device | str | None = None) -> None:
        nn.Module.__init__(self)    # not nn.Linear's: it would allocate a float weight
        weight = _raw_rows(qtype, out_features, in_features, "in_features", device)
        self.in_features = in_features
        self.out_features = out_features
        self.qtype = qtype
        self.weight = weight
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        w = dequantize(self.weight, self.qtype, (self.out_features, self.in_features), x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, w, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, " \
               f"bias={self.bias is not None}"


class QuantEmbedding(nn.Embedding):
    """Embedding table stored GGML-quantized; a lookup dequantizes only the rows it reads.

    ``weight``: uint8 ``[num_embeddings, embedding_dim / block * type_size]``. ``forward(ids)``
    -> ``[*ids.shape, embedding_dim]`` float32 (exactly the dequantized rows).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str,
                 device: torch.device | str | None = None) -> None:
        nn.Module.__init__(self)
        weight = _raw_rows(qtype, num_embeddings, embedding_dim, "dim", device)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        self.qtype = qtype
        self.weight = weight

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.weight.index_select(0, ids.reshape(-1))
        out = dequantize_rows(rows, self.qtype, self.embedding_dim)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` (or any submodule) holds GGML-quantized weights."""
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in module.modules())


def quantized_param_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Real (dequantized) shape of every quantized ``weight`` of ``model``, by parameter name;
    for code that matches tensors by shape (LoRA), since the stored bytes have another shape."""
    out: dict[str, torch.Size] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[f"{name}.weight" if name else "weight"] = torch.Size((m.out_features, m.in_features))
        elif isinstance(m, QuantEmbedding):
            out[f"{name}.weight" if name else "weight"] = torch.Size((m.num_embeddings, m.embedding_dim))
    return out


def quant_stats(model: nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s parameters by storage: each GGML format, then "other"."""
    out: dict[str, int] = {}
    quantized = {id(m.weight): m.qtype for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    for p in model.parameters():
        key = quantized.get(id(p), "other")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out
