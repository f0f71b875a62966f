"""The nodes called directly on tiny random models (no ComfyUI): same numbers as wan_core.

``folder_paths`` is a stub listing a temporary model folder; ``comfy.utils`` /
``comfy.model_management`` stubs record progress ticks and deliver an interrupt.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

import nodepack

W, H, F, STEPS = 32, 32, 5, 2
SETTINGS = dict(seed=7, steps=STEPS, cfg=5.0, shift=5.0, sampler="unipc", denoise=1.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster than a busy pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


@pytest.fixture(scope="module")
def model_dir(pack, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = pack.wan_core.selftest.write_selftest_models(root / "all")
    folders = {k: root / k for k in ("diffusion_models", "vae", "text_encoders", "clip_vision")}
    for folder in folders.values():
        folder.mkdir()
    for key, path in (("diffusion_models", paths.dit_t2v), ("diffusion_models", paths.dit_i2v),
                      ("vae", paths.vae), ("text_encoders", paths.text_encoder), ("clip_vision", paths.clip_vision)):
        path.rename(folders[key] / path.name)
    return folders


@pytest.fixture()
def folder_paths(monkeypatch, model_dir):
    monkeypatch.setitem(sys.modules, "folder_paths", nodepack.fake_folder_paths(model_dir))


@pytest.fixture(scope="module")
def models(pack, model_dir):
    n = pack.nodes
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "folder_paths", nodepack.fake_folder_paths(model_dir))
    try:
        return types.SimpleNamespace(
            t2v=n.WanCoreLoadDiT().load("wan_tiny_t2v.safetensors", "fp32", "sdpa")[0],
            i2v=n.WanCoreLoadDiT().load("wan_tiny_i2v.safetensors", "fp32", "sdpa")[0],
            vae=n.WanCoreLoadVAE().load("wan_tiny_vae.safetensors", "fp32")[0],
            te=n.WanCoreLoadTextEncoder().load("umt5_tiny.safetensors", "fp32")[0],
            clip=n.WanCoreLoadCLIPVision().load("clip_vision_tiny.safetensors", "fp32")[0])
    finally:
        mp.undo()


def _decode(pack, models, latent):
    return pack.nodes.WanCoreDecode().decode(models.vae, latent, "auto", 512, 64)[0]


def test_loaders_list_the_model_folders_and_load_each_kind(pack, folder_paths, models):
    spec = pack.nodes.WanCoreLoadDiT.INPUT_TYPES()["required"]["model_name"][0]
    assert spec == ["wan_tiny_i2v.safetensors", "wan_tiny_t2v.safetensors"]
    assert models.t2v.cfg.model_type == "t2v" and models.i2v.cfg.model_type == "i2v"
    with pytest.raises(FileNotFoundError, match="models/vae"):
        pack.nodes.WanCoreLoadVAE().load("missing.safetensors", "fp32")


def test_t2v_nodes_give_the_same_frames_as_generate(pack, models):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "a cat walks", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    latent = n.WanCoreSampler().sample(models.t2v, text, size, **SETTINGS)[0]
    assert latent["samples"].shape == (1, 16, 2, H // 8, W // 8) and latent["samples"].dtype == torch.float32
    frames = _decode(pack, models, latent)
    ref = pack.wan_core.generate(dit=models.t2v, vae=models.vae, text_encoder=models.te, prompt="a cat walks",
                                 width=W, height=H, frames=F, **SETTINGS)
    assert frames.shape == (F, H, W, 3) and frames.dtype == torch.float32 and frames.device.type == "cpu"
    assert torch.equal(frames, ref)


def test_latent_output_is_raw_vae_space_as_comfyui_wan21(pack, models):
    n, wc = pack.nodes, pack.wan_core
    text = n.WanCoreTextEncode().encode(models.te, "a dog", "blurry", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    raw = n.WanCoreSampler().sample(models.t2v, text, size, **SETTINGS)[0]["samples"]
    settings = wc.SamplerSettings(**{k: v for k, v in SETTINGS.items()})
    normalised = wc.sample(models.t2v, text, settings, shape=wc.latent_shape(W, H, F))
    torch.testing.assert_close(wc.vae.normalize_latents(raw)[0], normalised, rtol=0, atol=1e-5)
    mean = torch.tensor(wc.configs.VAE_LATENT_MEAN).view(16, 1, 1, 1)
    std = torch.tensor(wc.configs.VAE_LATENT_STD).view(16, 1, 1, 1)
    assert torch.equal(raw[0], normalised * std + mean)


def test_empty_negative_prompt_is_the_official_default_of_the_model_type(pack, models):
    n, wc = pack.nodes, pack.wan_core
    for kind, default in (("t2v", wc.NEGATIVE_PROMPT), ("i2v", wc.NEGATIVE_PROMPT_I2V),
                          ("flf2v", wc.NEGATIVE_PROMPT_FLF2V)):
        implicit = n.WanCoreTextEncode().encode(models.te, "a cat", "", kind)[0]
        explicit = n.WanCoreTextEncode().encode(models.te, "a cat", default, kind)[0]
        assert torch.equal(implicit.negative, explicit.negative)


def test_i2v_nodes_give_the_same_frames_as_generate(pack, models):
    n = pack.nodes
    image = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(1))
    text = n.WanCoreTextEncode().encode(models.te, "the cat turns", "", "i2v")[0]
    embeds = n.WanCoreImageToVideoEncode().encode(models.vae, models.clip, image, W, H, F)[0]
    frames = _decode(pack, models, n.WanCoreSampler().sample(models.i2v, text, embeds, **SETTINGS)[0])
    ref = pack.wan_core.generate(dit=models.i2v, vae=models.vae, text_encoder=models.te, clip_vision=models.clip,
                                 image=image[0], prompt="the cat turns", width=W, height=H, frames=F, **SETTINGS)
    assert torch.equal(frames, ref)


def test_v2v_encode_and_partial_denoise_give_the_same_frames_as_generate(pack, models):
    n = pack.nodes
    video = torch.rand(F, H, W, 3, generator=torch.Generator().manual_seed(2))
    latent = n.WanCoreEncode().encode(models.vae, video, "auto", 512, 64)[0]
    assert latent["samples"].shape == (1, 16, 2, H // 8, W // 8)
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    v2v = dict(SETTINGS, denoise=0.5, steps=4)
    frames = _decode(pack, models, n.WanCoreSampler().sample(models.t2v, text, size, latent=latent, **v2v)[0])
    ref = pack.wan_core.generate(dit=models.t2v, vae=models.vae, text_encoder=models.te, prompt="a cat",
                                 video=video, **v2v)
    assert torch.equal(frames, ref)
    bigger = n.WanCoreEmptyVideoEmbeds().embeds(W * 2, H, F)[0]
    with pytest.raises(ValueError, match="input latent is 32x32, 5 frames but video_embeds say 64x32"):
        n.WanCoreSampler().sample(models.t2v, text, bigger, latent=latent, **v2v)


def test_custom_tiling_passes_tile_and_overlap_in_latent_pixels(pack, models):
    n, tiling = pack.nodes, pack.wan_core.vae_tiling
    z = {"samples": torch.randn(1, 16, 1, 6, 6, generator=torch.Generator().manual_seed(3))}
    tiled = n.WanCoreDecode().decode(models.vae, z, "custom", 32, 16)[0]
    ref = tiling.decode_tiled(models.vae, z["samples"], normalized=False, tile=4, overlap=2)
    assert tiled.shape == (1, 48, 48, 3)
    assert torch.equal(tiled, ref.float().add(1).div(2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1))
    whole = n.WanCoreDecode().decode(models.vae, z, "off", 512, 64)[0]
    assert not torch.equal(tiled, whole)


def test_model_and_embeds_mismatches_are_refused_with_clear_errors(pack, models):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "x", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    image = torch.rand(1, 32, 32, 3)
    embeds = n.WanCoreImageToVideoEncode().encode(models.vae, models.clip, image, W, H, F)[0]
    with pytest.raises(ValueError, match="text-to-video model.*Image To Video Encode"):
        n.WanCoreSampler().sample(models.t2v, text, embeds, **SETTINGS)
    with pytest.raises(ValueError, match="image-to-video model.*start image"):
        n.WanCoreSampler().sample(models.i2v, text, size, **SETTINGS)
    flf = n.WanCoreImageToVideoEncode().encode(models.vae, models.clip, image, W, H, F, end_image=image)[0]
    with pytest.raises(ValueError, match="FLF2V"):
        n.WanCoreSampler().sample(models.i2v, text, flf, **SETTINGS)
    with pytest.raises(ValueError, match="frames 80"):
        n.WanCoreEmptyVideoEmbeds().embeds(W, H, 80)


class _Interrupted(Exception):
    pass


def test_progress_ticks_every_step_and_an_interrupt_stops_sampling_without_harm(pack, models, monkeypatch):
    n = pack.nodes
    ticks, checks = [], {"n": 0, "stop_at": None}

    class Bar:
        def __init__(self, total, node_id=None):
            self.node_id = node_id

        def update_absolute(self, value, total=None, preview=None):
            ticks.append((self.node_id, value, total))

    def throw():
        checks["n"] += 1
        if checks["stop_at"] is not None and checks["n"] >= checks["stop_at"]:
            raise _Interrupted()

    mm = types.SimpleNamespace(get_torch_device=lambda: torch.device("cpu"),
                               unet_offload_device=lambda: torch.device("cpu"), unload_all_models=lambda: None,
                               soft_empty_cache=lambda: None, throw_exception_if_processing_interrupted=throw)
    monkeypatch.setitem(sys.modules, "comfy.utils", types.SimpleNamespace(ProgressBar=Bar))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    settings = dict(SETTINGS, steps=3)
    first = n.WanCoreSampler().sample(models.t2v, text, size, unique_id="9", **settings)[0]["samples"]
    assert ticks == [("9", 1, 3), ("9", 2, 3), ("9", 3, 3)]
    assert checks["n"] >= 3
    checks.update(n=0, stop_at=2)
    with pytest.raises(_Interrupted):
        n.WanCoreSampler().sample(models.t2v, text, size, unique_id="9", **settings)
    checks.update(stop_at=None)
    again = n.WanCoreSampler().sample(models.t2v, text, size, unique_id="9", **settings)[0]["samples"]
    assert torch.equal(first, again)
