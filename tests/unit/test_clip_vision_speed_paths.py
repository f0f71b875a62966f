"""The CLIP tower's CPU speed path changes no number.

On the CPU without gradients an ``AttentionBlock`` adds its second residual into the first
one's result and runs the exact GELU in place on its fresh MLP hidden
(``wan_core.clip_vision._reuse_buffers``). The out-of-place form is what runs with gradients
on, and on a GPU; these tests pin that both give the same tensor bit for bit (float32 and
bfloat16 compute) and that a block never writes its input.
"""
from __future__ import annotations

import pytest
import torch

import wan_core.clip_vision
from tiny import TINY_CLIP
from wan_core.clip_vision import CLIPVisionTower

pytestmark = pytest.mark.usefixtures("one_thread")


def _tower(dtype=None) -> CLIPVisionTower:
    torch.manual_seed(0)
    model = CLIPVisionTower(TINY_CLIP, compute_dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _out_of_place(monkeypatch) -> None:
    """From now on the blocks take the out-of-place path (what runs with gradients on, and on
    a GPU), still without gradients so that every Linear takes the same kernel (float32 CPU
    Linears go to oneDNN only without gradients)."""
    monkeypatch.setattr(wan_core.clip_vision, "_reuse_buffers", lambda x: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_in_place_block_is_bit_identical_to_the_out_of_place_block_and_keeps_its_input(dtype, monkeypatch):
    block = _tower(dtype).transformer[0]
    x = torch.randn(2, TINY_CLIP.num_tokens, TINY_CLIP.width, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = x.clone()
    with torch.no_grad():          # CPU, no gradient: the in-place path
        fast = block(x)
    assert torch.equal(x, before), "a block must not write its input"
    _out_of_place(monkeypatch)
    with torch.no_grad():
        plain = block(x)
    assert torch.equal(fast, plain)
    assert fast.dtype == dtype


def test_whole_tower_is_bit_identical_in_place_and_out_of_place_and_keeps_its_pixels(monkeypatch):
    model = _tower()
    pixels = torch.randn(1, 3, TINY_CLIP.image_size, TINY_CLIP.image_size, generator=torch.Generator().manual_seed(2))
    before = pixels.clone()
    with torch.no_grad():
        fast = model(pixels)
    _out_of_place(monkeypatch)
    with torch.no_grad():
        plain = model(pixels)
    assert torch.equal(pixels, before)
    assert torch.equal(fast, plain)


def test_out_of_place_path_still_takes_gradients():
    model = _tower()
    pixels = torch.randn(1, 3, TINY_CLIP.image_size, TINY_CLIP.image_size)
    with torch.enable_grad():
        model(pixels).square().mean().backward()
    assert model.transformer[0].mlp[0].weight.grad is not None
