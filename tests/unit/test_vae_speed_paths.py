"""The VAE's speed paths change no number, and they are taken.

- On the CPU without gradients ``RMSNorm`` writes its quotient into the buffer of the squares
  it summed (one fresh full-size buffer fewer). The out-of-place form runs with gradients on,
  and on a GPU; both give the same tensor bit for bit and the norm never writes its input.
- There, too, every RMSNorm -> SiLU -> causal conv (residual blocks, heads) writes the
  normalised frames straight into the conv's history buffer behind the cached frames
  (``norm_silu_conv``) instead of concatenating cache and chunk: fewer copies, same numbers
  up to SiLU's rounding (in a strided buffer PyTorch runs the exp of a ragged tail of each
  channel plane through its scalar loop instead of the vector one: 6e-8 per SiLU, 2.3e-6
  after the tiny decoder, measured; a cache bug moves the decode by ~1.5).
- A causal conv given one frame with less than a full history (every stream's first chunk)
  leaves out the kernel taps that would only see zero frames: a third of the work; same
  numbers as the zero-padded conv (checked against ``F.conv3d`` in ``test_vae_cache.py``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import wan_core.vae_layers
from wan_core.vae import ResidualBlock, RMSNorm
from wan_core.vae_layers import CausalConv3d, FeatureCache

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


class _CountOps(TorchDispatchMode):
    """Counts the calls of each aten op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _latents(frames: int = 3) -> torch.Tensor:
    return torch.randn(1, 16, frames, 3, 2, generator=torch.Generator().manual_seed(3))


def test_norm_silu_conv_writes_into_the_history_and_changes_no_number(tiny_vae, monkeypatch):
    z = _latents()
    with _CountOps() as fused_ops:
        fused = tiny_vae.decode(z, normalized=False)
    monkeypatch.setattr(wan_core.vae_layers, "in_place_ok", lambda x: False)   # every layer one by one, allocating
    with _CountOps() as plain_ops:
        plain = tiny_vae.decode(z, normalized=False)
    assert (fused - plain).abs().max() < 1e-5   # SiLU's scalar tail (see the module docstring)
    # residual blocks (2 each) and the head: the causal convs fed by a norm, each of which copies
    # its chunk behind the cached frames in the plain path, in the 2 chunks after the first
    fed = 2 * _residual_blocks(tiny_vae.decoder) + 1
    fused_copies, plain_copies = fused_ops.calls.get("copy_", 0), plain_ops.calls.get("copy_", 0)
    assert plain_copies - fused_copies == 2 * fed, (fused_copies, plain_copies)


def _conv_calls(monkeypatch) -> list[tuple[int, int]]:
    """(input frames, kernel taps) of every conv3d the VAE layers run from now on."""
    calls: list[tuple[int, int]] = []
    real = wan_core.vae_layers.conv3d

    def recording(x, weight, *args, **kwargs):
        calls.append((x.shape[2], weight.shape[2]))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(wan_core.vae_layers, "conv3d", recording)
    return calls


@pytest.mark.parametrize("fused", [True, False], ids=["norm-fed", "plain"])
def test_a_single_frame_without_full_history_skips_the_zero_taps(monkeypatch, fused):
    torch.manual_seed(0)
    norm, conv = RMSNorm(4), CausalConv3d(4, 5, 3, padding=1)
    x = torch.randn(1, 4, 5, 6, 5)
    calls = _conv_calls(monkeypatch)
    cache, out = FeatureCache(), []
    with torch.no_grad():
        for start, stop in ((0, 1), (1, 2), (2, 5)):
            cache.begin_chunk()
            chunk = x[:, :, start:stop]
            out.append(wan_core.vae_layers.norm_silu_conv(norm, conv, chunk, cache) if fused
                       else conv(F.silu(norm(chunk)), cache))
    # frame 0 alone: last tap only; frame 1 with one frame of history: last two taps;
    # then the full kernel over 2 cached + 3 new frames
    assert calls == [(1, 1), (2, 2), (5, 3)]
    with torch.no_grad():
        reference = F.conv3d(F.pad(F.silu(norm(x)), (0, 0, 0, 0, 2, 0)), conv.weight, conv.bias, padding=(0, 1, 1))
    assert (torch.cat(out, dim=2) - reference).abs().max() < 1e-5


def test_decode_convolves_no_zero_frames(tiny_vae, monkeypatch):
    """Whole decode: no causal conv ever gets zero frames for a single-frame chunk (the
    first latent frame, the temporal upsample's first doubled frame)."""
    calls = _conv_calls(monkeypatch)
    tiny_vae.decode(_latents(2), normalized=False)
    padded = [(frames, taps) for frames, taps in calls if taps == 3 and frames < 3]
    assert not padded
    assert sum(1 for frames, taps in calls if taps == 1 and frames == 1) >= 2 * _residual_blocks(tiny_vae.decoder) + 1


def _residual_blocks(net: torch.nn.Module) -> int:
    return sum(isinstance(m, ResidualBlock) for m in net.modules())
