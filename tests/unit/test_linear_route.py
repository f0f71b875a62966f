"""``wan_core.layers.linear``: float32 CPU Linears that record no gradient run on oneDNN's matmul
(faster than MKL's sgemm at the DiT's shapes, ``bench/bench_networks.py``), everything else on
``F.linear``; both compute the same product up to float summation order.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import wan_core.layers
from wan_core.layers import CastLinear, linear

pytestmark = pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and wan_core.layers._X86),
                                reason="the oneDNN route is taken on x86-64 CPUs with a oneDNN-enabled torch")


def _operands(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 96, generator=g).to(dtype)
    w = (torch.randn(80, 96, generator=g) * 0.1).to(dtype)
    b = torch.randn(80, generator=g).to(dtype)
    return x, w, b


def _count_onednn(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise

    class _Ops:   # torch.ops.mkldnn stand-in that counts the calls
        @staticmethod
        def _linear_pointwise(*args):
            calls.append(1)
            return real(*args)

    monkeypatch.setattr(torch.ops, "mkldnn", _Ops)
    return calls


def test_float32_cpu_without_gradients_takes_onednn_and_equals_f_linear(monkeypatch):
    x, w, b = _operands()
    reference = F.linear(x, w, b)
    calls = _count_onednn(monkeypatch)
    with torch.no_grad():
        got = linear(x, w, b)
        no_bias = linear(x[:, ::2], w)            # strided input, no bias
    assert len(calls) == 2
    assert (got - reference).abs().max() < 1e-5
    assert (no_bias - F.linear(x[:, ::2], w)).abs().max() < 1e-5


def test_gradients_and_other_dtypes_keep_f_linear(monkeypatch):
    x, w, b = _operands()
    calls = _count_onednn(monkeypatch)
    w.requires_grad_(True)
    y = linear(x, w, b)                            # gradients on
    y.square().sum().backward()
    assert w.grad is not None and torch.equal(y.detach(), F.linear(x, w.detach(), b))
    xb, wb, bb = _operands(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(linear(xb, wb, bb), F.linear(xb, wb, bb))
    assert calls == []


def test_cast_linear_goes_through_the_route(monkeypatch):
    layer = CastLinear(96, 80)
    calls = _count_onednn(monkeypatch)
    with torch.no_grad():
        layer(_operands()[0])
    assert len(calls) == 1
