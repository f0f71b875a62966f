"""The VACE context equals an independent construction that follows the official
``wan/vace.py`` (``vace_encode_frames`` / ``vace_encode_masks`` / ``vace_latent`` and the
reference fitting of ``prepare_source``), written here with loops and index formulas instead
of the reshapes the module uses; inputs are checked with clear errors before the VAE runs."""
from __future__ import annotations

import math

import pytest
import torch

from wan_core.vace_conditioning import VaceEmbeds, encode_vace, fit_reference, pack_mask

pytestmark = pytest.mark.usefixtures("one_thread")

W, H, FRAMES = 32, 16, 5


def official_mask(mask: torch.Tensor) -> torch.Tensor:
    """[F, H, W] -> [64, T', H/8, W/8]: channel 8*i+j holds pixel (8y+i, 8x+j); latent frame t
    reads pixel frame floor((t + 0.5) * F / T') (torch 'nearest-exact')."""
    f, h, w = mask.shape
    t_lat = (f + 3) // 4
    out = torch.empty(64, t_lat, h // 8, w // 8)
    for t in range(t_lat):
        src = min(math.floor((t + 0.5) * f / t_lat), f - 1)
        for i in range(8):
            for j in range(8):
                out[8 * i + j, t] = mask[src, i::8, j::8]
    return out


def official_fit(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """prepare_source: [3, h, w] in -1..1 scaled by min(H/h, W/w), int() sizes, bilinear,
    centred on a white (1.0) canvas."""
    h, w = img.shape[1:]
    s = min(height / h, width / w)
    nh, nw = int(h * s), int(w * s)
    small = torch.nn.functional.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, height, width)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = small
    return canvas


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(FRAMES, H, W, 3, generator=g)
    mask = torch.rand(FRAMES, H, W, generator=g)
    refs = [torch.rand(8, 24, 3, generator=g), torch.rand(H, W, 3, generator=g)]
    return video, mask, refs


@torch.no_grad()
def test_context_matches_the_official_construction(tiny_vae):
    video, mask, refs = inputs()
    got = encode_vace(tiny_vae, W, H, FRAMES, control_video=video, control_mask=mask, reference_images=refs)

    frames = video.permute(3, 0, 1, 2) * 2 - 1                      # [3, F, H, W] in -1..1
    m = torch.where(mask > 0.5, 1.0, 0.0)
    inactive = frames * (1 - m) + 0 * m
    reactive = frames * m + 0 * (1 - m)
    enc = lambda v: tiny_vae.encode(v[None])[0]                      # noqa: E731
    z = torch.cat([enc(inactive), enc(reactive)])
    ref_z = [enc(official_fit(r.permute(2, 0, 1) * 2 - 1, H, W)[:, None]) for r in refs]
    z = torch.cat([*(torch.cat([u, torch.zeros_like(u)]) for u in ref_z), z], dim=1)
    mk = official_mask(mask)
    mk = torch.cat([torch.zeros(64, len(refs), *mk.shape[2:]), mk], dim=1)
    expected = torch.cat([z, mk])

    assert got.reference_frames == 2 and got.latent_shape == (16, 2 + 2, H // 8, W // 8)
    assert torch.equal(got.latents, expected)


def test_mask_packing_is_official_at_81_frames():
    mask = torch.rand(81, 16, 32, generator=torch.Generator().manual_seed(3))
    packed = pack_mask(mask)
    assert packed.shape == (64, 21, 2, 4)
    assert torch.equal(packed, official_mask(mask))
    assert torch.equal(packed[:, 0], official_mask(mask)[:, 0]) and torch.equal(packed[9, 0, 1, 2], mask[1, 9, 17])


@torch.no_grad()
def test_no_control_is_a_grey_video_under_a_full_mask(tiny_vae):
    got = encode_vace(tiny_vae, W, H, FRAMES)
    grey = tiny_vae.encode(torch.zeros(1, 3, FRAMES, H, W))[0]
    assert got.reference_frames == 0
    assert torch.equal(got.latents[:16], grey) and torch.equal(got.latents[16:32], grey)
    assert torch.equal(got.latents[32:], torch.ones(64, 2, H // 8, W // 8))


def test_reference_image_is_fitted_onto_white():
    wide = torch.rand(3, 10, 40) * 2 - 1
    out = fit_reference(wide, 16, 32)
    assert torch.equal(out, official_fit(wide, 16, 32))
    assert torch.all(out[:, :4] == 1) and torch.all(out[:, 12:] == 1)   # letterbox bars
    same = torch.rand(3, 16, 32) * 2 - 1
    assert torch.equal(fit_reference(same, 16, 32), same)


@pytest.mark.parametrize("kwargs,match", [
    (dict(control_video=torch.rand(9, H, W, 3)), "9 frames"),
    (dict(control_video=torch.rand(FRAMES, H, 48, 3)), "Resize"),
    (dict(control_mask=torch.rand(FRAMES, H, W) + 1), "0..1"),
    (dict(control_mask=torch.rand(3, H, W)), "control_mask must be"),
    (dict(control_video=torch.full((FRAMES, H, W, 3), float("nan"))), "finite"),
    (dict(strength=-1.0), "strength"),
    (dict(start=0.5, end=0.5), "start"),
])
def test_bad_inputs_are_refused_before_the_vae_runs(kwargs, match):
    class NoVAE:
        def encode(self, *a, **k):
            raise AssertionError("the VAE ran")

    with pytest.raises(ValueError, match=match):
        encode_vace(NoVAE(), W, H, FRAMES, **kwargs)


def test_sizes_that_are_not_multiples_of_16_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        encode_vace(None, 24, H, FRAMES)


def test_strength_range_and_trim():
    e = VaceEmbeds(torch.zeros(96, 3, 2, 4), 1, W, H, FRAMES, strength=0.8, start=0.25, end=0.75)
    assert [e.strength_at(i, 4) for i in range(4)] == [0.0, 0.8, 0.8, 0.0]
    assert e.trim(torch.zeros(16, 3, 2, 4)).shape == (16, 2, 2, 4)
    with pytest.raises(ValueError, match="96"):
        VaceEmbeds(torch.zeros(32, 3, 2, 4), 0, W, H, FRAMES)
