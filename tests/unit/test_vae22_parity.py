"""WanVAE22 (the Wan 2.2 / TI2V-5B VAE) reproduces diffusers' ``AutoencoderKLWan`` (0.42.1) in
its Wan 2.2 configuration (``is_residual=True, patch_size=2, z_dim=48``), on random
official-layout weights (tests/wan22_factory.py), fp32 CPU.

Both sides load the same tensors strictly: ours under the official names, diffusers' under
``wan22_factory.vae22_to_diffusers`` names, so every official key is exercised.

Measured max abs error (fp32 CPU, torch 2.13, seed 1): encode 9 frames 32x48 1.2e-6 (latents
O(1)); decode 3 latent frames -> 9 frames 3.8e-6 (94% of pixels unclamped). Tolerance 5e-5,
>10x the worst measurement; swapping two same-shaped norm scales moves the outputs by more
than 1000x the tolerance (asserted below).
"""
from __future__ import annotations

import pytest
import torch

import wan22_factory as f22
from wan_core.vae import FeatureCache
from wan_core.vae22 import (VAE22_LATENT_MEAN, VAE22_LATENT_STD, VAE22Config, WanVAE22, patchify,
                            unpatchify)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 5e-5
SEED = 1
CFG = f22.TINY_VAE22


def _ours(official: dict[str, torch.Tensor]) -> WanVAE22:
    with torch.device("meta"):
        model = WanVAE22(CFG)
    model.load_state_dict(official, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def official():
    return f22.vae22_official(CFG, SEED)


@pytest.fixture(scope="module")
def models(official):
    return _ours(official), f22.diffusers_vae22(CFG, official)


def _video(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, 32, 48, generator=g) * 2 - 1


def _latents(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 48, frames, 2, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def encoded(models):
    ours, ref = models
    video = _video(9)
    with torch.no_grad():
        expected = ref.encode(video).latent_dist.mode()
    return video, expected, ours.encode(video, normalize=False)


@pytest.fixture(scope="module")
def decoded(models):
    ours, ref = models
    z = _latents(3, seed=3)
    with torch.no_grad():
        expected = ref.decode(z).sample
    return z, expected, ours.decode(z, normalized=False)


def test_encode_matches_diffusers(encoded):
    _video_, expected, got = encoded
    assert got.shape == expected.shape == (1, 48, 3, 2, 3)
    assert (got - expected).abs().max().item() < TOL


def test_encode_single_frame_matches_diffusers(models):
    ours, ref = models
    image = _video(1, seed=5)
    with torch.no_grad():
        expected = ref.encode(image).latent_dist.mode()
    assert (ours.encode(image, normalize=False) - expected).abs().max().item() < TOL


def test_decode_matches_diffusers(decoded):
    _z, expected, got = decoded
    assert got.shape == expected.shape == (1, 3, 9, 32, 48)
    assert (expected.abs() < 1).float().mean() > 0.5   # meaningful only if most pixels are unclamped
    assert (got - expected).abs().max().item() < TOL


def test_normalisation_uses_the_published_48_values(models, encoded):
    ours, _ = models
    video, raw, _ = encoded
    mean = torch.tensor(VAE22_LATENT_MEAN).view(1, 48, 1, 1, 1)
    std = torch.tensor(VAE22_LATENT_STD).view(1, 48, 1, 1, 1)
    assert len(VAE22_LATENT_MEAN) == len(VAE22_LATENT_STD) == 48
    assert (ours.encode(video) - (raw - mean) / std).abs().max().item() < TOL
    normalized = (_latents(2, seed=9) - mean) / std
    with torch.no_grad():
        expected = models[1].decode(normalized * std + mean).sample
    assert (ours.decode(normalized) - expected).abs().max().item() < TOL


def test_encode_in_larger_chunks_equals_one_pass_without_cache(models, encoded):
    """Causality: chunks of 1, 4, 4 (official), 1, 8 and one uncached pass agree."""
    ours, _ = models
    video, _, chunked = encoded
    with torch.no_grad():
        whole = ours.conv1(ours.encoder(patchify(video))).chunk(2, dim=1)[0]
    assert (ours.encode(video, normalize=False, chunk_frames=8) - chunked).abs().max().item() < 1e-5
    assert (whole - chunked).abs().max().item() < 1e-5


def test_decode_in_chunks_equals_one_pass_without_cache(models, decoded):
    ours, _ = models
    z, _, per_frame = decoded
    with torch.no_grad():
        whole = unpatchify(ours.decoder(ours.conv2(z))).clamp(-1, 1)
        two = torch.cat(list(ours.iter_decode(z, normalized=False, latent_frames_per_chunk=2)), dim=2)
    assert whole.shape == per_frame.shape
    assert (whole - per_frame).abs().max().item() < 1e-5
    assert (two - per_frame).abs().max().item() < 1e-5


def test_streamed_decode_matches_a_fresh_cache_per_stream(models):
    ours, _ = models
    z = _latents(2, seed=4)
    cache = FeatureCache()
    first = ours.decode_chunk(z[:, :, :1], cache)
    second = ours.decode_chunk(z[:, :, 1:], cache)
    assert first.shape[2] == 1 and second.shape[2] == 4


@pytest.mark.parametrize("first, second", [
    ("encoder.downsamples.1.downsamples.1.residual.0.gamma", "encoder.downsamples.1.downsamples.1.residual.3.gamma"),
    ("decoder.upsamples.1.upsamples.0.residual.3.gamma", "decoder.upsamples.1.upsamples.1.residual.3.gamma"),
])
def test_swapped_norm_scales_break_parity(official, encoded, decoded, first, second):
    """A loader that mixes up two same-shaped tensors must be caught by the tolerance."""
    assert official[first].shape == official[second].shape
    wrong = dict(official)
    wrong[first], wrong[second] = official[second], official[first]
    broken = _ours(wrong)
    if first.startswith("encoder"):
        video, expected, _ = encoded
        err = (broken.encode(video, normalize=False) - expected).abs().max().item()
    else:
        z, expected, _ = decoded
        err = (broken.decode(z, normalized=False) - expected).abs().max().item()
    assert err > 1000 * TOL, f"swapping {first} and {second} changed the output by only {err}"


def test_patchify_is_the_official_channel_order():
    """Official: ``b c f (h q) (w r) -> b (c r q) f h w``."""
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(1, 2, 1, 4, 6)
    p = patchify(x)
    assert p.shape == (1, 8, 1, 2, 3)
    c, r, q, h, w = 1, 1, 0, 1, 2
    assert p[0, c * 4 + r * 2 + q, 0, h, w] == x[0, c, 0, 2 * h + q, 2 * w + r]
    assert torch.equal(unpatchify(p), x)


def test_full_size_vae_builds_on_meta_with_official_names_and_no_buffers():
    with torch.device("meta"):
        model = WanVAE22(VAE22Config())
    params = dict(model.named_parameters())
    assert list(model.buffers()) == []
    assert model.config.stride == (4, 16, 16) and model.config.variant == "Wan2.2-VAE"
    assert params["encoder.conv1.weight"].shape == (160, 12, 3, 3, 3)
    assert params["decoder.head.2.weight"].shape == (12, 256, 3, 3, 3)
    assert params["conv1.weight"].shape == (96, 96, 1, 1, 1)
    assert params["conv2.weight"].shape == (48, 48, 1, 1, 1)
    assert params["decoder.conv1.weight"].shape == (1024, 48, 3, 3, 3)
    assert params["encoder.downsamples.1.downsamples.2.time_conv.weight"].shape == (320, 320, 3, 1, 1)
    assert params["decoder.upsamples.0.upsamples.3.time_conv.weight"].shape == (2048, 1024, 3, 1, 1)
    assert params["decoder.upsamples.0.upsamples.3.resample.1.weight"].shape == (1024, 1024, 3, 3)
    assert params["decoder.upsamples.2.upsamples.3.resample.1.weight"].shape == (512, 512, 3, 3)
    assert "decoder.upsamples.2.upsamples.3.time_conv.weight" not in params
    assert "encoder.downsamples.3.downsamples.2.resample.1.weight" not in params


def test_state_dict_keys_equal_the_factory_official_names(models, official):
    assert set(models[0].state_dict()) == set(official)


def test_wrong_sizes_are_refused_with_the_stride(models):
    ours, _ = models
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.encode(torch.zeros(1, 3, 5, 24, 48))
    with pytest.raises(ValueError, match="Wan 2.1"):
        ours.decode(torch.zeros(1, 16, 2, 2, 3))
