"""WanVAE reproduces diffusers' ``AutoencoderKLWan`` (0.42.1), diffusers' port of the official
Wan 2.1 VAE (``wan/modules/vae.py`` of github.com/Wan-Video/Wan2.1, whose ``Wan2.1_VAE.pth``
loads into it through diffusers' own key conversion), on random official-layout weights, fp32 CPU.

The reference is built from an explicit config (TINY_VAE: dim 8, z 16, mult (1,2,4,4)) and
loaded strictly with ``convert_wan_vae_to_diffusers`` of the same official state dict that
our module loads strictly, so every official key is exercised by both sides.

Measured max abs error (fp32 CPU, torch 2.13, factory weights seed 1234): encode 9 frames
32x48 9.2e-7, 1 frame 0.0; decode 3 latent frames -> 9 frames 2.8e-6, 1 latent frame 7.2e-7
(outputs O(1), ~4% of pixels clamped). The residual is summation order (we run the per-frame
2D convs as (1,3,3) conv3d and the 1x1 attention convs as linear). Tolerance 5e-5: ~18x the
worst measurement; swapping one pair of norm scales moves the output by 0.24 (encoder) and
0.69 (decoder), asserted below to exceed 1000x the tolerance.
"""
from __future__ import annotations

import pytest
import torch

import factory
from tiny import TINY_VAE
from wan_core.configs import VAE_LATENT_MEAN, VAE_LATENT_STD, VAEConfig
from wan_core.vae import WanVAE, normalize_latents

diffusers = pytest.importorskip("diffusers")


TOL = 5e-5
SEED = 1234


def _diffusers_vae(cfg: VAEConfig, official: dict[str, torch.Tensor]):
    ref = diffusers.AutoencoderKLWan(
        base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks, attn_scales=[],
        temperal_downsample=list(cfg.temporal_downsample), dropout=0.0,
        latents_mean=list(VAE_LATENT_MEAN), latents_std=list(VAE_LATENT_STD))
    ref.load_state_dict(factory.vae_to_diffusers(official), strict=True)
    return ref.eval()


def _ours(cfg: VAEConfig, official: dict[str, torch.Tensor]) -> WanVAE:
    with torch.device("meta"):
        model = WanVAE(cfg)
    model.load_state_dict(official, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    return factory.vae_official(TINY_VAE, SEED)


@pytest.fixture(scope="module")
def models(official):
    return _ours(TINY_VAE, official), _diffusers_vae(TINY_VAE, official)


def _video(frames: int, height: int = 32, width: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1


@pytest.mark.parametrize("frames", [9, 1])
def test_encode_matches_diffusers_latent_mode(models, frames):
    ours, ref = models
    video = _video(frames)
    with torch.no_grad():
        expected = ref.encode(video).latent_dist.mode()
    got = ours.encode(video, normalize=False)
    assert got.shape == expected.shape == (1, 16, (frames - 1) // 4 + 1, 4, 6)
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("latent_frames", [3, 1])
def test_decode_matches_diffusers(models, latent_frames):
    ours, ref = models
    g = torch.Generator().manual_seed(latent_frames)
    latents = torch.randn(1, 16, latent_frames, 4, 6, generator=g)
    with torch.no_grad():
        expected = ref.decode(latents).sample
    got = ours.decode(latents, normalized=False)
    assert got.shape == expected.shape == (1, 3, 4 * latent_frames - 3, 32, 48)
    # the comparison is meaningful only if most pixels are not clamped to +-1
    assert (expected.abs() < 1).float().mean() > 0.5
    assert (got - expected).abs().max().item() < TOL


def test_normalized_encode_uses_published_mean_and_std(models):
    ours, ref = models
    video = _video(5, seed=3)
    with torch.no_grad():
        raw = ref.encode(video).latent_dist.mode()
    mean = torch.tensor(VAE_LATENT_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(VAE_LATENT_STD).view(1, 16, 1, 1, 1)
    got = ours.encode(video)
    assert (got - (raw - mean) / std).abs().max().item() < TOL
    assert torch.allclose(normalize_latents(raw), (raw - mean) / std)


def test_decode_of_normalized_latents_matches_diffusers_after_denormalising(models):
    ours, ref = models
    g = torch.Generator().manual_seed(7)
    normalized = torch.randn(1, 16, 2, 4, 6, generator=g)
    mean = torch.tensor(VAE_LATENT_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(VAE_LATENT_STD).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        expected = ref.decode(normalized * std + mean).sample
    assert (ours.decode(normalized) - expected).abs().max().item() < TOL


@pytest.mark.parametrize("first, second", [
    ("encoder.downsamples.4.residual.0.gamma", "encoder.downsamples.4.residual.3.gamma"),
    ("decoder.upsamples.0.residual.3.gamma", "decoder.upsamples.1.residual.3.gamma"),
])
def test_swapped_norm_scales_break_parity(models, official, first, second):
    """A loader that mixes up two same-shaped tensors must be caught by the tolerance."""
    _, ref = models
    assert official[first].shape == official[second].shape
    assert not torch.equal(official[first], official[second])
    wrong = dict(official)
    wrong[first], wrong[second] = official[second], official[first]
    broken = _ours(TINY_VAE, wrong)
    if first.startswith("encoder"):
        video = _video(9)
        with torch.no_grad():
            expected = ref.encode(video).latent_dist.mode()
        err = (broken.encode(video, normalize=False) - expected).abs().max().item()
    else:
        latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            expected = ref.decode(latents).sample
        err = (broken.decode(latents, normalized=False) - expected).abs().max().item()
    assert err > 1000 * TOL, f"swapping {first} and {second} changed the output by only {err}"


def test_full_size_vae_has_the_official_keys_and_parameter_count():
    """The official Wan2.1_VAE.pth (in every Wan-AI/Wan2.1-* repository on Hugging Face) holds 194
    tensors, 126,892,531 parameters: ``WanVAE_`` of the official wan/modules/vae.py with its
    published config (dim 96, z_dim 16, dim_mult (1, 2, 4, 4), temporal downsampling (F, T, T))."""
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    params = dict(model.named_parameters())
    assert len(params) == 194
    assert sum(p.numel() for p in params.values()) == 126_892_531
    assert params["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert params["decoder.upsamples.3.resample.1.weight"].shape == (192, 384, 3, 3)
    assert params["encoder.downsamples.5.time_conv.weight"].shape == (192, 192, 3, 1, 1)
    assert params["encoder.middle.1.norm.gamma"].shape == (384, 1, 1)
    assert params["decoder.middle.0.residual.0.gamma"].shape == (384, 1, 1, 1)
    assert params["conv1.weight"].shape == (32, 32, 1, 1, 1)
    assert params["conv2.weight"].shape == (16, 16, 1, 1, 1)
    assert params["decoder.head.2.weight"].shape == (3, 96, 3, 3, 3)
    assert "decoder.upsamples.11.time_conv.weight" not in params  # 2d upsample


def test_state_dict_keys_equal_diffusers_conversion_source(models, official):
    ours, _ = models
    assert set(ours.state_dict()) == set(official)
