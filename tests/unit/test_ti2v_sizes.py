"""Wan 2.2 video sizes from a start image, against independent constructions written here
from the official code (Wan-Video/Wan2.2):

- TI2V-5B (``wan/textimage2video.py`` ``WanTI2V.i2v`` + ``wan/utils/utils.py``
  ``best_output_size``): size within ``max_area`` in steps of patch 2 x VAE stride 16 = 32,
  the image scaled with PIL's Lanczos to cover it and center-cropped, ``TF.to_tensor`` then
  ``sub_(0.5).div_(0.5)``;
- I2V-A14B (``wan/image2video.py`` ``WanI2V.generate``): ``lat = round(np.sqrt(max_area *
  aspect) // 8 // 2 * 2)`` per axis, pixels = lat x 8.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from wan_core.conditioning import i2v_size
from wan_core.ti2v import TI2V_DEFAULTS, best_output_size, fit_image, ti2v_size

# image sizes (w, h): landscape, portrait, square, extreme, odd sizes
IMAGES = [(1920, 1080), (1080, 1920), (1280, 704), (704, 1280), (1024, 1024), (800, 600), (600, 800), (3000, 1000),
          (1000, 3000), (512, 288), (333, 777), (1281, 719), (4000, 500), (97, 61), (640, 480), (1366, 768)]
AREAS = [704 * 1280, 480 * 832, 1024 * 704, 720 * 1280, 512 * 512, 300 * 300]


def official_best_output_size(w, h, dw, dh, expected_area):
    """wan/utils/utils.py best_output_size, step by step as published."""
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    ratio1 = ow1 / oh1
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    ratio2 = ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def official_ti2v_image(img: Image.Image, max_area: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """WanTI2V.i2v's preprocessing of a PIL image -> ([3, oh, ow] in -1..1, (ow, oh))."""
    ih, iw = img.height, img.width
    dh, dw = 2 * 16, 2 * 16                     # patch_size[1] * vae_stride[1], same for width
    ow, oh = official_best_output_size(iw, ih, dw, dh, max_area)
    scale = max(ow / iw, oh / ih)
    img = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1 = (img.width - ow) // 2
    y1 = (img.height - oh) // 2
    img = img.crop((x1, y1, x1 + ow, y1 + oh))
    assert img.width == ow and img.height == oh
    x = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)   # TF.to_tensor
    return x.sub_(0.5).div_(0.5), (ow, oh)


def official_a14b_size(h: int, w: int, max_area: int) -> tuple[int, int]:
    """WanI2V.generate (Wan 2.2, vae_stride (4, 8, 8), patch (1, 2, 2)) -> (w, h)."""
    aspect_ratio = h / w
    lat_h = round(np.sqrt(max_area * aspect_ratio) // 8 // 2 * 2)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // 8 // 2 * 2)
    return lat_w * 8, lat_h * 8


def _pil(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth content plus noise, so the filter's taps and the crop offsets both matter
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), ((xx + yy) * 7) % 256], axis=-1)
    noisy = np.clip(base + rng.integers(-40, 41, size=base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB")


@pytest.mark.parametrize("area", AREAS)
def test_ti2v_size_equals_the_official_best_output_size(area):
    for w, h in IMAGES:
        assert ti2v_size(w, h, area) == official_best_output_size(w, h, 32, 32, area), (w, h, area)
        assert best_output_size(w, h, 16, 32, area) == official_best_output_size(w, h, 16, 32, area)
    # a few hundred more aspects and areas
    rng = np.random.default_rng(0)
    for _ in range(400):
        w, h = (int(v) for v in rng.integers(64, 4096, size=2))
        a = int(rng.integers(256 * 256, 1536 * 1536))
        assert ti2v_size(w, h, a) == official_best_output_size(w, h, 32, 32, a), (w, h, a)


def test_ti2v_default_area_gives_the_published_sizes():
    assert TI2V_DEFAULTS["max_area"] == 704 * 1280
    assert ti2v_size(1280, 704) == (1280, 704) and ti2v_size(704, 1280) == (704, 1280)
    # 16:9 is not 1280x704's aspect: the official rule keeps the aspect closer (1.773 vs 1.778)
    assert ti2v_size(1920, 1080) == (1248, 704) and ti2v_size(1080, 1920) == (704, 1248)
    assert ti2v_size(1024, 1024) == (960, 928)   # the width-first candidate wins, not a square


def test_ti2v_size_refuses_an_area_too_small_for_the_aspect():
    with pytest.raises(ValueError, match="max_area 1024 is too small for a 4000x500 image"):
        ti2v_size(4000, 500, 1024)
    with pytest.raises(ValueError, match="max_area must be a whole number"):
        ti2v_size(800, 600, 0)


@pytest.mark.parametrize("w, h, area", [(1920, 1080, 704 * 1280), (1080, 1920, 704 * 1280), (333, 777, 480 * 832),
                                        (1281, 719, 512 * 512), (97, 61, 300 * 300), (640, 480, 704 * 1280)])
def test_fit_image_equals_the_official_preprocessing_bit_for_bit(w, h, area):
    img = _pil(w, h, seed=w + h)
    want, (ow, oh) = official_ti2v_image(img, area)
    rgb = torch.from_numpy(np.asarray(img).copy())
    assert (ow, oh) == ti2v_size(w, h, area)
    got_u8 = fit_image(rgb, ow, oh)                       # uint8 [H, W, 3]
    got_float = fit_image(rgb.float() / 255.0, ow, oh)    # ComfyUI IMAGE: float 0..1
    assert got_u8.shape == (3, oh, ow)
    assert torch.equal(got_u8, want)
    assert torch.equal(got_float, want)


def test_fit_image_rounds_other_floats_to_8_bits_as_the_official_pil_input():
    img = _pil(333, 777, seed=3)
    want, (ow, oh) = official_ti2v_image(img, 480 * 832)
    x = torch.from_numpy(np.asarray(img).copy()).float() / 255.0
    assert torch.equal(fit_image((x + 0.3 / 255.0).clamp(0, 1), ow, oh), want)   # within half a level: same
    shifted = fit_image(torch.from_numpy(np.asarray(img)[:, 1:].copy()), ow, oh)
    assert (shifted - want).abs().max() > 0.1                                    # a one-pixel crop shift shows


def test_fit_image_at_the_video_size_is_the_plain_conversion():
    x = torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(0))
    from wan_core.conditioning import image_to_tensor

    assert torch.equal(fit_image(x, 96, 64), image_to_tensor(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fit_image(torch.rand(64, 96, 4), 96, 64).shape == (3, 64, 96)   # alpha dropped, as image_to_tensor
    assert fit_image(torch.rand(64, 96, 1), 32, 32).shape == (3, 32, 32)      # grayscale repeated


@pytest.mark.parametrize("area", [1280 * 720, 832 * 480, 720 * 1280, 480 * 832, 512 * 512])
def test_i2v_a14b_size_equals_the_official_rule(area):
    for w, h in IMAGES:
        assert i2v_size(h, w, area) == official_a14b_size(h, w, area), (w, h, area)
    rng = np.random.default_rng(1)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(64, 4096, size=2))
        if official_a14b_size(h, w, area)[0] >= 16 and official_a14b_size(h, w, area)[1] >= 16:
            assert i2v_size(h, w, area) == official_a14b_size(h, w, area), (w, h, area)
