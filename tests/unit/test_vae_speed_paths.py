"""The VAE's CPU speed path changes no number.

On the CPU without gradients ``wan_core.vae.RMSNorm`` writes its quotient into the buffer of
the squares it summed (one fresh full-size buffer fewer). The out-of-place form runs with
gradients on, and on a GPU; this pins that both give the same tensor bit for bit and that
the norm never writes its input.
"""
from __future__ import annotations

import pytest
import torch

from wan_core.vae import RMSNorm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("images", [False, True], ids=["residual", "attention"])
def test_rms_norm_in_place_path_is_bit_identical_and_keeps_its_input(images):
    torch.manual_seed(0)
    norm = RMSNorm(12, images=images)
    with torch.no_grad():
        norm.gamma.normal_(1.0, 0.2)
    x = torch.randn(1, 12, 3, 5, 7) * 3
    before = x.clone()
    with torch.no_grad():
        fast = norm(x)
    assert torch.equal(x, before), "the norm must not write its input"
    with torch.enable_grad():
        plain = norm(x)
    assert plain.requires_grad
    assert torch.equal(fast, plain.detach())
    plain.sum().backward()
    assert norm.gamma.grad is not None
