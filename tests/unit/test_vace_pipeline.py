"""VACE end to end on tiny random models: sample() with VaceEmbeds (deterministic per seed,
reference frames cut, strength 0 = the plain model, strength limited to a step range) and
generate(control_video=, control_mask=, reference_images=) from a VACE file."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import factory
from vace_factory import TINY_VACE, vace_official, write_vace
from wan_core import SamplerSettings, TextEmbeds, generate, load_dit, load_text_encoder, load_vae, sample
from wan_core.dit import WanDiT
from wan_core.runner import DiTRunner
from wan_core.vace_conditioning import encode_vace

pytestmark = pytest.mark.usefixtures("one_thread")

W, H, FRAMES = 32, 16, 5
SETTINGS = SamplerSettings(steps=3, cfg=5.0, shift=5.0, seed=7)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("vace_models")
    return {
        "vace": load_dit(write_vace(d, "official"), dtype=torch.float32),
        "vae": load_vae(factory.write_checkpoint(d, "vae", "official")),
        "te": load_text_encoder(factory.write_checkpoint(d, "t5", "hf_with_spiece"), dtype=torch.float32),
    }


@pytest.fixture(scope="module")
def text(models):
    pos, neg = models["te"].encode(["a dancer", ""])
    return TextEmbeds(pos, neg)


@pytest.fixture(scope="module")
def embeds(models):
    g = torch.Generator().manual_seed(0)
    return encode_vace(models["vae"], W, H, FRAMES, control_video=torch.rand(FRAMES, H, W, 3, generator=g),
                       control_mask=(torch.rand(FRAMES, H, W, generator=g) > 0.3).float(),
                       reference_images=[torch.rand(20, 20, 3, generator=g)])


def test_sampling_is_deterministic_per_seed_and_cuts_the_reference_frames(models, text, embeds):
    a = sample(models["vace"], text, SETTINGS, vace=embeds)
    assert a.shape == (16, 2, H // 8, W // 8)           # 1 reference + 2 video latent frames -> 2
    assert torch.equal(a, sample(models["vace"], text, SETTINGS, vace=embeds))
    assert not torch.equal(a, sample(models["vace"], text, dataclasses.replace(SETTINGS, seed=8), vace=embeds))
    weaker = sample(models["vace"], text, SETTINGS, vace=embeds.with_strength(0.5))
    assert not torch.equal(a, weaker) and torch.isfinite(weaker).all()


def test_strength_zero_samples_the_plain_t2v_model_bit_for_bit(models, text, embeds):
    base = WanDiT(dataclasses.replace(TINY_VACE, vace_layers=()))
    base.load_state_dict({k: v for k, v in vace_official(TINY_VACE).items() if not k.startswith("vace_")})
    zero = sample(models["vace"], text, SETTINGS, vace=embeds.with_strength(0.0))
    plain = sample(base.eval(), text, SETTINGS, shape=embeds.latent_shape)
    assert torch.equal(zero, embeds.trim(plain))


def test_strength_applies_only_inside_its_step_range(models, text, embeds):
    seen = []

    class Spy(DiTRunner):
        def __call__(self, *args, **kwargs):
            seen.append((self.step, kwargs.get("vace_strength"), args[4] is not None))
            return super().__call__(*args, **kwargs)

    dit = models["vace"]
    sample(dit, text, dataclasses.replace(SETTINGS, steps=4), vace=embeds.with_strength(0.8, 0.5, 1.0),
           runner=Spy(dit))
    assert seen == [(0, None, False)] * 2 + [(1, None, False)] * 2 + [(2, 0.8, True)] * 2 + [(3, 0.8, True)] * 2


def test_vace_needs_a_vace_model(models, text, embeds, tmp_path):
    t2v = load_dit(factory.write_checkpoint(tmp_path, "dit", "official", variant="t2v"), dtype=torch.float32)
    with pytest.raises(ValueError, match="VACE model"):
        sample(t2v, text, SETTINGS, vace=embeds)
    with pytest.raises(ValueError, match="VACE model"):
        generate(dit=t2v, vae=models["vae"], text_encoder=models["te"], prompt="x", width=W, height=H, frames=FRAMES,
                 steps=1, control_video=torch.rand(FRAMES, H, W, 3))


def test_generate_takes_control_video_mask_and_reference_images(models):
    g = torch.Generator().manual_seed(1)
    control = torch.rand(FRAMES, H, W, 3, generator=g)
    common = dict(dit=models["vace"], vae=models["vae"], text_encoder=models["te"], prompt="a dancer", steps=2,
                  seed=3, control_video=control, control_mask=torch.ones(FRAMES, H, W),
                  reference_images=[torch.rand(H, W, 3, generator=g)])
    video = generate(**common)                      # size and frame count from the control video
    assert video.shape == (FRAMES, H, W, 3) and torch.isfinite(video).all()
    assert torch.equal(video, generate(**common))
    plain = generate(dit=models["vace"], vae=models["vae"], text_encoder=models["te"], prompt="a dancer", steps=2,
                     seed=3, width=W, height=H, frames=FRAMES)      # the official no-control context
    assert plain.shape == video.shape and not torch.equal(plain, video)
