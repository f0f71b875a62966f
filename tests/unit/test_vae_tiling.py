"""Spatially tiled VAE decode / encode: plans cover the frame, blend weights sum to one, a
one-tile plan is the untiled path bit for bit, tiled output stays near untiled, an
out-of-memory error shrinks the tiles instead of failing, progress counts every chunk.

Tiled vs untiled is not exact: a tile sees zero padding at its cut edges and the decoder's
mid-block attention spans the tile, not the frame. Measured (fp32 CPU, torch 2.13, random
normal latents, tiny VAE dim 8 with factory weights, which are random, so the attention
mixes the whole frame far more than trained weights do): latent 8x12 x 2 frames, tiles 6x6
overlap 2: max abs 0.61-1.00, mean abs 0.074-0.081 (3 seeds, also 7x11); tiles 4x4 overlap 2:
mean 0.14; encode 6x6 / 2: mean 0.038-0.044, max 0.34. At the test size below (latent 4x6,
tiles 3x4, overlap 1: tiny tiles, so the worst case) decode mean abs 0.128, max 0.93 (output
mean |x| 0.30); encode mean 0.071, max 0.46. Real config (dim 96, random weights, 832x480 x 5
frames, tiles 40x40 overlap 8, bench/memory_vae.py): max abs 0.21, mean abs 0.012. Tolerance: mean abs < 0.2; measured
mutations at the test size: tile content one latent pixel off 0.35, no temporal cache 0.34.
"""
from __future__ import annotations

import logging
from itertools import pairwise

import pytest
import torch

from wan_core.configs import VAEConfig
from wan_core.vae import WanVAE
from wan_core.vae_tiling import (
    _blend_weights,
    auto_tile,
    decode_activation_bytes,
    decode_tiled,
    encode_tiled,
    is_out_of_memory,
    plan_tiles,
)

MEAN_TOL = 0.2
LATENT = (1, 16, 2, 4, 6)   # 5 frames of 32x48 pixels
TILE, OVERLAP = (3, 4), 1


@pytest.fixture(scope="module")
def vae(tiny_vae) -> WanVAE:
    return tiny_vae


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(*LATENT, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def untiled(vae, latents) -> torch.Tensor:
    return vae.decode(latents)


# ---------------------------------------------------------------- plans and weights

@pytest.mark.parametrize("size,tile,overlap", [((60, 104), (32, 32), 8), ((7, 11), (3, 4), 1), ((5, 9), (5, 3), 2),
                                               ((13, 1), (4, 4), 8), ((17, 23), (16, 16), 8)])
def test_tiles_cover_the_frame_with_at_least_the_overlap(size, tile, overlap) -> None:
    plan = plan_tiles(*size, tile, overlap)
    for ranges, n, t in ((plan.rows, size[0], plan.tile[0]), (plan.cols, size[1], plan.tile[1])):
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(b - a == t for a, b in ranges)
        for (a0, a1), (b0, _b1) in pairwise(ranges):
            assert a0 < b0 and a1 - b0 >= plan.overlap  # neighbours share at least the overlap
    assert plan.overlap <= overlap


@pytest.mark.parametrize("size,tile,overlap", [((7, 11), (3, 4), 1), ((60, 104), (32, 32), 8), ((9, 9), (4, 4), 2)])
def test_blend_weights_are_positive_and_sum_to_one_everywhere(size, tile, overlap) -> None:
    plan = plan_tiles(*size, tile, overlap)
    total = torch.zeros(size[0] * 8, size[1] * 8, dtype=torch.float64)
    for (y0, y1), row in zip(plan.rows, _blend_weights(plan, 8)):
        for (x0, x1), w in zip(plan.cols, row):
            assert (w > 0).all()
            total[y0 * 8:y1 * 8, x0 * 8:x1 * 8] += w
    assert torch.allclose(total, torch.ones_like(total), atol=1e-12)


def test_auto_tile_is_untiled_when_the_frame_fits_and_fits_the_budget_otherwise() -> None:
    cfg = VAEConfig()
    assert auto_tile(60, 104, 10**13, cfg) == (60, 104)
    budget = 2 * 2**30
    th, tw = auto_tile(60, 104, budget, cfg)
    assert (th, tw) != (60, 104) and decode_activation_bytes(cfg, (th, tw)) <= budget
    assert th * tw > 0.8 * (budget / 1.6e6)  # uses most of the budget, not a token tile
    # bf16 halves the estimate, so the tile doubles in area
    bh, bw = auto_tile(60, 104, budget, cfg, torch.bfloat16)
    assert bh * bw > 1.8 * th * tw or (bh, bw) == (60, 104)
    assert auto_tile(60, 104, 1, cfg) == (16, 16)  # never below the minimum tile


# ---------------------------------------------------------------- decode

def test_one_tile_plan_is_bit_identical_to_untiled_decode(vae, latents, untiled) -> None:
    for tile in (None, (4, 6), 64, "auto"):
        assert torch.equal(decode_tiled(vae, latents, tile=tile, budget=10**12), untiled)


def test_tiled_decode_matches_untiled_within_measured_tolerance(vae, latents, untiled) -> None:
    tiled = decode_tiled(vae, latents, tile=TILE, overlap=OVERLAP)
    assert tiled.shape == untiled.shape and tiled.dtype == untiled.dtype
    assert tiled.abs().max() <= 1.0
    err = (tiled - untiled).abs()
    assert err.mean().item() < MEAN_TOL
    # chunking in time inside each tile changes nothing: every tile carries its own cache
    two = decode_tiled(vae, latents, tile=TILE, overlap=OVERLAP, latent_frames_per_chunk=2)
    assert (two - tiled).abs().max().item() < 5e-5


def test_odd_latent_sizes_decode_to_the_right_shape(vae) -> None:
    z = torch.randn(1, 16, 2, 5, 3, generator=torch.Generator().manual_seed(3))
    out = decode_tiled(vae, z, tile=(2, 2), overlap=1)
    assert out.shape == (1, 3, 5, 40, 24)
    assert torch.isfinite(out).all()


def test_progress_counts_every_chunk_of_every_tile(vae, latents) -> None:
    calls = []
    decode_tiled(vae, latents, tile=TILE, overlap=OVERLAP, on_progress=lambda d, n: calls.append((d, n)))
    n = plan_tiles(4, 6, TILE, OVERLAP).n_tiles * LATENT[2]
    assert n > LATENT[2] and calls == [(i, n) for i in range(1, n + 1)]
    calls.clear()
    decode_tiled(vae, latents, tile=None, on_progress=lambda d, n: calls.append((d, n)))
    assert calls == [(1, 2), (2, 2)]


def _oom_above(vae, monkeypatch, max_pixels: int, seen: list) -> None:
    """Make the decoder fail like a GPU that fits at most ``max_pixels`` latent pixels."""
    original = vae.decode_chunk

    def decode_chunk(z, cache):
        seen.append(tuple(z.shape[-2:]))
        if z.shape[-2] * z.shape[-1] > max_pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return original(z, cache)

    monkeypatch.setattr(vae, "decode_chunk", decode_chunk)


def test_out_of_memory_retries_with_halved_tiles_and_keeps_the_result(vae, latents, monkeypatch, caplog) -> None:
    expected = decode_tiled(vae, latents, tile=(2, 3), overlap=OVERLAP)
    seen: list = []
    _oom_above(vae, monkeypatch, 6, seen)
    with caplog.at_level(logging.WARNING, logger="wan_core.vae_tiling"):
        out = decode_tiled(vae, latents, tile=None, overlap=OVERLAP, min_tile=1)
    assert torch.equal(out, expected)          # untiled 4x6 -> 2x3 tiles
    assert seen[0] == (4, 6) and seen[-1] == (2, 3)
    retries = [r for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert len(retries) == 1 and "4x6" in retries[0].getMessage() and "2x3" in retries[0].getMessage()


def test_out_of_memory_at_the_minimum_tile_is_raised(vae, latents, monkeypatch) -> None:
    _oom_above(vae, monkeypatch, 0, [])
    with pytest.raises(torch.OutOfMemoryError):
        decode_tiled(vae, latents, tile=(2, 2), overlap=1, min_tile=2)


def test_other_errors_are_not_retried(vae, latents, monkeypatch) -> None:
    calls = []

    def broken(z, cache):
        calls.append(1)
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(vae, "decode_chunk", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        decode_tiled(vae, latents, tile=None, min_tile=1)
    assert len(calls) == 1
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(ValueError("out of memory"))


# ---------------------------------------------------------------- encode

def test_tiled_encode_is_exact_for_one_tile_and_close_for_several(vae) -> None:
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    whole = vae.encode(video)
    assert torch.equal(encode_tiled(vae, video, tile=None), whole)
    calls = []
    tiled = encode_tiled(vae, video, tile=TILE, overlap=OVERLAP, on_progress=lambda d, n: calls.append(d))
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean().item() < MEAN_TOL
    assert calls == list(range(1, plan_tiles(4, 6, TILE, OVERLAP).n_tiles * 2 + 1))
