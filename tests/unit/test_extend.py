"""Video extension: pinned overlap latents, the cross-fade join, generate(extend=...) chained."""
from __future__ import annotations

import pytest
import torch

import factory
import tiny
from wan_core import SamplerSettings, TextEmbeds, generate, load_dit, load_text_encoder, load_vae, sample
from wan_core.dit import WanDiT
from wan_core.extend import check_overlap, join_videos

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 4, 4, 4)


@pytest.fixture(scope="module")
def dit() -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(tiny.TINY_DIT_T2V).eval()


@pytest.fixture(scope="module")
def text() -> TextEmbeds:
    g = torch.Generator().manual_seed(1)
    return TextEmbeds(torch.randn(5, tiny.TINY_T5.dim, generator=g), torch.randn(3, tiny.TINY_T5.dim, generator=g))


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_the_first_frames_of_the_continuation_are_the_source_latents(dit, text, solver) -> None:
    known = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    settings = SamplerSettings(steps=4, cfg=5.0, shift=5.0, seed=2, sampler=solver)
    out = sample(dit, text, settings, shape=SHAPE, known_latents=known)
    # measured: 2.4e-7 abs for all three solvers (float32 rounding of (x - known) / sigma)
    assert torch.allclose(out[:, :2], known, atol=1e-5, rtol=0)
    plain = sample(dit, text, settings, shape=SHAPE)
    assert not torch.allclose(out[:, 2:], plain[:, 2:])
    with pytest.raises(ValueError, match="first frames"):
        sample(dit, text, settings, shape=SHAPE, known_latents=torch.zeros(16, 4, 4, 4))


def test_join_cross_fades_over_the_overlap() -> None:
    a, b = torch.zeros(9, 2, 2, 3), torch.ones(9, 2, 2, 3)
    joined = join_videos(a, b, 5)
    assert joined.shape[0] == 13
    assert torch.equal(joined[:4], a[:4]) and torch.equal(joined[9:], b[5:])
    ramp = joined[4:9, 0, 0, 0]
    assert torch.allclose(ramp, torch.tensor([1, 2, 3, 4, 5]) / 6) and bool((ramp.diff() > 0).all())
    with pytest.raises(ValueError, match="4n\\+1"):
        check_overlap(4, 9, 9)
    with pytest.raises(ValueError, match="shorter than the new clip"):
        check_overlap(9, 9, 9)
    assert check_overlap(17, 81, 81) == 5


def test_generate_extends_a_video_and_chains(tmp_path) -> None:
    dit_m = load_dit(factory.write_checkpoint(tmp_path, "dit", "official", variant="t2v"), dtype=torch.float32)
    vae = load_vae(factory.write_checkpoint(tmp_path, "vae", "official"))
    te = load_text_encoder(factory.write_checkpoint(tmp_path, "t5", "hf_with_spiece"), dtype=torch.float32)
    common = dict(dit=dit_m, vae=vae, text_encoder=te, prompt="a cat", steps=2, seed=1)
    first = generate(width=32, height=32, frames=9, **common)
    longer = generate(frames=9, extend=first, extend_overlap=5, **common)
    assert longer.shape == (13, 32, 32, 3)
    assert torch.equal(longer[:4], first[:4])
    again = generate(frames=9, extend=longer, extend_overlap=5, **common)
    assert again.shape == (17, 32, 32, 3) and torch.equal(again[:8], longer[:8])
    with pytest.raises(ValueError, match="cannot be combined"):
        generate(frames=9, extend=first, video=first, denoise=0.5, **common)


def test_continue_video_matches_generate_extend(tmp_path) -> None:
    from wan_core import SamplerSettings
    from wan_core.extend import continue_video

    dit_m = load_dit(factory.write_checkpoint(tmp_path, "dit", "official", variant="t2v"), dtype=torch.float32)
    vae = load_vae(factory.write_checkpoint(tmp_path, "vae", "official"))
    te = load_text_encoder(factory.write_checkpoint(tmp_path, "t5", "hf_with_spiece"), dtype=torch.float32)
    source = torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    via_generate = generate(dit=dit_m, vae=vae, text_encoder=te, prompt="a cat", negative_prompt="blur", steps=2,
                            seed=1, frames=9, extend=source, extend_overlap=5)
    pos, neg = te.encode(["a cat", "blur"])
    staged = continue_video(dit_m, vae, TextEmbeds(pos.float(), neg.float()), source, 9, 5,
                            SamplerSettings(steps=2, seed=1))
    assert torch.allclose(staged, via_generate, atol=1e-5)   # decode_tiled vs whole decode: measured equal


def test_cli_extends_a_video_with_windows_and_guidance(tmp_path) -> None:
    from wan_core.cli import main
    from wan_core.selftest import write_selftest_models
    from wan_core.video import read_video

    m = write_selftest_models(tmp_path / "models")
    base = ["generate", "--dit", str(m.dit_t2v), "--vae", str(m.vae), "--text-encoder", str(m.text_encoder),
            "--prompt", "a cat", "--steps", "2", "--device", "cpu"]
    first = tmp_path / "first.mp4"
    assert main(base + ["--size", "48x32", "--frames", "9", "--out", str(first), "--context-frames", "5",
                        "--context-overlap", "0", "--slg-blocks", "0", "--cfg-zero-star"]) == 0
    longer = tmp_path / "longer.mp4"
    assert main(base + ["--frames", "9", "--extend", str(first), "--extend-overlap", "5", "--out", str(longer)]) == 0
    assert read_video(longer).shape == (13, 32, 48, 3)
    assert main(base + ["--frames", "9", "--extend", str(first), "--extend-overlap", "4"]) == 2   # not 4n+1
