"""Fun Control / Fun InP conditioning against an independent construction written here from
VideoX-Fun's pipelines (``videox_fun/pipeline/pipeline_wan_fun_control.py`` /
``pipeline_wan_fun_inpaint.py``, ``videox_fun/utils/utils.py``), with the same tiny VAE and CLIP
vision (both parity-tested on their own): layout, mask values and latents must be equal."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import factory
import tiny
from wan_core import ImageEmbeds, encode_fun_control, encode_fun_inpaint, load_clip_vision, load_vae
from wan_core.clip_vision import encode_image
from wan_core.conditioning import ConditioningError, check_conditioning
from wan_core.fun import FunControlEmbeds, _fit, check_fun_control, fit_image_embeds

pytestmark = pytest.mark.usefixtures("one_thread")

W, H, FRAMES = 32, 16, 9          # 3 latent frames of 2 x 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fun_cond")
    return {"vae": load_vae(factory.write_checkpoint(d, "vae", "official")),
            "clip": load_clip_vision(factory.write_checkpoint(d, "clip", "hf"), dtype=torch.float32)}


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _vae_encode(vae, video01):
    """VideoX-Fun ``prepare_control_latents``: ``image_processor.preprocess`` (2x - 1), ``vae.encode(...).mode()``
    (our encode returns the normalised mean) -> [1, 16, F', h, w]."""
    return vae.encode(video01 * 2 - 1)


def _chw01(image):            # [H, W, 3] in 0..1 -> [1, 3, 1, H, W] (get_image_latent's layout)
    return image.permute(2, 0, 1)[None, :, None]


@torch.no_grad()
def test_fun_control_equals_the_videox_fun_construction(models):
    vae, clip = models["vae"], models["clip"]
    control, start, ref = _rand(FRAMES, H, W, 3, seed=1), _rand(H, W, 3, seed=2), _rand(H, W, 3, seed=3)
    got = encode_fun_control(vae, W, H, FRAMES, control_video=control, start_image=start, reference_image=ref,
                             clip_vision=clip)
    # VideoX-Fun: control latents; zeros_like(latents) with the start image's latent at frame 0; cat on channels
    control_lat = _vae_encode(vae, control.permute(3, 0, 1, 2)[None])
    start_conv_in = torch.zeros_like(control_lat)
    start_conv_in[:, :, :1] = _vae_encode(vae, _chw01(start))
    expected_y = torch.cat([control_lat, start_conv_in], dim=1)[0]
    assert got.y.shape == (32, 3, H // 8, W // 8)
    assert torch.equal(got.y, expected_y)
    assert torch.equal(got.reference, _vae_encode(vae, _chw01(ref))[0, :, 0])     # ref_image_latentes[:, :, 0]
    # clip_image = the reference image when given (else the start image), TF.to_tensor().sub(0.5).div(0.5)
    assert torch.equal(got.clip_fea, encode_image(clip, ref.permute(2, 0, 1)[None] * 2 - 1)[0])
    assert got.latent_shape == (16, 3, H // 8, W // 8)


@torch.no_grad()
def test_fun_control_without_inputs_is_zeros_and_clip_from_the_start_image(models):
    vae, clip = models["vae"], models["clip"]
    empty = encode_fun_control(vae, W, H, FRAMES)
    assert torch.equal(empty.y, torch.zeros(32, 3, H // 8, W // 8))
    assert empty.clip_fea is None and empty.reference is None       # zeros at the model's CLIP width when sampling
    start = _rand(H, W, 3, seed=4)
    only_start = encode_fun_control(vae, W, H, FRAMES, start_image=start, clip_vision=clip)
    assert torch.equal(only_start.clip_fea, encode_image(clip, start.permute(2, 0, 1)[None] * 2 - 1)[0])
    assert only_start.y[:16].abs().max() == 0 and only_start.y[16:, 1:].abs().max() == 0
    one = encode_fun_control(vae, W, H, 1, start_image=start, clip_vision=clip)   # VideoX-Fun: `if size[2] != 1`
    assert one.y.abs().max() == 0


@torch.no_grad()
def test_images_of_another_size_are_resized_like_pil_bicubic(models):
    big = _rand(40, 72, 3, seed=5)
    got = encode_fun_control(models["vae"], W, H, 1, reference_image=big, clip_vision=models["clip"])
    pil = Image.fromarray((big.numpy() * 255).round().astype(np.uint8)).resize((W, H))   # PIL default: bicubic
    expected = torch.from_numpy(np.array(pil)).float().div(255)
    # measured max abs 0.0040, mean 0.0011 in 0..1 (PIL's 8-bit output and fixed-point filter)
    ours = _fit(big.permute(2, 0, 1) * 2 - 1, H, W).add(1).div(2).permute(1, 2, 0)
    assert (ours - expected).abs().max() < 0.01
    torch.testing.assert_close(got.reference, _vae_encode(models["vae"], _chw01(ours))[0, :, 0], atol=1e-5, rtol=0)
    # CLIP sees the image as loaded (VideoX-Fun: Image.open(ref_image); its encoder resizes to 224 itself)
    assert torch.equal(got.clip_fea, encode_image(models["clip"], big.permute(2, 0, 1)[None] * 2 - 1)[0])


def _videox_inpaint_mask_and_video(start, end, frames):
    """VideoX-Fun ``get_image_to_video_latent`` + the inpaint pipeline's mask / masked video."""
    video = start.permute(2, 0, 1)[None, :, None].repeat(1, 1, frames, 1, 1)        # start tiled over time
    mask = torch.zeros(1, 1, frames, *start.shape[:2])
    mask[:, :, 1:] = 255
    if end is not None:
        video[:, :, -1:] = end.permute(2, 0, 1)[None, :, None]
        mask[:, :, -1:] = 0
    init = video * 2 - 1                                                           # image_processor: 2x - 1
    cond = (mask >= 0.5).float()                                                   # mask_processor: binarize
    masked = init * (cond.repeat(1, 3, 1, 1, 1) < 0.5)
    cond = torch.cat([cond[:, :, :1].repeat_interleave(4, dim=2), cond[:, :, 1:]], dim=2)
    cond = cond.view(1, cond.shape[2] // 4, 4, *start.shape[:2]).transpose(1, 2)
    return cond, masked


def _resize_mask(mask, size):
    """VideoX-Fun ``resize_mask(..., process_first_frame_only=True)``: trilinear, first frame apart."""
    t, h, w = size
    first = F.interpolate(mask[:, :, :1], size=(1, h, w), mode="trilinear", align_corners=False)
    rest = F.interpolate(mask[:, :, 1:], size=(t - 1, h, w), mode="trilinear", align_corners=False)
    return torch.cat([first, rest], dim=2)


@pytest.mark.parametrize("with_end", [False, True])
@torch.no_grad()
def test_fun_inpaint_equals_the_videox_fun_construction(models, with_end):
    vae, clip = models["vae"], models["clip"]
    start, end = _rand(H, W, 3, seed=6), (_rand(H, W, 3, seed=7) if with_end else None)
    got = encode_fun_inpaint(vae, W, H, FRAMES, image=start, end_image=end, clip_vision=clip)
    cond, masked = _videox_inpaint_mask_and_video(start, end, FRAMES)
    latents = vae.encode(masked)
    mask = _resize_mask(1 - cond, latents.shape[2:])
    expected = torch.cat([mask, latents], dim=1)[0]
    assert got.y.shape == (20, 3, H // 8, W // 8)
    assert torch.equal(got.y[:4], expected[:4])          # 1 = known frame: frame 0 (x4), and the last
    assert set(got.y[:4].unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(got.y[4:], expected[4:], atol=1e-6, rtol=0)   # measured 0.0
    assert torch.equal(got.clip_fea, encode_image(clip, start.permute(2, 0, 1)[None] * 2 - 1)[0])   # start only


@torch.no_grad()
def test_fun_inpaint_without_images_is_text_to_video_with_zero_conditioning(models):
    got = encode_fun_inpaint(models["vae"], W, H, FRAMES, clip_vision=models["clip"])
    assert torch.equal(got.y, torch.zeros(20, 3, H // 8, W // 8))
    assert torch.equal(got.clip_fea, torch.zeros(257, tiny.TINY_CLIP.width))


def test_first_last_frame_embeds_give_an_i2v_model_the_start_image_tokens_only():
    y = torch.zeros(20, 3, 2, 4)
    y[:4, 0], y[:4, -1] = 1, 1
    clip = torch.randn(34, 160)
    flf = ImageEmbeds(y=y, clip_fea=clip, width=W, height=H, frames=FRAMES)
    assert torch.equal(fit_image_embeds(tiny.TINY_DIT_I2V, flf).clip_fea, clip[:17])
    assert fit_image_embeds(tiny.TINY_DIT_FLF2V, flf) is flf
    start_only = ImageEmbeds(y=torch.cat([y[:4, :1].expand(4, 3, 2, 4) * 0, y[4:]]), clip_fea=clip,
                             width=W, height=H, frames=FRAMES)
    assert fit_image_embeds(tiny.TINY_DIT_I2V, start_only) is start_only
    assert check_conditioning(tiny.TINY_DIT_I2V, flf) == (16, 3, 2, 4)     # Fun InP: an end frame is fine


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"control_video": torch.rand(5, H, W, 3)}, "control_video is 5 frames of 32x16; the run is 9 frames"),
    ({"control_video": torch.rand(FRAMES, H, 16, 3)}, "Resize / trim"),
    ({"control_video": torch.full((FRAMES, H, W, 3), 2.0)}, "finite and in 0..1"),
    ({"control_video": torch.full((FRAMES, H, W, 3), float("nan"))}, "finite and in 0..1"),
    ({"start_image": torch.rand(H, W, 3)}, "needs clip_vision"),
    ({"reference_image": torch.rand(H, W, 5)}, "C = 1 \\(grayscale\\), 3"),
    ({"start_image": torch.full((H, W, 3), -1.0)}, "start image must hold finite values in 0..1"),
])
def test_bad_fun_control_inputs_are_refused_before_the_vae_runs(kwargs, message):
    class NoVAE:
        def encode(self, *_):
            raise AssertionError("the VAE ran")

    with pytest.raises(ValueError, match=message):
        encode_fun_control(NoVAE(), W, H, FRAMES, **kwargs)
    with pytest.raises(ValueError, match="frames 8 is not 4n\\+1"):
        encode_fun_control(NoVAE(), W, H, 8)


def test_fun_embeds_fit_only_fun_control_models():
    y = torch.zeros(32, 3, 2, 4)
    fun = FunControlEmbeds(y=y, clip_fea=None, reference=torch.zeros(16, 2, 4), width=W, height=H, frames=FRAMES)
    assert check_fun_control(tiny.TINY_DIT_FUN_CONTROL_REF, fun, None) == (16, 3, 2, 4)
    with pytest.raises(ValueError, match="takes no reference image"):
        check_fun_control(tiny.TINY_DIT_FUN_CONTROL, fun, None)
    with pytest.raises(ValueError, match="needs a Wan2.1-Fun Control model"):
        check_fun_control(tiny.TINY_DIT_I2V, fun, None)
    with pytest.raises(ValueError, match="WanCore Fun Control Encode"):
        check_fun_control(tiny.TINY_DIT_FUN_CONTROL, None, (16, 3, 2, 4))
    with pytest.raises(ValueError, match="does not match"):
        check_fun_control(tiny.TINY_DIT_FUN_CONTROL_REF, fun, (16, 2, 2, 4))
    image = ImageEmbeds(y=torch.zeros(20, 3, 2, 4), clip_fea=torch.zeros(17, 160), width=W, height=H, frames=FRAMES)
    with pytest.raises(ConditioningError, match="Fun Control model.*encode_fun_control"):
        check_conditioning(tiny.TINY_DIT_FUN_CONTROL, image)
    with pytest.raises(ValueError, match=r"\[32, T', H/8, W/8\]"):
        FunControlEmbeds(y=torch.zeros(20, 3, 2, 4), clip_fea=None, reference=None, width=W, height=H, frames=FRAMES)
