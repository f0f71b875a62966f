"""TI2V-5B sampling on a tiny 48-channel DiT: text-to-video, and image-to-video with the
first latent frame pinned to the image latents at timestep 0 (official masks_like / temp_ts)."""
from __future__ import annotations


import pytest
import torch

import factory
import tiny
import wan22_factory as f22
from wan_core.conditioning import TextEmbeds
from wan_core.dit import WanDiT
from wan_core.pipeline import SamplerSettings, sample
from wan_core.runner import DiTRunner
from wan_core.ti2v import (FirstFrameRunner, encode_ti2v_image, first_frame_timesteps, ti2v_latent_shape)
from wan_core.vae22 import WanVAE22

pytestmark = pytest.mark.usefixtures("one_thread")
TI2V = tiny.TINY_DIT_TI2V


@pytest.fixture(scope="module")
def dit():
    return tiny.built(WanDiT, TI2V, factory.dit_official(TI2V, 4))


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(1)
    return TextEmbeds(torch.randn(5, TI2V.text_dim, generator=g), torch.randn(2, TI2V.text_dim, generator=g))


def test_latent_shape_and_size_rules():
    assert ti2v_latent_shape(1280, 704, 121) == (48, 31, 44, 80)
    with pytest.raises(ValueError, match="multiples of 32"):
        ti2v_latent_shape(1280, 720, 121)


def test_first_frame_tokens_get_timestep_zero():
    """Independent construction: the official mask (ones, latent frame 0 zeroed) at the
    patch grid ``[:, ::2, ::2]``, flattened, times t."""
    f, h, w = 3, 4, 6
    mask = torch.ones(48, f, 2 * h, 2 * w)
    mask[:, 0] = 0
    want = (mask[0][:, ::2, ::2] * 700.0).flatten()[None]
    assert torch.equal(first_frame_timesteps(torch.tensor([700.0]), (f, h, w)), want)


def test_text_to_video_runs_on_48_channels(dit, text):
    out = sample(dit, text, SamplerSettings(steps=3, seed=1), shape=(48, 2, 4, 6))
    assert out.shape == (48, 2, 4, 6) and torch.isfinite(out).all()


def test_image_to_video_pins_the_first_frame_at_timestep_zero(dit, text):
    z = torch.randn(48, 1, 4, 6, generator=torch.Generator().manual_seed(3))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Spy(DiTRunner):
        def __call__(self, x, t, *a, **k):
            seen.append((x[:, :, :1].clone(), t.clone()))
            return super().__call__(x, t, *a, **k)

    runner = FirstFrameRunner(Spy(dit), z)
    out = sample(dit, text, SamplerSettings(steps=4, seed=2), shape=(48, 3, 4, 6), runner=runner, known_latents=z)
    assert (out[:, :1] - z).abs().max() < 1e-5
    assert len(seen) == 8   # 4 steps x (cond, uncond)
    for first, t in seen:
        assert torch.equal(first[0], z)
        assert t.shape == (1, 3 * 2 * 3) and torch.all(t[0, :6] == 0) and torch.all(t[0, 6:] > 0)
    plain = sample(dit, text, SamplerSettings(steps=4, seed=2), shape=(48, 3, 4, 6))
    assert (plain[:, 1:] - out[:, 1:]).abs().max() > 1e-3   # the image really conditions the rest


def test_image_latents_come_from_the_wan22_vae(tiny_vae):
    vae = tiny.built(WanVAE22, f22.TINY_VAE22, f22.vae22_official(f22.TINY_VAE22, 0))
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = encode_ti2v_image(vae, image)
    assert z.shape == (48, 1, 4, 6)
    with pytest.raises(ValueError, match="Wan 2.2 VAE"):
        encode_ti2v_image(tiny_vae, image)


def test_image_to_video_end_to_end_with_the_wan22_vae(dit, text):
    """Image -> Wan 2.2 VAE latents -> TI2V sampling -> Wan 2.2 VAE decode: 5 frames at 16x."""
    vae = tiny.built(WanVAE22, f22.TINY_VAE22, f22.vae22_official(f22.TINY_VAE22, 1))
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(5)) * 2 - 1
    z = encode_ti2v_image(vae, image)
    shape = ti2v_latent_shape(96, 64, 5)
    latents = sample(dit, text, SamplerSettings(steps=3, seed=4), shape=shape,
                     runner=FirstFrameRunner(DiTRunner(dit), z), known_latents=z)
    video = vae.decode(latents[None])
    assert video.shape == (1, 3, 5, 64, 96) and torch.isfinite(video).all()
    # the first frame is the image's own reconstruction (its latents came back unchanged)
    assert (video[:, :, :1] - vae.decode(z[None])).abs().max() < 1e-4
