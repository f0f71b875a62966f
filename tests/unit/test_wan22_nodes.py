"""Wan 2.2 through the nodes (no ComfyUI), on tiny random models in ComfyUI's file layouts:
an A14B expert pair on WanCore Sampler (model + low_noise_model) gives generate_a14b's frames,
TI2V-5B (text and image to video, Wan 2.2 VAE, 48-channel LATENT) gives generate_ti2v's, and
a Wan 2.1 / Wan 2.2 mismatch anywhere in the graph is refused with a message naming the fix."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import factory
import nodepack
import wan22_factory as f22

W, H, F = 64, 32, 5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


@pytest.fixture(scope="module")
def folders(pack, tmp_path_factory):
    """The selftest models plus Wan 2.2 ones: T2V-A14B and I2V-A14B expert pairs (selftest T2V
    widths), TI2V-5B (48 channels) and the Wan 2.2 VAE, ComfyUI single-file layouts."""
    folders = nodepack.selftest_model_folders(pack, tmp_path_factory.mktemp("models"))
    t2v = pack.wan_core.selftest.SELFTEST_CONFIGS["t2v"]
    configs = {"t2v_high": (t2v, 11), "t2v_low": (t2v, 12),
               "i2v_high": (dataclasses.replace(t2v, in_dim=36, model_type="i2v_noclip"), 13),
               "i2v_low": (dataclasses.replace(t2v, in_dim=36, model_type="i2v_noclip"), 14),
               "ti2v": (dataclasses.replace(t2v, in_dim=48, out_dim=48, model_type="ti2v"), 15)}
    for name, (cfg, seed) in configs.items():
        sd = factory.dit_official(cfg, seed)
        save_file({"model.diffusion_model." + k: v.contiguous() for k, v in sd.items()},
                  str(folders["diffusion_models"] / f"wan22_{name}.safetensors"))
    save_file(f22.vae22_official(f22.TINY_VAE22, 3), str(folders["vae"] / "wan2.2_vae_tiny.safetensors"))
    return folders


@pytest.fixture(scope="module")
def models(pack, folders):
    base = nodepack.load_selftest_models(pack, folders)
    n = pack.nodes
    with nodepack.using_folders(folders):
        dits = {name: n.WanCoreLoadDiT().load(f"wan22_{name}.safetensors", "fp32", "sdpa")[0]
                for name in ("t2v_high", "t2v_low", "i2v_high", "i2v_low", "ti2v")}
        vae22 = n.WanCoreLoadVAE().load("wan2.2_vae_tiny.safetensors", "fp32")[0]
    return types.SimpleNamespace(**vars(base), **dits, vae22=vae22)


def _text(pack, models, prompt="a cat walks"):
    return pack.nodes.WanCoreTextEncode().encode(models.te, prompt, "", "t2v")[0]


def _image(seed=1, h=48, w=80):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _decode(pack, vae, latent):
    return pack.nodes.WanCoreDecode().decode(vae, latent, "auto", 512, 64)[0]


def _sampler(models, text, embeds, *, model=None, steps=4, shift=12.0, seed=3, **optional):
    """WanCore Sampler (the high-noise T2V expert unless ``model``); cfg 5, which an expert pair ignores."""
    sampler = nodepack.load_pack().nodes.WanCoreSampler()
    return sampler.sample(model or models.t2v_high, text, embeds, seed=seed, steps=steps, cfg=5.0, shift=shift,
                          sampler="unipc", denoise=1.0, **optional)[0]


def test_loaders_read_the_wan22_models_from_their_tensors(models):
    assert models.t2v_high.model.cfg.model_type == "t2v"
    assert models.i2v_high.model.cfg.model_type == "i2v_noclip"
    assert models.ti2v.model.cfg.out_dim == 48 and models.ti2v.model.cfg.model_type == "ti2v"
    assert models.vae22.config.z_dim == 48 and models.vae22.space_stride == 16


def test_t2v_a14b_pair_on_the_sampler_equals_generate_a14b_and_shows_the_switch(pack, models, caplog):
    n, wc = pack.nodes, pack.wan_core
    text = _text(pack, models)
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    with caplog.at_level(logging.INFO, logger="wan_core"):
        latent = _sampler(models, text, size, low_noise_model=models.t2v_low)
    assert latent["samples"].shape == (1, 16, 2, H // 8, W // 8)
    switch = [r.getMessage() for r in caplog.records if "high-noise expert steps" in r.getMessage()]
    assert switch and "boundary t >= 875" in switch[0] and "the sampler's cfg is not used" in switch[0]
    frames = _decode(pack, models.vae, latent)
    pair = wc.ExpertPair(models.t2v_high.model, models.t2v_low.model)
    ref = wc.generate_a14b(experts=pair, vae=models.vae, text_encoder=models.te, prompt="a cat walks", width=W,
                           height=H, frames=F, steps=4, seed=3)
    # bit for bit (measured: max abs 0.0); swapping the two experts in the node fails this
    torch.testing.assert_close(frames, ref, rtol=0, atol=0)
    # the low-noise expert really ran: the high-noise expert alone gives another video
    alone = _decode(pack, models.vae, _sampler(models, text, size))
    assert (alone - frames).abs().max() > 1e-3


def test_moe_options_default_to_the_published_values_and_replace_them_when_set(pack, models):
    n, wc = pack.nodes, pack.wan_core
    node = n.WanCoreMoEOptions()
    default = node.options(0.0, -1.0, -1.0)[0]
    assert wc.moe_for(models.t2v_high.model.cfg, default.boundary, default.cfg_high_noise,
                      default.cfg_low_noise) == wc.MOE_T2V_A14B
    assert wc.moe_for(models.i2v_high.model.cfg) == wc.MOE_I2V_A14B
    text = _text(pack, models)
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    official = _sampler(models, text, size, low_noise_model=models.t2v_low, moe=default)["samples"]
    plain = _sampler(models, text, size, low_noise_model=models.t2v_low)["samples"]
    assert torch.equal(official, plain)
    custom = node.options(0.5, 1.0, 2.0)[0]
    assert custom == pack.nodes.wan22.MoESettings(0.5, 1.0, 2.0)
    changed = _sampler(models, text, size, low_noise_model=models.t2v_low, moe=custom)["samples"]
    pair = wc.ExpertPair(models.t2v_high.model, models.t2v_low.model)
    emb = wc.TextEmbeds(text.positive, text.negative)
    ref = wc.sample(pair.high, emb, wc.SamplerSettings(steps=4, shift=12.0, seed=3), shape=wc.latent_shape(W, H, F),
                    moe=wc.MoESampling(pair.low, wc.MoEOptions(0.5, cfg_low=2.0, cfg_high=1.0)))
    torch.testing.assert_close(changed, wc.denormalize_latents(ref[None]), rtol=0, atol=0)
    assert node.VALIDATE_INPUTS(0.5, -0.5, 3.0) != True   # noqa: E712  (-1 is the only negative)


def test_i2v_a14b_pair_with_the_wan22_image_encode_equals_generate_a14b(pack, models):
    n, wc = pack.nodes, pack.wan_core
    image = _image()
    embeds = n.WanCoreImageToVideoEncode22().encode(models.vae, image, W, H, F)[0]
    assert isinstance(embeds, wc.ImageEmbeds) and embeds.clip_fea is None and embeds.y.shape[0] == 20
    text = _text(pack, models, "the cat turns")
    latent = _sampler(models, text, embeds, model=models.i2v_high, low_noise_model=models.i2v_low, shift=5.0,
                      steps=3, seed=2)
    pair = wc.ExpertPair(models.i2v_high.model, models.i2v_low.model)
    ref = wc.generate_a14b(experts=pair, vae=models.vae, text_encoder=models.te, prompt="the cat turns",
                           image=image[0], width=W, height=H, frames=F, steps=3, seed=2)
    torch.testing.assert_close(_decode(pack, models.vae, latent), ref, rtol=0, atol=0)


@pytest.mark.parametrize("with_image", [False, True], ids=["t2v", "i2v"])
def test_ti2v_through_the_nodes_equals_generate_ti2v_with_a_wan22_latent(pack, models, with_image):
    n, wc = pack.nodes, pack.wan_core
    image = _image(2) if with_image else None
    if with_image:
        embeds = n.WanCoreImageToVideoEncode22().encode(models.vae22, image, W, H, F)[0]
    else:
        embeds = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    text = _text(pack, models)
    latent = _sampler(models, text, embeds, model=models.ti2v, steps=3, shift=5.0, seed=1)
    # ComfyUI's Wan 2.2 LATENT: raw VAE space [1, 48, T', H/16, W/16]
    assert latent["samples"].shape == (1, 48, 2, H // 16, W // 16)
    frames = _decode(pack, models.vae22, latent)
    ref = wc.generate_ti2v(dit=models.ti2v.model, vae=models.vae22, text_encoder=models.te, prompt="a cat walks",
                           image=None if image is None else image[0], width=W, height=H, frames=F, steps=3,
                           cfg=5.0, shift=5.0, seed=1)
    assert frames.shape == (F, H, W, 3)
    torch.testing.assert_close(frames, ref, rtol=0, atol=0)
    raw = latent["samples"]
    torch.testing.assert_close(wc.denormalize_latents22(wc.normalize_latents22(raw)), raw, rtol=0, atol=1e-5)


def test_wan22_vae_encode_and_decode_nodes_round_trip_48_channels(pack, models):
    frames = torch.rand(F, H, W, 3, generator=torch.Generator().manual_seed(4))
    latent = pack.nodes.WanCoreEncode().encode(models.vae22, frames, "custom", 32, 16)[0]
    assert latent["samples"].shape == (1, 48, 2, H // 16, W // 16)
    out = _decode(pack, models.vae22, latent)
    assert out.shape == (F, H, W, 3)


def test_ti2v_video_to_video_starts_from_a_48_channel_latent(pack, models):
    n, wc = pack.nodes, pack.wan_core
    frames = torch.rand(F, H, W, 3, generator=torch.Generator().manual_seed(5))
    latent = n.WanCoreEncode().encode(models.vae22, frames, "off", 512, 64)[0]
    text = _text(pack, models)
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    sampler = n.WanCoreSampler()
    out = sampler.sample(models.ti2v, text, size, seed=4, steps=4, cfg=5.0, shift=5.0, sampler="unipc", denoise=0.5,
                         latent=latent)[0]["samples"]
    init = wc.normalize_latents22(latent["samples"])[0]
    ref = wc.sample(models.ti2v.model, wc.TextEmbeds(text.positive, text.negative),
                    wc.SamplerSettings(steps=4, cfg=5.0, shift=5.0, seed=4, denoise=0.5), init_latents=init)
    torch.testing.assert_close(wc.normalize_latents22(out)[0], ref, rtol=0, atol=2e-6)   # measured 2.4e-7 (the LATENT round trip)
    with pytest.raises(ValueError, match=r"\[1, 48, T', h, w\]"):
        sampler.sample(models.ti2v, text, size, seed=4, steps=4, cfg=5.0, shift=5.0, sampler="unipc", denoise=0.5,
                       latent={"samples": torch.zeros(1, 16, 2, 4, 8)})


def test_wan21_and_wan22_mismatches_are_refused_with_the_fix(pack, models):
    n = pack.nodes
    text = _text(pack, models)
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    ti2v_image = n.WanCoreImageToVideoEncode22().encode(models.vae22, _image(), W, H, F)[0]
    a14b_image = n.WanCoreImageToVideoEncode22().encode(models.vae, _image(), W, H, F)[0]
    with pytest.raises(ValueError, match="load the TI2V-5B model"):
        _sampler(models, text, ti2v_image, model=models.i2v_high, low_noise_model=models.i2v_low)
    with pytest.raises(ValueError, match="16-channel"):
        _sampler(models, text, a14b_image, model=models.ti2v)
    with pytest.raises(ValueError, match="not the two experts of one Wan 2.2 A14B model"):
        _sampler(models, text, a14b_image, model=models.i2v_high, low_noise_model=models.t2v_low)
    with pytest.raises(ValueError, match="low_noise_model is not"):
        _sampler(models, text, size, moe=n.WanCoreMoEOptions().options(0.0, -1.0, -1.0)[0])
    with pytest.raises(ValueError, match="multiples of 32"):
        _sampler(models, text, n.WanCoreEmptyVideoEmbeds().embeds(48, 32, F)[0], model=models.ti2v)
    with pytest.raises(ValueError, match="image-to-video model"):
        _sampler(models, text, size, model=models.i2v_high, low_noise_model=models.i2v_low)
    for model in (models.ti2v, models.i2v_high):   # the core MODEL bridge is Wan 2.1's
        with pytest.raises(ValueError, match="sample it with WanCore Sampler"):
            n.WanCoreDiTToModel().convert(model, 5.0)
    # a TI2V latent given to the Wan 2.1 VAE (and the reverse): the decode names the right VAE
    with pytest.raises(ValueError, match="Wan 2.2 VAE"):
        _decode(pack, models.vae, {"samples": torch.zeros(1, 48, 2, 2, 4)})
    with pytest.raises(ValueError, match="Wan 2.1 VAE"):
        _decode(pack, models.vae22, {"samples": torch.zeros(1, 16, 2, 4, 8)})


def test_new_wan22_nodes_are_registered_with_tooltips(pack):
    for node_id in ("WanCoreMoEOptions", "WanCoreImageToVideoEncode22"):
        cls = pack.NODE_CLASS_MAPPINGS[node_id]
        assert node_id in pack.NODE_DISPLAY_NAME_MAPPINGS
        assert all(opts.get("tooltip") for _t, opts in cls.INPUT_TYPES()["required"].values())
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert "wancore_pack.nodes.wan22" in sys.modules


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set (a ComfyUI checkout)")
def test_the_latent_spaces_are_comfyuis_wan21_and_wan22_formats(pack):
    """ComfyUI's model-side latents (``LatentFormat.process_in``) are our normalised latents: a
    LATENT we output is read by core nodes as they read their own (measured: max abs 0.0)."""
    spec = importlib.util.spec_from_file_location(
        "comfy_latent_formats", Path(os.environ["COMFYUI_PATH"]) / "comfy" / "latent_formats.py")
    formats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(formats)
    wc = pack.wan_core
    g = torch.Generator().manual_seed(0)
    for fmt, norm, denorm, c in ((formats.Wan21(), wc.normalize_latents, wc.denormalize_latents, 16),
                                 (formats.Wan22(), wc.normalize_latents22, wc.denormalize_latents22, 48)):
        z = torch.randn(1, c, 3, 4, 5, generator=g)
        assert torch.equal(fmt.process_in(z), norm(z)) and torch.equal(fmt.process_out(z), denorm(z))
