"""NaN/Inf never reach the video: every guard raises NonFiniteError with the stage and a likely cause.

Guards: the run's inputs (text embeddings, image conditioning, V2V latents, images), the guided
prediction of every step (not only each branch), the sampler's final latents, and every chunk
the VAE decodes (tiled or not) or encodes. With finite values they change nothing.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import factory
import tiny
from wan_core import (ImageEmbeds, NonFiniteError, SamplerSettings, TextEmbeds, decode_tiled, encode_image_conditioning,
                      generate, latent_shape, load_clip_vision, load_dit, load_text_encoder, load_vae, sample)

W, H, FRAMES = 64, 64, 5      # 2 x 4 x 4 = 32 tokens (see test_nan_in_a_query_weight_after_load_is_caught)
SHAPE = latent_shape(W, H, FRAMES)
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("nonfinite")
    return {"t2v": factory.write_checkpoint(d, "dit", "official", variant="t2v"),
            "i2v": factory.write_checkpoint(d, "dit", "official", variant="i2v"),
            "vae": factory.write_checkpoint(d, "vae", "official"),
            "clip": factory.write_checkpoint(d, "clip", "hf"),
            "t5": factory.write_checkpoint(d, "t5", "hf_with_spiece")}


def _restored(module):
    """The module, with its weights put back after the test (tests plant NaN/Inf in them)."""
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    yield module
    module.load_state_dict(saved)


@pytest.fixture(scope="module")
def _dit(files):
    return load_dit(files["t2v"], dtype=torch.float32)


@pytest.fixture(scope="module")
def _vae(files):
    return load_vae(files["vae"])


@pytest.fixture()
def dit(_dit):
    yield from _restored(_dit)


@pytest.fixture()
def vae(_vae):
    yield from _restored(_vae)


def _text(seed: int = 0) -> TextEmbeds:
    g = torch.Generator().manual_seed(seed)
    return TextEmbeds(torch.randn(5, tiny.TINY_T5.dim, generator=g), torch.randn(3, tiny.TINY_T5.dim, generator=g))


def _unchecked(settings: SamplerSettings, **values) -> SamplerSettings:
    """Settings with values the constructor refuses, to reach the runtime guard behind it."""
    settings = dataclasses.replace(settings)
    for name, value in values.items():
        object.__setattr__(settings, name, value)
    return settings


# -- guidance and sampler ---------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [NAN, INF, -INF])
def test_non_finite_cfg_is_refused_before_sampling(cfg) -> None:
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        SamplerSettings(steps=1, cfg=cfg)


@pytest.mark.parametrize("shift", [NAN, INF])
def test_non_finite_shift_is_refused_before_sampling(shift) -> None:
    with pytest.raises(ValueError, match="shift must be a finite number"):
        SamplerSettings(steps=1, shift=shift)


@pytest.mark.parametrize(("cfg", "sampler"), [(NAN, "unipc"), (INF, "euler"), (NAN, "dpm++")])
def test_non_finite_guidance_with_one_step_is_caught_on_the_guided_prediction(dit, cfg, sampler) -> None:
    # both branches are finite: only the guided prediction shows the NaN
    settings = _unchecked(SamplerSettings(steps=1, sampler=sampler), cfg=cfg)
    with pytest.raises(NonFiniteError, match=r"step 1/1: the guided prediction of .* \(cfg (nan|inf)\) contains "
                                             r"NaN/Inf although both branches are finite"):
        sample(dit, _text(), settings, shape=SHAPE)


def test_nan_in_the_dit_head_weight_names_the_branch_step_and_weight(dit) -> None:
    dit.head.head.weight.data[0, 0] = NAN
    with pytest.raises(NonFiniteError, match=r"step 1/2: the conditional prediction .* Likely cause: the DiT weights "
                                             r"hold NaN/Inf \(head\.head\.weight\)"):
        sample(dit, _text(), SamplerSettings(steps=2), shape=SHAPE)


@pytest.mark.parametrize("name", ["blocks.0.self_attn.q.weight", "blocks.1.self_attn.k.weight",
                                  "blocks.0.cross_attn.q.weight", "blocks.1.ffn.0.weight"])
def test_nan_in_a_query_weight_after_load_is_caught(dit, name) -> None:
    # PyTorch's CPU flash-attention kernel returns zeros (finite garbage) for NaN queries when a
    # sequence has fewer than 16 tokens; from 16 on it gives NaN, so the step guard sees it. This
    # run has 32 tokens; Wan's smallest real run (480p, 1 frame) has 1560.
    dict(dit.named_parameters())[name].data[3, 5] = NAN
    with pytest.raises(NonFiniteError, match=f"step 1/1: the conditional prediction .*{name}"):
        sample(dit, _text(), SamplerSettings(steps=1, cfg=1.0), shape=SHAPE)


def test_non_finite_final_latents_are_caught_after_the_last_step(dit, monkeypatch) -> None:
    # finite predictions can still overflow in a solver's sums; stand in a solver that does
    def overflowing(model, x, schedule, callback=None, interrupt=None):
        model(x, schedule.timesteps[:1])
        return x * float("inf")

    monkeypatch.setattr("wan_core.pipeline.get_sampler", lambda name: overflowing)
    with pytest.raises(NonFiniteError, match=r"the final latents of .* \(euler, 3 steps\) contain NaN/Inf although "
                                             r"every prediction was finite"):
        sample(dit, _text(), SamplerSettings(steps=3, cfg=1.0, sampler="euler"), shape=SHAPE)


# -- inputs of a run -------------------------------------------------------------------------


@pytest.mark.parametrize(("which", "match"), [("positive", "the prompt embedding"),
                                              ("negative", "the negative prompt embedding")])
def test_nan_in_text_embeddings_is_refused_before_the_first_step(dit, which, match) -> None:
    text = _text()
    getattr(text, which)[1, 2] = NAN
    calls = []
    with pytest.raises(NonFiniteError, match=f"{match} contains NaN/Inf.*Likely cause: the text encoder"):
        sample(dit, text, SamplerSettings(steps=2), shape=SHAPE, callback=calls.append)
    assert calls == []


def test_nan_init_latents_for_video_to_video_are_refused(dit) -> None:
    init = torch.randn(SHAPE)
    init[0, 1, 2, 3] = NAN
    with pytest.raises(NonFiniteError, match=r"the input latents \(video-to-video\) contains NaN/Inf"):
        sample(dit, _text(), SamplerSettings(steps=4, denoise=0.5), init_latents=init)


@pytest.mark.parametrize(("field", "match"), [("y", r"the image conditioning \(mask \+ VAE latents\)"),
                                              ("clip_fea", "the CLIP vision features")])
def test_nan_image_conditioning_is_refused(files, field, match) -> None:
    dit = load_dit(files["i2v"], dtype=torch.float32)
    y, clip = torch.zeros(20, *SHAPE[1:]), torch.zeros(257, tiny.TINY_CLIP.width)
    {"y": y, "clip_fea": clip}[field].view(-1)[7] = INF
    image = ImageEmbeds(y=y, clip_fea=clip, width=W, height=H, frames=FRAMES)
    with pytest.raises(NonFiniteError, match=f"{match} contains NaN/Inf"):
        sample(dit, _text(), SamplerSettings(steps=1), image=image)


def test_nan_in_the_start_image_or_clip_weights_is_refused(files, vae) -> None:
    clip = load_clip_vision(files["clip"], dtype=torch.float32)
    image = torch.zeros(3, H, W)
    image[0, 1, 1] = NAN
    with pytest.raises(NonFiniteError, match="the start image contains NaN/Inf"):
        encode_image_conditioning(vae, clip, image, FRAMES, W, H)
    next(clip.parameters()).data.view(-1)[0] = NAN
    with pytest.raises(NonFiniteError, match="the CLIP vision features .* Likely cause: the CLIP vision weights"):
        encode_image_conditioning(vae, clip, torch.zeros(3, H, W), FRAMES, W, H)


# -- the VAE ---------------------------------------------------------------------------------


def test_inf_in_a_vae_decoder_weight_raises_instead_of_a_black_video(vae) -> None:
    # the current frame's tap: frame 0 alone skips the taps over the zero history (0 * Inf)
    vae.decoder.conv1.weight.data[0, 0, 2, 0, 0] = INF
    with pytest.raises(NonFiniteError, match=r"VAE decode, chunk 1: the decoded frames contain NaN/Inf\. Likely "
                                             r"cause: the VAE weights hold NaN/Inf \(decoder\.conv1\.weight\)"):
        vae.decode(torch.randn(1, 16, 2, 4, 4))


@pytest.mark.parametrize("tile", [None, 3])
def test_decode_tiled_and_untiled_check_every_chunk(vae, tile) -> None:
    latents = torch.randn(1, 16, 2, 4, 4)
    latents[0, :, 1, 1, 1] = NAN       # second latent frame, first of 2 x 2 tiles
    with pytest.raises(NonFiniteError, match=r"VAE decode, chunk 2: .* Likely cause: the latents given to the "
                                             r"decoder already contain NaN/Inf"):
        decode_tiled(vae, latents, tile=tile, overlap=1)


def test_inf_in_a_vae_encoder_weight_is_refused_on_encode(vae) -> None:
    vae.encoder.conv1.weight.data[0, 0, 2, 1, 0] = INF   # the current frame's tap (see above)
    with pytest.raises(NonFiniteError, match=r"VAE encode, chunk 1: the latents contain NaN/Inf.*encoder\.conv1"):
        vae.encode(torch.zeros(1, 3, FRAMES, 32, 32))


def test_generate_with_an_inf_vae_weight_raises_rather_than_returning_black_frames(files, dit, vae) -> None:
    vae.decoder.head[2].bias.data[1] = INF
    with pytest.raises(NonFiniteError, match=r"VAE decode, chunk 1: .*decoder\.head\.2\.bias"):
        generate(dit=dit, vae=vae, text_encoder=load_text_encoder(files["t5"], dtype=torch.float32), prompt="x",
                 width=32, height=32, frames=FRAMES, steps=1)


# -- the guards cost nothing in numbers ------------------------------------------------------


def test_finite_runs_are_bit_identical_with_and_without_the_guards(dit, vae, monkeypatch) -> None:
    settings = SamplerSettings(steps=2, cfg=4.0, seed=5)
    guarded = sample(dit, _text(), settings, shape=SHAPE)
    frames = decode_tiled(vae, guarded[None], tile=None)
    for module in ("wan_core.errors", "wan_core.pipeline", "wan_core.vae"):
        monkeypatch.setattr(f"{module}.all_finite", lambda x: True)
    plain = sample(dit, _text(), settings, shape=SHAPE)
    assert torch.equal(guarded, plain)
    assert torch.equal(frames, decode_tiled(vae, plain[None], tile=None))


def test_all_finite_is_exact_although_it_reads_a_sum() -> None:
    from wan_core.errors import all_finite

    x = torch.randn(1000)
    assert all_finite(x) and all_finite(torch.empty(0)) and all_finite(torch.arange(5))
    for bad in ([NAN], [INF], [-INF], [INF, -INF]):
        y = x.clone()
        y[: len(bad)] = torch.tensor(bad)
        assert not all_finite(y) and not all_finite(y.half()) and not all_finite(y.bfloat16())
    assert all_finite(torch.full((8,), 3e38))                        # the sum overflows, the values are finite
    assert all_finite(torch.full((100_000,), 60_000.0, dtype=torch.float16))
    assert all_finite(torch.randn(16).to(torch.float8_e4m3fn))
    assert not all_finite(torch.tensor([NAN]).to(torch.float8_e4m3fn))
