"""Fun Control / InP end to end on tiny random models: sample(fun=...) deterministic per seed,
the V1.1 reference reaching every model call, generate() from Fun files (the model kind decides
VACE vs Fun), WanCore Fun Control Encode + WanCore Sampler = the engine, bad inputs refused."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import factory
import nodepack
import tiny
from wan_core import (SamplerSettings, TextEmbeds, encode_fun_control, encode_fun_inpaint, generate, load_clip_vision,
                      load_dit, load_text_encoder, load_vae, sample)
from wan_core.runner import DiTRunner

pytestmark = pytest.mark.usefixtures("one_thread")

W, H, FRAMES = 32, 16, 5
SETTINGS = SamplerSettings(steps=2, cfg=5.0, shift=5.0, seed=7)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fun_models")
    return {"control": factory.write_checkpoint(d, "dit", "official", cfg=tiny.TINY_DIT_FUN_CONTROL,
                                                name="c.safetensors"),
            "ref": factory.write_checkpoint(d, "dit", "comfy_prefixed", cfg=tiny.TINY_DIT_FUN_CONTROL_REF,
                                            name="cref.safetensors"),
            "inp": factory.write_checkpoint(d, "dit", "official", variant="i2v"),
            "vae": factory.write_checkpoint(d, "vae", "official"),
            "te": factory.write_checkpoint(d, "t5", "hf_with_spiece"),
            "clip": factory.write_checkpoint(d, "clip", "hf")}


@pytest.fixture(scope="module")
def models(files):
    return {"control": load_dit(files["control"], dtype=torch.float32),
            "ref": load_dit(files["ref"], dtype=torch.float32),
            "inp": load_dit(files["inp"], dtype=torch.float32),
            "vae": load_vae(files["vae"]),
            "te": load_text_encoder(files["te"], dtype=torch.float32),
            "clip": load_clip_vision(files["clip"], dtype=torch.float32)}


@pytest.fixture(scope="module")
def text(models):
    return TextEmbeds(*models["te"].encode(["a dancer", ""]))


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def embeds(models):
    return encode_fun_control(models["vae"], W, H, FRAMES, control_video=_rand(FRAMES, H, W, 3, seed=1),
                              start_image=_rand(H, W, 3, seed=2), reference_image=_rand(H, W, 3, seed=3),
                              clip_vision=models["clip"])


def test_sampling_is_deterministic_per_seed_and_uses_every_input(models, text, embeds):
    dit = models["ref"]
    a = sample(dit, text, SETTINGS, fun=embeds)
    assert a.shape == (16, 2, H // 8, W // 8) and torch.isfinite(a).all()
    assert torch.equal(a, sample(dit, text, SETTINGS, fun=embeds))
    assert not torch.equal(a, sample(dit, text, dataclasses.replace(SETTINGS, seed=8), fun=embeds))
    for change in ({"reference": None}, {"clip_fea": None}, {"y": torch.zeros_like(embeds.y)}):
        assert not torch.equal(a, sample(dit, text, SETTINGS, fun=dataclasses.replace(embeds, **change))), change


def test_the_reference_reaches_every_model_call_and_zeros_replace_a_missing_one(models, text, embeds):
    seen = []

    class Spy(DiTRunner):
        def __call__(self, *args, **kwargs):
            seen.append(kwargs.get("full_ref"))
            return super().__call__(*args, **kwargs)

    dit = models["ref"]
    sample(dit, text, SETTINGS, fun=dataclasses.replace(embeds, reference=None), runner=Spy(dit))
    assert len(seen) == 4 and all(r is not None and r.abs().max() == 0 and r.shape == (1, 16, 2, 4) for r in seen)
    seen.clear()
    v10 = models["control"]
    sample(v10, text, SETTINGS, fun=dataclasses.replace(embeds, reference=None), runner=Spy(v10))
    assert seen == [None] * 4           # a V1.0 model is called exactly as before


def test_generate_runs_fun_control_from_files_with_the_control_video_size(files, models):
    common = dict(dit=files["ref"], vae=models["vae"], text_encoder=models["te"], clip_vision=models["clip"],
                  prompt="a dancer", steps=2, seed=3, control_video=_rand(FRAMES, H, W, 3, seed=4),
                  image=_rand(24, 40, 3, seed=5), reference_images=[_rand(H, W, 3, seed=6)])
    video = generate(**common)
    assert video.shape == (FRAMES, H, W, 3) and torch.isfinite(video).all()
    assert torch.equal(video, generate(**common))
    loaded = generate(**{**common, "dit": models["ref"]})
    assert torch.equal(video, loaded)                 # a path and a loaded model give the same frames
    no_image = generate(dit=models["control"], vae=models["vae"], text_encoder=models["te"], prompt="a dancer",
                        steps=2, seed=3, control_video=common["control_video"])   # no CLIP vision needed
    assert no_image.shape == video.shape


def test_generate_defaults_follow_videox_fun(models, monkeypatch):
    import wan_core.pipeline as pipeline

    seen = {}

    def spy(dit, text, settings, **kwargs):
        seen["settings"], seen["fun"] = settings, kwargs.get("fun")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "sample", spy)
    with pytest.raises(KeyboardInterrupt):
        generate(dit=models["control"], vae=models["vae"], text_encoder=models["te"], prompt="x", width=W, height=H,
                 frames=FRAMES)
    assert (seen["settings"].steps, seen["settings"].cfg, seen["settings"].shift) == (50, 6.0, 3.0)
    assert seen["fun"] is not None and seen["fun"].latent_shape == (16, 2, H // 8, W // 8)


def test_generate_fun_inp_with_first_and_last_frame(models):
    start, end = _rand(H, W, 3, seed=7), _rand(H, W, 3, seed=8)
    common = dict(dit=models["inp"], vae=models["vae"], text_encoder=models["te"], clip_vision=models["clip"],
                  prompt="x", width=W, height=H, frames=FRAMES, steps=2, seed=1, image=start)
    flf = generate(**common, end_image=end)
    assert flf.shape == (FRAMES, H, W, 3) and not torch.equal(flf, generate(**common))
    # = the engine's pieces: encode_fun_inpaint (start image CLIP only) + sample, decoded
    text = TextEmbeds(*models["te"].encode(["x", ""]))
    embeds = encode_fun_inpaint(models["vae"], W, H, FRAMES, image=start, end_image=end, clip_vision=models["clip"])
    assert embeds.clip_fea.shape == (tiny.TINY_CLIP.num_tokens, tiny.TINY_CLIP.width)
    settings = SamplerSettings(steps=2, cfg=5.0, shift=3.0, seed=1)
    from wan_core import NEGATIVE_PROMPT_I2V

    text = TextEmbeds(*models["te"].encode(["x", NEGATIVE_PROMPT_I2V]))
    latents = sample(models["inp"], text, settings, image=embeds)
    frames = models["vae"].decode(latents[None])[0].add(1).div(2).clamp(0, 1).permute(1, 2, 3, 0)
    torch.testing.assert_close(flf, frames, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"control_mask": torch.ones(FRAMES, H, W)}, "takes no control_mask"),
    ({"reference_images": [torch.rand(H, W, 3)]}, "no reference image \\(a Fun V1.1 Control model takes one\\)"),
    ({"end_image": torch.rand(H, W, 3), "image": torch.rand(H, W, 3)}, "Fun Control model: it takes no end image"),
    ({"image": torch.rand(H, W, 3)}, "needs clip_vision"),
    ({"control_video": torch.rand(3, H, W, 3), "width": W, "height": H, "frames": FRAMES}, "control_video is 3 frames"),
])
def test_bad_fun_control_arguments_are_refused(models, kwargs, message):
    args = dict(dit=models["control"], vae=models["vae"], text_encoder=models["te"], prompt="x", steps=1,
                **({"width": W, "height": H, "frames": FRAMES} if "control_video" not in kwargs else {}))
    with pytest.raises(ValueError, match=message):
        generate(**{**args, **kwargs})


def test_fun_control_node_and_sampler_give_the_engine_numbers(models, text, embeds):
    pack = nodepack.load_pack()
    wc = pack.wan_core
    video, start, ref = (_rand(FRAMES, H, W, 3, seed=1), _rand(1, H, W, 3, seed=2), _rand(1, H, W, 3, seed=3))
    node_embeds = pack.nodes.WanCoreFunControlEncode().encode(models["vae"], W, H, FRAMES, control_video=video,
                                                              start_image=start, reference_image=ref,
                                                              clip_vision=models["clip"])[0]
    assert torch.equal(node_embeds.y, embeds.y) and torch.equal(node_embeds.reference, embeds.reference)
    loaded = pack.nodes.types.LoadedDiT(models["ref"])
    latent = pack.nodes.WanCoreSampler().sample(loaded, text, node_embeds, seed=7, steps=2, cfg=5.0, shift=5.0,
                                                sampler="unipc", denoise=1.0)[0]["samples"]
    expected = sample(models["ref"], text, SETTINGS, fun=embeds)
    assert torch.equal(latent, wc.denormalize_latents(expected[None]))
    with pytest.raises(ValueError, match="Fun Control model.*WanCore Fun Control Encode"):
        pack.nodes.WanCoreSampler().sample(loaded, text, pack.nodes.types.VideoSize(W, H, FRAMES), seed=7, steps=1,
                                           cfg=5.0, shift=5.0, sampler="unipc", denoise=1.0)


def test_block_swap_is_bit_identical_and_context_windows_give_each_window_the_reference(models, text):
    from wan_core import BlockSwap, ContextOptions

    dit = models["ref"]
    frames = 13                                  # 4 latent frames: windows of 2 overlapping by 1
    fun = encode_fun_control(models["vae"], W, H, frames, control_video=_rand(frames, H, W, 3, seed=9))
    plain = sample(dit, text, SETTINGS, fun=fun)
    swap = BlockSwap(1, "cpu").setup(dit)
    try:
        swapped = sample(dit, text, SETTINGS, fun=fun, runner=DiTRunner(dit, executor=swap))
    finally:
        swap.release()
    assert torch.equal(plain, swapped)
    seen = []

    class Spy(DiTRunner):
        def __call__(self, x, *args, **kwargs):
            seen.append((x.shape[2], kwargs.get("full_ref") is not None))
            return super().__call__(x, *args, **kwargs)

    windows = ContextOptions(context_frames=5, overlap=4)
    out = sample(dit, text, SETTINGS, fun=fun, context=windows, runner=Spy(dit))
    assert out.shape == plain.shape and torch.isfinite(out).all() and not torch.equal(out, plain)
    assert seen and all(frames_in == 2 and has_ref for frames_in, has_ref in seen)
