"""Sampling pipelines on tiny random models: determinism, official conditioning, bad input."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import factory
import tiny
from wan_core import (ImageEmbeds, NonFiniteError, SamplerSettings, TextEmbeds, check_video_size, default_settings,
                      encode_image_conditioning, generate, i2v_size, image_to_tensor, latent_shape, load_clip_vision,
                      load_dit, load_text_encoder, load_vae, make_noise, sample)
from wan_core.conditioning import NEGATIVE_PROMPT, NEGATIVE_PROMPT_I2V, i2v_mask

W, H, FRAMES = 48, 32, 5
SETTINGS = SamplerSettings(steps=3, cfg=5.0, shift=5.0, seed=7)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "t2v": load_dit(factory.write_checkpoint(d, "dit", "official", variant="t2v"), dtype=torch.float32),
        "i2v": load_dit(factory.write_checkpoint(d, "dit", "comfy_prefixed", variant="i2v"), dtype=torch.float32),
        "flf2v": load_dit(factory.write_checkpoint(d, "dit", "official", variant="flf2v"), dtype=torch.float32),
        "vae": load_vae(factory.write_checkpoint(d, "vae", "official")),
        "te": load_text_encoder(factory.write_checkpoint(d, "t5", "hf_with_spiece"), dtype=torch.float32),
        "clip": load_clip_vision(factory.write_checkpoint(d, "clip", "hf"), dtype=torch.float32),
        "clip_path": d / "clip_hf.safetensors",
    }


def _text(te) -> TextEmbeds:
    pos, neg = te.encode(["a cat walks on the grass", ""])
    return TextEmbeds(pos, neg)


def _image(h: int = 40, w: int = 60, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(h, w, c, generator=torch.Generator().manual_seed(seed))


def test_noise_is_the_official_randn_on_a_cpu_generator() -> None:
    shape = latent_shape(832, 480, 81)
    assert shape == (16, 21, 60, 104)
    g = torch.Generator().manual_seed(1234)
    assert torch.equal(make_noise(1234, (16, 3, 4, 6)), torch.randn(16, 3, 4, 6, generator=g, dtype=torch.float32))


def test_t2v_is_bit_for_bit_deterministic_per_seed(models) -> None:
    text = _text(models["te"])
    shape = latent_shape(W, H, FRAMES)
    a = sample(models["t2v"], text, SETTINGS, shape=shape)
    b = sample(models["t2v"], text, SETTINGS, shape=shape)
    c = sample(models["t2v"], text, SamplerSettings(steps=3, seed=8), shape=shape)
    assert a.shape == shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cfg_combines_separate_conditional_and_unconditional_passes(models) -> None:
    dit, text = models["t2v"], _text(models["te"])
    shape = latent_shape(W, H, FRAMES)
    calls = []
    original = dit.prepare

    def spy(x, t, context, clip_fea=None, y=None, **kw):   # kw: the runner's per-run embedded text
        calls.append(context.shape[1])
        return original(x, t, context, clip_fea, y, **kw)

    dit.prepare = spy
    try:
        sample(dit, text, SamplerSettings(steps=2, cfg=4.0), shape=shape)
        assert calls == [text.positive.shape[0], text.negative.shape[0]] * 2
        calls.clear()
        sample(dit, text, SamplerSettings(steps=2, cfg=1.0), shape=shape)
        assert calls == [text.positive.shape[0]] * 2
    finally:
        del dit.prepare


def test_i2v_conditioning_matches_an_independent_construction(models) -> None:
    img = image_to_tensor(_image())
    cond = encode_image_conditioning(models["vae"], models["clip"], img, FRAMES, W, H)
    t_lat, h, w = (FRAMES - 1) // 4 + 1, H // 8, W // 8
    mask = torch.zeros(4, t_lat, h, w)
    mask[:, 0] = 1                                # every frame of latent 0 is the given image
    assert torch.equal(cond.y[:4], mask)
    guide = torch.zeros(1, 3, FRAMES, H, W)
    guide[0, :, 0] = F.interpolate(img[None], size=(H, W), mode="bicubic", align_corners=False)[0]
    assert torch.equal(cond.y[4:], models["vae"].encode(guide)[0])
    # CLIP tokens against transformers' CLIPVisionModel on the same weights (hidden_states[-2])
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig as HFConfig
    from transformers import CLIPVisionModel

    c = tiny.TINY_CLIP
    hf = CLIPVisionModel(HFConfig(hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
                                  num_attention_heads=c.num_heads, patch_size=c.patch_size, image_size=c.image_size,
                                  hidden_act="gelu", layer_norm_eps=1e-5)).eval()
    sd = {k[len("vision_model."):]: v for k, v in load_file(str(models["clip_path"])).items()
          if k.startswith("vision_model.")}
    hf.load_state_dict(sd, strict=True)
    pix = F.interpolate(img[None], size=(c.image_size,) * 2, mode="bicubic", align_corners=False) * 0.5 + 0.5
    pix = (pix - torch.tensor(c.mean).view(1, 3, 1, 1)) / torch.tensor(c.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = hf(pixel_values=pix, output_hidden_states=True).hidden_states[-2][0]
    assert cond.clip_fea.shape == (c.num_tokens, c.width)
    assert (cond.clip_fea - ref).abs().max() < 1e-4   # fp32 parity, measured ~1e-6


def test_flf2v_mask_marks_first_and_last_frames(models) -> None:
    mask = i2v_mask(FRAMES, 2, 3, last_frame=True)
    expected = torch.zeros(4, 2, 2, 3)
    expected[:, 0] = 1
    expected[3, -1] = 1        # the last pixel frame is the 4th of the last latent frame
    assert torch.equal(mask, expected)
    cond = encode_image_conditioning(models["vae"], models["clip"], image_to_tensor(_image()), FRAMES, W, H,
                                     end_image=image_to_tensor(_image(seed=1)))
    assert cond.clip_fea.shape == (2 * tiny.TINY_CLIP.num_tokens, tiny.TINY_CLIP.width)
    out = sample(models["flf2v"], _text(models["te"]), SETTINGS, image=cond)
    assert torch.isfinite(out).all()


def test_i2v_is_deterministic_and_uses_the_image(models) -> None:
    text = _text(models["te"])
    cond = encode_image_conditioning(models["vae"], models["clip"], image_to_tensor(_image()), FRAMES, W, H)
    other = encode_image_conditioning(models["vae"], models["clip"], image_to_tensor(_image(seed=3)), FRAMES, W, H)
    a = sample(models["i2v"], text, SETTINGS, image=cond)
    assert torch.equal(a, sample(models["i2v"], text, SETTINGS, image=cond))
    assert not torch.equal(a, sample(models["i2v"], text, SETTINGS, image=other))


def test_generate_t2i_v2v_and_callbacks(models) -> None:
    common = dict(vae=models["vae"], text_encoder=models["te"], prompt="a red boat", steps=2, seed=3)
    image = generate(dit=models["t2v"], width=W, height=H, frames=1, **common)
    assert image.shape == (1, H, W, 3) and 0 <= image.min() and image.max() <= 1
    steps = []
    video = generate(dit=models["t2v"], width=W, height=H, frames=FRAMES, callback=steps.append, **common)
    assert video.shape == (FRAMES, H, W, 3)
    assert [s.step for s in steps] == [1, 2] and steps[-1].total == 2 and steps[0].x0.shape == latent_shape(W, H, FRAMES)
    v2v = generate(dit=models["t2v"], video=video, denoise=0.5, **{**common, "steps": 4})
    assert v2v.shape == video.shape and torch.isfinite(v2v).all()


def test_interrupt_stops_within_a_step_and_the_next_run_is_unchanged(models) -> None:
    text, shape = _text(models["te"]), latent_shape(W, H, FRAMES)
    calls = {"n": 0}

    class Stop(Exception):
        pass

    def interrupt() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise Stop

    with pytest.raises(Stop):
        sample(models["t2v"], text, SETTINGS, shape=shape, interrupt=interrupt)
    assert calls["n"] == 2
    assert torch.equal(sample(models["t2v"], text, SETTINGS, shape=shape), sample(models["t2v"], text, SETTINGS, shape=shape))


def test_runner_equals_plain_forward_bit_for_bit(models) -> None:
    from wan_core.runner import DiTRunner

    dit = models["i2v"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 2, 4, 6, generator=g), torch.randn(1, 20, 2, 4, 6, generator=g)
    ctx, clip = torch.randn(1, 5, tiny.TINY_T5.dim, generator=g), torch.randn(1, 17, tiny.TINY_CLIP.width, generator=g)
    t = torch.tensor([700])
    assert torch.equal(DiTRunner(dit)(x, t, ctx, clip, y, branch="uncond"), dit(x, t, ctx, clip, y))


def test_nan_is_caught_at_the_step_where_it_appears(models, tmp_path: Path) -> None:
    dit = load_dit(factory.write_checkpoint(tmp_path, "dit", "official", variant="t2v"), dtype=torch.float32)
    dit.head.head.bias.data[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 1/3: the conditional prediction of .* contains NaN/Inf\. Likely cause"):
        sample(dit, _text(models["te"]), SETTINGS, shape=latent_shape(W, H, FRAMES))


# -- bad input: documented behaviour, tested messages ----------------------------------


@pytest.mark.parametrize(("w", "h", "f", "msg"), [
    (833, 480, 81, "width 833 is not a multiple of 16 (at least 16); use 832 or 848"),
    (832, 470, 81, "height 470 is not a multiple of 16 (at least 16); use 464 or 480"),
    (832, 480, 80, "frames 80 is not 4n+1 (1, 5, 9, ..., 81); use 77 or 81"),
    (832, 480, 0, "frames 0 is not 4n+1 (1, 5, 9, ..., 81); use 1 or 5"),
    (8, 480, 81, "width 8 is not a multiple of 16"),
])
def test_bad_sizes_are_refused_with_the_nearest_valid_values(w: int, h: int, f: int, msg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_video_size(w, h, f)


def test_bad_sizes_are_refused_before_any_model_runs(models) -> None:
    class Boom:
        cfg = models["t2v"].cfg

        def __getattr__(self, name):
            raise AssertionError("the model was used")

    with pytest.raises(ValueError, match="frames 80 is not 4n\\+1"):
        generate(dit=Boom(), vae=None, text_encoder=None, prompt="x", width=W, height=H, frames=80)


def test_i2v_model_without_image_and_t2v_model_with_image_are_refused(models) -> None:
    common = dict(vae=models["vae"], text_encoder=models["te"], prompt="x", width=W, height=H, frames=FRAMES)
    with pytest.raises(ValueError, match="is an image-to-video model: pass image="):
        generate(dit=models["i2v"], **common)
    with pytest.raises(ValueError, match="is a text-to-video model; it takes no image"):
        generate(dit=models["t2v"], image=_image(), clip_vision=models["clip"], **common)
    text = _text(models["te"])
    with pytest.raises(ValueError, match="give it a start image"):
        sample(models["i2v"], text, SETTINGS, shape=latent_shape(W, H, FRAMES))
    fake = ImageEmbeds(y=torch.zeros(20, 2, 4, 6), clip_fea=torch.zeros(17, 160), width=W, height=H, frames=FRAMES)
    with pytest.raises(ValueError, match="is a text-to-video model; it takes no image"):
        sample(models["t2v"], text, SETTINGS, image=fake)
    with pytest.raises(ValueError, match="end_image needs a start image too"):   # (an I2V model takes an end
        generate(dit=models["i2v"], end_image=_image(), clip_vision=models["clip"], **common)  # image: Fun InP)


def test_alpha_is_dropped_with_a_warning_and_grayscale_is_repeated() -> None:
    rgba = _image(c=4)
    with pytest.warns(UserWarning, match="alpha channel; it is ignored"):
        x = image_to_tensor(rgba)
    assert torch.equal(x, rgba[..., :3].permute(2, 0, 1) * 2 - 1)
    gray = _image(c=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = image_to_tensor(gray)
    assert g.shape == (3, 40, 60) and torch.equal(g[0], g[2]) and torch.equal(g[0], gray[..., 0] * 2 - 1)
    assert torch.equal(image_to_tensor(torch.full((2, 2), 255, dtype=torch.uint8)), torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match=r"C = 1 \(grayscale\), 3 \(RGB\) or 4 \(RGBA\)"):
        image_to_tensor(torch.rand(4, 4, 2))


def test_official_defaults_and_i2v_size() -> None:
    assert default_settings("t2v", 832, 480) == SamplerSettings(steps=50, shift=5.0)
    assert default_settings("i2v", 832, 480).steps == 40 and default_settings("i2v", 832, 480).shift == 3.0
    assert default_settings("i2v", 1280, 720).shift == 5.0
    assert default_settings("flf2v", 1280, 720).shift == 16.0
    assert default_settings("flf2v", 1280, 720).steps == 50    # generate.py: "i2v" not in "flf2v"
    assert default_settings("t2v", 832, 480, steps=8, cfg=None).steps == 8
    assert i2v_size(720, 1280, 832 * 480) == (832, 464)   # official formula, checked by hand
    # float64 sqrt gives 479.99999999999994 here, so the official code itself picks 464 rows
    assert i2v_size(480, 832, 832 * 480) == (832, 464)
    assert i2v_size(832, 480, 832 * 480) == (480, 832)
    assert NEGATIVE_PROMPT_I2V == "镜头晃动，" + NEGATIVE_PROMPT


def test_generate_from_paths_drops_the_text_encoder_before_reading_the_dit(tmp_path: Path, monkeypatch) -> None:
    """RAM order: umT5 is loaded, run and released before the DiT file is read (a 14B fp8 DiT and
    umT5 would otherwise rest in RAM together, 14 + 11 GB); the frames are the same bit for bit."""
    import weakref

    import wan_core.loaders as loaders
    from wan_core.files import CheckpointError

    paths = {"dit": factory.write_checkpoint(tmp_path, "dit", "official", variant="t2v"),
             "vae": factory.write_checkpoint(tmp_path, "vae", "official"),
             "text_encoder": factory.write_checkpoint(tmp_path, "t5", "hf_with_spiece")}
    common = dict(prompt="a red boat", width=W, height=H, frames=FRAMES, steps=2, seed=3)
    loaded = generate(dit=load_dit(paths["dit"]), vae=load_vae(paths["vae"]),
                      text_encoder=load_text_encoder(paths["text_encoder"]), **common)
    order, encoders = [], []
    load_te, load_dit_ = loaders.load_text_encoder, loaders.load_dit

    def text_encoder_loader(*args, **kw):
        order.append("text encoder")
        te = load_te(*args, **kw)
        encoders.append(weakref.ref(te))
        return te

    def dit_loader(*args, **kw):
        order.append("dit")
        assert encoders and encoders[-1]() is None, "the text encoder is still held when the DiT loads"
        return load_dit_(*args, **kw)

    monkeypatch.setattr(loaders, "load_text_encoder", text_encoder_loader)
    monkeypatch.setattr(loaders, "load_dit", dit_loader)
    assert torch.equal(generate(**paths, **common), loaded)
    assert order == ["text encoder", "dit"]
    order.clear()
    with pytest.raises(CheckpointError, match="VAE"):   # a wrong file is refused before any model loads
        generate(**{**paths, "dit": paths["vae"]}, **common)
    assert order == ["dit"]
