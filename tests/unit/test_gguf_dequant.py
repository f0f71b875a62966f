"""GGML dequantization in torch: bit for bit the ``gguf`` package's numpy reference.

Reference: ``gguf.quants.dequantize`` (gguf 0.19, the package ComfyUI-GGUF and llama.cpp's
Python tools use). Blocks are random bytes with finite fp16 scale fields (every other field
is a small integer, so any byte pattern is a valid block), plus blocks the package's own
quantizers make from real data where it has one (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from wan_core.layers import linear
from wan_core.quant import (FLOAT_TYPES, FORMATS, QuantEmbedding, QuantLinear, blocks_finite, dequantize,
                            dequantize_rows)

# byte offsets of the fp16 fields per block (scales / minimums), as in ggml's block structs
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
              "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
PACKAGE_QUANTIZERS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
pytestmark = pytest.mark.usefixtures("one_thread")


def random_blocks(qtype: str, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[rows, blocks_per_row * type_size]`` of valid random blocks."""
    fmt = FORMATS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, fmt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def test_formats_match_the_gguf_package_tables() -> None:
    for name, fmt in FORMATS.items():
        assert int(T[name]) == fmt.ggml_type
        assert gguf.GGML_QUANT_SIZES[T[name]] == (fmt.block, fmt.type_size)
    for name, (ggml_id, _) in FLOAT_TYPES.items():
        assert int(T[name]) == ggml_id


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_random_blocks_dequantize_bit_for_bit_like_gguf_numpy(qtype: str) -> None:
    raw = random_blocks(qtype, rows=6, blocks_per_row=3, seed=FORMATS[qtype].ggml_type)
    ref = gguf.quants.dequantize(raw, T[qtype])
    out = dequantize_rows(torch.from_numpy(raw), qtype, ref.shape[-1]).numpy()
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", PACKAGE_QUANTIZERS)
def test_blocks_quantized_by_the_package_dequantize_bit_for_bit(qtype: str) -> None:
    w = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32) / 16
    raw = gguf.quants.quantize(w, T[qtype])
    ref = gguf.quants.dequantize(raw, T[qtype])
    out = dequantize(torch.from_numpy(raw), qtype, (8, 256)).numpy()
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_float_types_read_exactly() -> None:
    w = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    bf16 = gguf.quants.quantize(w, T.BF16)
    ref = gguf.quants.dequantize(bf16, T.BF16)
    ours = torch.from_numpy(bf16.copy()).view(torch.bfloat16).float().numpy()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    f16 = w.astype(np.float16)
    assert np.array_equal(torch.from_numpy(f16).float().numpy(), gguf.quants.dequantize(f16, T.F16))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_lower_precision_output_is_the_float32_value_rounded_once(qtype: str) -> None:
    raw = torch.from_numpy(random_blocks(qtype, 4, 2))
    cols = 2 * FORMATS[qtype].block
    exact = dequantize_rows(raw, qtype, cols)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize_rows(raw, qtype, cols, dtype), exact.to(dtype))


@pytest.mark.parametrize("qtype", ["Q6_K", "Q5_0"])
def test_quant_linear_computes_like_a_linear_holding_the_dequantized_weight(qtype: str) -> None:
    out_f, in_f = 24, 2 * FORMATS[qtype].block
    raw = torch.from_numpy(random_blocks(qtype, out_f, in_f // FORMATS[qtype].block, seed=3))
    layer = QuantLinear(in_f, out_f, qtype)
    layer.weight = torch.nn.Parameter(raw, requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(out_f), requires_grad=False)
    assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (out_f, in_f // FORMATS[qtype].block
                                                                                 * FORMATS[qtype].type_size)
    x = torch.randn(3, 5, in_f)
    w = dequantize(raw, qtype, (out_f, in_f))
    # what a CastLinear holding w computes (wan_core.layers.linear: oneDNN for float32 CPU)
    assert torch.equal(layer(x), linear(x, w, layer.bias))
    xb = x.to(torch.bfloat16)
    assert torch.equal(layer(xb), linear(xb, w.to(torch.bfloat16), layer.bias.to(torch.bfloat16)))


def test_quant_embedding_dequantizes_exactly_the_rows_it_looks_up() -> None:
    raw = torch.from_numpy(random_blocks("Q8_0", 50, 2, seed=4))
    table = QuantEmbedding(50, 64, "Q8_0")
    table.weight = torch.nn.Parameter(raw, requires_grad=False)
    ids = torch.tensor([[3, 0, 49, 3], [7, 7, 1, 2]])
    full = dequantize(raw, "Q8_0", (50, 64))
    assert torch.equal(table(ids), F.embedding(ids, full))


def test_non_finite_scales_are_detected_without_dequantizing() -> None:
    raw = random_blocks("Q4_K", 2, 2)
    assert blocks_finite(torch.from_numpy(raw), "Q4_K")
    raw[1, 144 + 2:144 + 4] = np.array([np.inf], dtype=np.float16).view(np.uint8)   # dmin of block 3
    assert not blocks_finite(torch.from_numpy(raw), "Q4_K")
