"""The whole Wan 2.2 job in one call on tiny models: T2V-A14B and I2V-A14B (two experts,
one on the device at a time) and TI2V-5B (T2V and I2V with the Wan 2.2 VAE) equal their
stages composed by hand."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import factory
import tiny
import wan22_factory as f22
from wan_core.conditioning import NEGATIVE_PROMPT, TextEmbeds, image_to_tensor, latent_shape
from wan_core.conditioning22 import encode_image_latents
from wan_core.dit import WanDiT
from wan_core.generate22 import generate_a14b, generate_ti2v
from wan_core.loaders import load_text_encoder
from wan_core.moe import MOE_I2V_A14B, MOE_T2V_A14B, ExpertPair, MoESampling
from wan_core.pipeline import SamplerSettings, frames_from_video, sample
from wan_core.ti2v import FirstFrameRunner, encode_ti2v_image
from wan_core.runner import DiTRunner
from wan_core.vae22 import WanVAE22

pytestmark = pytest.mark.usefixtures("one_thread")
W, H, FRAMES = 48, 32, 5


def _dit(cfg, seed):
    return tiny.built(WanDiT, cfg, factory.dit_official(cfg, seed))


@pytest.fixture(scope="module")
def te(tmp_path_factory):
    d = tmp_path_factory.mktemp("te")
    return load_text_encoder(factory.write_checkpoint(d, "t5", "hf_with_spiece"), dtype=torch.float32)


def _text(te, prompt):
    pos, neg = te.encode([prompt, NEGATIVE_PROMPT])
    return TextEmbeds(pos.float(), neg.float())


def test_t2v_a14b_equals_the_stages_by_hand(te, tiny_vae):
    pair = ExpertPair(_dit(tiny.TINY_DIT_T2V, 1), _dit(tiny.TINY_DIT_T2V, 2))
    got = generate_a14b(experts=pair, vae=tiny_vae, text_encoder=te, prompt="a cat", width=W, height=H,
                        frames=FRAMES, steps=4, seed=3)
    latents = sample(pair.high, _text(te, "a cat"), SamplerSettings(steps=4, shift=12.0, seed=3),
                     shape=latent_shape(W, H, FRAMES), moe=MoESampling(pair.low, MOE_T2V_A14B))
    assert torch.equal(got, frames_from_video(tiny_vae.decode(latents[None])))


def test_i2v_a14b_equals_the_stages_by_hand(te, tiny_vae):
    cfg = dataclasses.replace(tiny.TINY_DIT_I2V, model_type="i2v_noclip")
    pair = ExpertPair(_dit(cfg, 1), _dit(cfg, 2))
    image = torch.rand(32, 48, 3, generator=torch.Generator().manual_seed(1))
    got = generate_a14b(experts=pair, vae=tiny_vae, text_encoder=te, prompt="a cat", image=image, width=W,
                        height=H, frames=FRAMES, steps=3, seed=2)
    emb = encode_image_latents(tiny_vae, image_to_tensor(image), FRAMES, W, H)
    latents = sample(pair.high, _text(te, "a cat"), SamplerSettings(steps=3, shift=5.0, seed=2), image=emb,
                     moe=MoESampling(pair.low, MOE_I2V_A14B))
    assert torch.equal(got, frames_from_video(tiny_vae.decode(latents[None])))
    with pytest.raises(ValueError, match="needs image"):
        generate_a14b(experts=pair, vae=tiny_vae, text_encoder=te, prompt="a cat", width=W, height=H, frames=5)


@pytest.mark.parametrize("with_image", [False, True])
def test_ti2v_equals_the_stages_by_hand(te, with_image):
    cfg = tiny.TINY_DIT_TI2V
    dit = _dit(cfg, 3)
    vae = tiny.built(WanVAE22, f22.TINY_VAE22, f22.vae22_official(f22.TINY_VAE22, 1))
    image = torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(2)) if with_image else None
    got = generate_ti2v(dit=dit, vae=vae, text_encoder=te, prompt="a cat", image=image, width=96, height=64,
                        frames=FRAMES, steps=3, seed=1)
    assert got.shape == (FRAMES, 64, 96, 3)
    settings = SamplerSettings(steps=3, cfg=5.0, shift=5.0, seed=1)
    runner, z = None, None
    if with_image:
        z = encode_ti2v_image(vae, image_to_tensor(image))
        runner = FirstFrameRunner(DiTRunner(dit), z)
    latents = sample(dit, _text(te, "a cat"), settings, shape=(48, 2, 4, 6), runner=runner, known_latents=z)
    assert torch.equal(got, frames_from_video(vae.decode(latents[None])))


def test_ti2v_image_to_video_takes_the_official_size_and_crop(te):
    from wan_core.ti2v import fit_image, ti2v_size

    cfg = tiny.TINY_DIT_TI2V
    dit = _dit(cfg, 3)
    vae = tiny.built(WanVAE22, f22.TINY_VAE22, f22.vae22_official(f22.TINY_VAE22, 1))
    image = torch.randint(0, 256, (40, 72, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    assert ti2v_size(72, 40, 2048) == (64, 32)                    # official best_output_size, steps of 32
    got = generate_ti2v(dit=dit, vae=vae, text_encoder=te, prompt="a cat", image=image, max_area=2048,
                        frames=FRAMES, steps=2, seed=1)
    assert got.shape == (FRAMES, 32, 64, 3)
    z = encode_ti2v_image(vae, fit_image(image, 64, 32))         # Lanczos to cover 64x32, center crop
    latents = sample(dit, _text(te, "a cat"), SamplerSettings(steps=2, cfg=5.0, shift=5.0, seed=1), shape=(48, 2, 2, 4),
                     runner=FirstFrameRunner(DiTRunner(dit), z), known_latents=z)
    assert torch.equal(got, frames_from_video(vae.decode(latents[None])))
    with pytest.raises(ValueError, match="give both width and height"):
        generate_ti2v(dit=dit, vae=vae, text_encoder=te, prompt="a cat", image=image, width=64)
