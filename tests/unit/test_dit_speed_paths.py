"""The DiT's CPU speed paths change no number.

On the CPU, without gradients, a block writes the temporaries it owns in place (its residual
stream after the first add, the gated outputs, the FFN hidden through an in-place GELU) and
RoPE rotates q / k in place (wan_core.dit._reuse_buffers, wan_core.rope.apply_rope_). These
tests pin that each path gives the out-of-place result bit for bit (the out-of-place form is
what runs with gradients on, and on a GPU), in float32 and bfloat16 compute, for T2V, I2V and
per-token timesteps, and that a block never writes its input.
"""
from __future__ import annotations

import pytest
import torch

import tiny
import wan_core.dit
from wan_core.dit import WanDiT
from wan_core.rope import apply_rope, apply_rope_, rope_tables

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cfg, dtype=None):
    torch.manual_seed(0)
    dit = WanDiT(cfg, compute_dtype=dtype).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.05)
    return dit


def _prepared(dit, per_token: bool = False):
    cfg = dit.cfg
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 7, cfg.text_dim, generator=g)
    clip = y = None
    if cfg.has_image_input:
        clip = torch.randn(1, 257, cfg.clip_dim, generator=g)
        y = torch.randn(1, cfg.in_dim - 16, 2, 4, 6, generator=g)
    t = torch.tensor([[300.0] * 6 + [0.0] * 6]) if per_token else torch.tensor([700.0])
    with torch.no_grad():
        return dit.prepare(x, t, ctx, clip, y)


@pytest.mark.parametrize("cfg, dtype, per_token", [
    (tiny.TINY_DIT_T2V, None, False), (tiny.TINY_DIT_I2V, None, False),
    (tiny.TINY_DIT_T2V, torch.bfloat16, False), (tiny.TINY_DIT_T2V, None, True),
], ids=["t2v-fp32", "i2v-fp32", "t2v-bf16", "per-token-fp32"])
def test_in_place_block_is_bit_identical_to_the_out_of_place_block(cfg, dtype, per_token, monkeypatch):
    dit = _model(cfg, dtype)
    tokens, inputs = _prepared(dit, per_token)
    block = dit.blocks[0]
    before = tokens.clone()
    with torch.no_grad():          # CPU, no gradient: the in-place path
        fast = block(tokens, inputs)
    assert torch.equal(tokens, before), "a block must not write its input"
    # the out-of-place path (gradients on, GPUs), here without gradients so that every Linear
    # takes the same kernel (float32 CPU Linears go to oneDNN only without gradients)
    monkeypatch.setattr(wan_core.dit, "_reuse_buffers", lambda x: False)
    monkeypatch.setattr(wan_core.dit, "apply_rope_", apply_rope)
    with torch.no_grad():
        plain = block(tokens, inputs)
    assert torch.equal(fast, plain)
    assert fast.dtype == plain.dtype == torch.float32


def test_out_of_place_path_still_takes_gradients():
    dit = _model(tiny.TINY_DIT_T2V)
    tokens, inputs = _prepared(dit)
    with torch.enable_grad():
        dit.blocks[0](tokens, inputs).square().mean().backward()
    assert dit.blocks[0].ffn[0].weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_pairwise_rotation_and_keeps_its_input(dtype):
    cos, sin = rope_tables((2, 3, 4), 64, torch.device("cpu"))
    x = torch.randn(1, 24, 4, 64).to(dtype)
    before = x.clone()
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    want = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)   # the formula, unfused
    got = apply_rope(x, cos, sin)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(x, before)
    fresh = x.float()
    assert apply_rope_(fresh, cos, sin) is fresh and torch.equal(fresh, want)
