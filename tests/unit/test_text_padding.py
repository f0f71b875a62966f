"""The text padding collapsed to one weighted key in the cross-attention (wan_core.text_pad).

Attention over [L real keys; n equal pad keys] equals attention over [L real keys; 1 pad key]
with log(n) added to its logit. These tests pin that the collapsed path computes the padded
model's numbers within float32 rounding (and closer to a float64 reference than the padded
one), for several prompt lengths including none and a full 512, that it would fail without
the log(n), which dtype / device takes it, and that the embedded context holds L + 1 rows.
"""
from __future__ import annotations

import pytest
import torch

import tiny
import wan_core.dit as dit_mod
from wan_core.attention import attention
from wan_core.dit import WanDiT
from wan_core.text_pad import biased_attention, collapses_padding, pad_bias, real_rows, text_rows

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = tiny.TINY_DIT_T2V   # text_len 512
LENGTHS = (0, 1, 7, 200, 511, 512)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    dit = WanDiT(CFG).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.05)
    return dit


def _inputs(length: int):
    g = torch.Generator().manual_seed(1 + length)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    return x, torch.tensor([500.0]), torch.randn(1, length, CFG.text_dim, generator=g)


def _padded(monkeypatch, model, *args):
    """The official form: every pad row embedded and attended."""
    with monkeypatch.context() as m:
        m.setattr(dit_mod, "collapses_padding", lambda dtype, device: False)
        return model(*args)


@pytest.mark.parametrize("length", LENGTHS)
@torch.no_grad()
def test_collapsed_model_equals_the_padded_one_within_float32_rounding(model, monkeypatch, length):
    args = _inputs(length)
    collapsed, padded = model(*args), _padded(monkeypatch, model, *args)
    # measured max |diff| (outputs ~3): 1.0e-6 / 1.2e-6 / 9.5e-7 / 7.2e-7 for L = 0 / 1 / 7 / 200;
    # 0 for L = 511 (log 1 = 0) and 512 (nothing to collapse)
    assert (collapsed - padded).abs().max().item() <= 5e-6
    if length >= CFG.text_len - 1:
        assert torch.equal(collapsed, padded)


@pytest.mark.parametrize("length", (1, 7, 200))
@torch.no_grad()
def test_without_the_log_n_the_collapsed_model_would_differ(model, monkeypatch, length):
    args = _inputs(length)
    padded = _padded(monkeypatch, model, *args)
    with monkeypatch.context() as m:
        m.setattr(dit_mod, "pad_bias", lambda rows, text_len, device: None)
        unweighted = model(*args)
    # measured: 0.49 / 0.33 / 0.15 for L = 1 / 7 / 200
    assert (unweighted - padded).abs().max().item() > 0.05


@pytest.mark.parametrize("length", (1, 7, 200, 511, 512))
def test_collapsed_attention_is_closer_to_float64_than_the_padded_one(length):
    g = torch.Generator().manual_seed(length)
    n, heads, dim, text_len = 48, 4, 64, 512
    q = torch.randn(2, n, heads, dim, generator=g)
    k_real = torch.randn(2, length, heads, dim, generator=g) * 2
    v_real = torch.randn(2, length, heads, dim, generator=g)
    k_pad, v_pad = torch.randn(2, 1, heads, dim, generator=g) * 2, torch.randn(2, 1, heads, dim, generator=g)
    pad = text_len - length
    k = torch.cat([k_real, k_pad.expand(2, pad, heads, dim)], 1)
    v = torch.cat([v_real, v_pad.expand(2, pad, heads, dim)], 1)
    reference = attention(q.double(), k.double(), v.double(), "sdpa")
    padded = attention(q, k, v, "sdpa")
    rows = min(text_len, length + 1)
    k1, v1 = torch.cat([k_real, k_pad], 1)[:, :rows], torch.cat([v_real, v_pad], 1)[:, :rows]
    bias = pad_bias(rows, text_len, q.device)
    assert (bias is None) == (pad <= 1)
    collapsed = attention(q, k1, v1, "sdpa") if bias is None else biased_attention(q, k1, v1, bias)
    err_padded = (padded.double() - reference).abs().max().item()
    err_collapsed = (collapsed.double() - reference).abs().max().item()
    # measured: padded 1.4e-5 / 1.5e-5 / 4.7e-6 / 1.4e-6 / 1.9e-6, collapsed 6.2e-7 / 8.3e-7 / 2.3e-6 /
    # 1.4e-6 / 1.9e-6 for L = 1 / 7 / 200 / 511 / 512; collapsed - padded 1.5e-5 at most; without
    # log(n) 4.2 / 4.4 / 2.8
    assert err_collapsed <= err_padded + 1e-7
    assert (collapsed - padded).abs().max().item() <= 3e-5
    if bias is not None:
        assert (attention(q, k1, v1, "sdpa") - padded).abs().max().item() > 0.1   # log(n) omitted


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_precision_on_the_cpu_takes_a_float32_bias_and_is_no_less_accurate(dtype):
    g = torch.Generator().manual_seed(3)
    heads, dim, length, text_len = 4, 64, 32, 512
    q, k_real, v_real = (torch.randn(1, m, heads, dim, generator=g).to(dtype) for m in (256, length, length))
    k_pad, v_pad = (torch.randn(1, 1, heads, dim, generator=g).to(dtype) for _ in range(2))
    k = torch.cat([k_real, k_pad.expand(1, text_len - length, heads, dim)], 1)
    v = torch.cat([v_real, v_pad.expand(1, text_len - length, heads, dim)], 1)
    reference = attention(q.double(), k.double(), v.double(), "sdpa")
    padded = attention(q, k, v, "sdpa").double()
    collapsed = biased_attention(q, k[:, :length + 1], v[:, :length + 1], pad_bias(length + 1, text_len, q.device))
    assert collapsed.dtype == dtype
    # measured mean |error|: bf16 1.30e-3 padded, 0.98e-3 collapsed; fp16 1.65e-4, 1.22e-4
    assert (collapsed.double() - reference).abs().mean() <= (padded - reference).abs().mean()


def test_the_padding_collapses_in_full_precision_anywhere_and_in_half_only_on_the_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert collapses_padding(torch.float32, gpu) and collapses_padding(torch.float32, cpu)
    assert collapses_padding(torch.bfloat16, cpu) and collapses_padding(torch.float16, cpu)
    assert not collapses_padding(torch.bfloat16, gpu) and not collapses_padding(torch.float16, gpu)


def test_text_rows_keep_the_real_rows_and_one_pad_row():
    context = torch.randn(2, 9, 4)
    context[:, 6:] = 0                  # padded upstream: trailing zero rows are pad rows
    context[1, 5] = 0                   # a zero row inside one sample only stays
    assert real_rows(context) == 6 and real_rows(torch.zeros(1, 3, 4)) == 0
    rows = text_rows(context, 512, collapse=True)
    assert rows.shape == (2, 7, 4) and torch.equal(rows[:, :6], context[:, :6]) and not rows[:, 6].any()
    assert text_rows(context, 512, collapse=False).shape == (2, 512, 4)
    assert text_rows(torch.randn(1, 512, 4), 512, collapse=True).shape == (1, 512, 4)
    bias = pad_bias(7, 512, torch.device("cpu"))
    assert bias.shape == (1, 1, 1, 7) and bias.dtype == torch.float32
    assert bias[..., -1].item() == pytest.approx(torch.tensor(506.0).log().item()) and not bias[..., :-1].any()


@torch.no_grad()
def test_embedded_context_holds_the_real_rows_plus_one_and_the_bias(model, monkeypatch):
    x, t, context = _inputs(7)
    _, inputs = model.prepare(x, t, context)
    assert inputs.context.shape[1] == 8 and inputs.text_bias.shape == (1, 1, 1, 8)
    upstream = torch.nn.functional.pad(context, (0, 0, 0, 505))     # the same prompt padded upstream
    assert torch.equal(model(x, t, upstream), model(x, t, context))
    with monkeypatch.context() as m:
        m.setattr(dit_mod, "collapses_padding", lambda dtype, device: False)
        _, padded = model.prepare(x, t, context)
    assert padded.context.shape[1] == CFG.text_len and padded.text_bias is None
