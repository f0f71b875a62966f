"""What Wan 2.1 promises holds for Wan 2.2, or is refused with a clear message:

- the run plan sizes a TI2V-5B job with the Wan 2.2 VAE's geometry (16x16, 48 channels:
  4x fewer DiT tokens than a 2.1 job of the same size) and its own simulated VAE figures,
  and counts the per-token timesteps of image-to-video;
- step caches: no published Wan 2.2 tables -> refused before a model runs (custom
  coefficients still work);
- context windows: TI2V text-to-video runs windowed; TI2V image-to-video (first frame
  pinned by per-token timesteps) is refused.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import factory
import tiny
from wan_core.conditioning import TextEmbeds
from wan_core.context_windows import ContextOptions
from wan_core.dit import WanDiT
from wan_core.memsim import FakeGPU, fake_vae22
from wan_core.moe import ExpertPair, check_pair_options
from wan_core.offload import module_bytes, on_device
from wan_core.pipeline import SamplerSettings, sample
from wan_core.planner import (VAE21_FIGURES, VAE22_FIGURES, dit_activation_bytes, dit_sizes, plan_vae, tokens_for,
                              vae_decode_bytes, vae_encode_bytes, vae_figures)
from wan_core.run_plan import Job, RunOptions, StepCacheSpec, prepare_run, stage_bytes
from wan_core.runner import DiTRunner
from wan_core.step_cache import TeaCache
from wan_core.ti2v import FirstFrameRunner
from wan_core.configs import KNOWN_DIT

pytestmark = pytest.mark.usefixtures("one_thread")
TI2V = tiny.TINY_DIT_TI2V
TOLERANCE = 1.15


@pytest.fixture(scope="module")
def dit():
    return tiny.built(WanDiT, TI2V, factory.dit_official(TI2V, 4))


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(1)
    return TextEmbeds(torch.randn(5, TI2V.text_dim, generator=g), torch.randn(2, TI2V.text_dim, generator=g))


def test_jobs_of_a_48_channel_model_use_the_wan22_vae_geometry(dit):
    job = Job(1280, 704, 121)
    assert job.latent_shape == (16, 31, 88, 160) and job.tokens() == 109120
    plan = prepare_run(dit, job)                                     # the DiT's 48 channels decide
    assert plan.job.space_stride == 16 and plan.job.latent_shape == (48, 31, 44, 80)
    assert plan.job.tokens() == 27280 == tokens_for(1280, 704, 121, space_stride=16)
    assert Job.from_latent_shape((48, 31, 44, 80)) == dataclasses.replace(job, space_stride=16)
    with pytest.raises(ValueError, match="space_stride must be 8"):
        Job(64, 64, 5, space_stride=12)


def test_wan22_vae_figures_are_picked_from_the_module_and_bracket_the_simulation():
    with FakeGPU() as gpu:
        vae = fake_vae22()
        assert vae_figures(vae) is VAE22_FIGURES and vae_figures(None) is VAE21_FIGURES
        # real widths, a 16 x 32 latent area (256 x 512 px): 3 latent frames reach the steady chunk;
        # decoded chunk by chunk to the CPU as decode_tiled does per tile
        with gpu.stage("decode") as stage, on_device(vae, "cuda", empty_cache=False):
            for frames in vae.iter_decode(torch.empty(1, 48, 3, 16, 32)):
                frames = frames.cpu()
            del frames
        planned = vae_decode_bytes(module_bytes(vae), (16, 32), VAE22_FIGURES)
        simulated = stage.peak - stage.start
        assert stage.end == stage.start
        assert simulated <= planned <= TOLERANCE * simulated, (simulated, planned)   # measured 1.022
        with gpu.stage("encode") as stage, on_device(vae, "cuda", empty_cache=False):
            z = vae.encode(torch.empty(1, 3, 1, 256, 512)).cpu()   # the TI2V first frame
            del z
        planned = vae_encode_bytes(module_bytes(vae), (16, 32), VAE22_FIGURES, frames=1)
        assert stage.peak - stage.start <= planned <= TOLERANCE * (stage.peak - stage.start)   # 1.004


def test_the_vae_plans_of_a_ti2v_job_use_its_own_figures():
    weights = 2_818_754_672                                       # the published Wan 2.2 VAE, float32
    budget = 8 << 30
    v21 = plan_vae(budget, weights, (44, 80), 31, figures=VAE21_FIGURES)
    v22 = plan_vae(budget, weights, (44, 80), 31, figures=VAE22_FIGURES)
    # the 2.2 decoder needs 3.7x the bytes per latent px: the 2.1 figures would decode untiled and run out
    assert v22.decode_tile == 32 and v21.decode_tile is None and v22.decode_peak <= budget - (512 << 20)
    one = plan_vae(budget, weights, (44, 80), 31, figures=VAE22_FIGURES, encode_video=True, encode_frames=1)
    video = plan_vae(budget, weights, (44, 80), 31, figures=VAE22_FIGURES, encode_video=True)
    assert one.encode_tile is None and one.encode_peak < video.encode_peak   # the first frame alone fits


def test_per_token_timesteps_are_counted_for_ti2v_image_to_video(dit):
    sizes = dit_sizes(KNOWN_DIT["TI2V-5B"], "bf16")
    plain = dit_activation_bytes(sizes, 27280)
    per_token = dit_activation_bytes(sizes, 27280, per_token_timesteps=True)
    assert per_token - plain == 27280 * 40 * 3072                  # e, e0 and a phase's modulation, float32
    job = Job(64, 64, 9, encode_video=True, space_stride=16)
    t2v = stage_bytes("sampling", dit, RunOptions(), Job(64, 64, 9, space_stride=16))
    i2v = stage_bytes("sampling", dit, RunOptions(), job)
    assert i2v - t2v == 2 * 2 * 3 * 40 * TI2V.dim


def test_step_caches_are_refused_for_wan22_models_before_anything_runs(dit):
    with pytest.raises(ValueError, match="Wan 2.2 .*ti2v.*no published TeaCache/MagCache table.*MagCalibrator"):
        prepare_run(dit, Job(64, 64, 5), RunOptions(step_cache=StepCacheSpec("magcache")))
    with pytest.raises(ValueError, match="A14B expert pair has no published"):
        check_pair_options(RunOptions(), RunOptions(step_cache=StepCacheSpec("teacache")))
    check_pair_options(RunOptions(), None)
    with pytest.raises(ValueError, match="no published TeaCache"):
        TeaCache.for_model(dit, 0.1).begin_run(4)
    TeaCache(0.1, cfg=dit.cfg, coefficients=(0.0, 0.0, 0.0, 1.0, 0.0)).begin_run(4)   # custom: allowed


def test_a14b_generate_refuses_a_step_cache_before_loading_anything(tiny_vae):
    from wan_core.generate22 import generate_a14b

    pair = ExpertPair(tiny.built(WanDiT, tiny.TINY_DIT_T2V, factory.dit_official(tiny.TINY_DIT_T2V, 1)),
                      tiny.built(WanDiT, tiny.TINY_DIT_T2V, factory.dit_official(tiny.TINY_DIT_T2V, 2)))
    with pytest.raises(ValueError, match="A14B expert pair"):
        generate_a14b(experts=pair, vae=tiny_vae, text_encoder=None, prompt="a cat", width=48, height=32, frames=5,
                      low_options=RunOptions(step_cache=StepCacheSpec("teacache")))


def test_context_windows_run_ti2v_text_to_video_and_refuse_image_to_video(dit, text):
    windows = ContextOptions(context_frames=5, overlap=4)            # 9 frames -> 3 latent frames, windows of 2
    settings = SamplerSettings(steps=2, cfg=5.0, shift=5.0, seed=1)
    out = sample(dit, text, settings, shape=(48, 3, 4, 4), context=windows)
    assert out.shape == (48, 3, 4, 4) and torch.isfinite(out).all()
    z = torch.randn(48, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="context windows cannot run TI2V-5B image-to-video"):
        sample(dit, text, settings, shape=(48, 3, 4, 4), runner=FirstFrameRunner(DiTRunner(dit), z), known_latents=z,
               context=windows)


def _lora(path, dim: int, rank: int = 4, seed: int = 0):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"diffusion_model.blocks.1.self_attn.q.lora_A.weight": torch.randn(rank, dim, generator=g),
               "diffusion_model.blocks.1.self_attn.q.lora_B.weight": 0.1 * torch.randn(dim, rank, generator=g)},
              str(path))
    return path


def test_a14b_loras_apply_per_expert_and_a_bad_one_fails_before_the_first_step(tmp_path, text):
    from wan_core.lora import LoraError, LoraSpec
    from wan_core.moe import MOE_T2V_A14B, MoESampling, expert_stages
    from wan_core.lora import applied_loras

    cfg = dataclasses.replace(tiny.TINY_DIT_T2V, text_dim=TI2V.text_dim)
    high = tiny.built(WanDiT, cfg, factory.dit_official(cfg, 1))
    low = tiny.built(WanDiT, cfg, factory.dit_official(cfg, 2))
    shape, settings = (16, 2, 4, 4), SamplerSettings(steps=4, cfg=4.0, shift=12.0, seed=3)
    good = LoraSpec(_lora(tmp_path / "high.safetensors", cfg.dim), 1.0)
    before = {n: p.clone() for n, p in [*high.named_parameters(), *low.named_parameters()]}
    # each expert gets its own LoRA: equal to applying them by hand, high-noise expert only
    with prepare_run(high, shape, RunOptions(loras=(good,))) as hp, prepare_run(low, shape) as lp, \
            expert_stages(hp, lp, MOE_T2V_A14B) as (runner, moe):
        planned = sample(high, text, settings, shape=shape, runner=runner, moe=moe)
    with applied_loras(high, [good]):
        by_hand = sample(high, text, settings, shape=shape, moe=MoESampling(low, MOE_T2V_A14B))
    assert torch.equal(planned, by_hand)
    assert not torch.equal(planned, sample(high, text, settings, shape=shape, moe=MoESampling(low, MOE_T2V_A14B)))
    # a LoRA of another width for the low-noise expert: refused before any step, nothing changed
    bad = LoraSpec(_lora(tmp_path / "low.safetensors", cfg.dim * 2), 1.0)
    steps: list[int] = []
    with prepare_run(high, shape, RunOptions(loras=(good,))) as hp, \
            prepare_run(low, shape, RunOptions(loras=(bad,))) as lp:
        with pytest.raises(LoraError):
            with expert_stages(hp, lp, MOE_T2V_A14B) as (runner, moe):
                sample(high, text, settings, shape=shape, runner=runner, moe=moe,
                       callback=lambda info: steps.append(1))
    assert steps == []
    after = dict([*high.named_parameters(), *low.named_parameters()])
    assert all(torch.equal(after[n], v) for n, v in before.items())
    assert not any(m._forward_hooks for m in [*high.modules(), *low.modules()])


def test_a14b_block_swap_and_fp8_apply_per_expert_through_the_stages(text):
    from wan_core.fp8 import quantize
    from wan_core.moe import MOE_T2V_A14B, MoESampling, expert_stages

    cfg = dataclasses.replace(tiny.TINY_DIT_T2V, text_dim=TI2V.text_dim)
    high = tiny.built(WanDiT, cfg, factory.dit_official(cfg, 1))
    low = tiny.built(WanDiT, cfg, factory.dit_official(cfg, 2))
    shape, settings = (16, 2, 4, 4), SamplerSettings(steps=4, cfg=4.0, shift=12.0, seed=3)
    plain = sample(high, text, settings, shape=shape, moe=MoESampling(low, MOE_T2V_A14B))
    # block swap bookkeeping (explicit resident blocks run it on the CPU too), different per expert
    with prepare_run(high, shape, RunOptions(resident_blocks=1)) as hp, \
            prepare_run(low, shape, RunOptions(resident_blocks=0)) as lp, \
            expert_stages(hp, lp, MOE_T2V_A14B) as (runner, moe):
        assert hp.placement.resident_blocks == 1 and lp.placement.resident_blocks == 0
        swapped = sample(high, text, settings, shape=shape, runner=runner, moe=moe)
    assert torch.equal(swapped, plain)
    # an fp8-stored low-noise expert beside a float32 high-noise one
    sd = factory.dit_official(cfg, 2)
    linear = [k for k, v in sd.items() if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2]
    fp8 = {k: quantize(v, torch.float8_e4m3fn, scaled=False)[0] if k in linear else v for k, v in sd.items()}
    low8 = tiny.built(WanDiT, cfg, fp8)
    assert low8.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    with prepare_run(high, shape) as hp, prepare_run(low8, shape, RunOptions(resident_blocks=1)) as lp, \
            expert_stages(hp, lp, MOE_T2V_A14B) as (runner, moe):
        mixed = sample(high, text, settings, shape=shape, runner=runner, moe=moe)
    assert torch.equal(mixed, sample(high, text, settings, shape=shape, moe=MoESampling(low8, MOE_T2V_A14B)))
    assert not torch.equal(mixed, plain)


@pytest.mark.parametrize("mode", ["unmerged", "merge"])
def test_expert_loras_apply_to_both_experts_or_to_neither(tmp_path, mode):
    from wan_core.lora import LoraError, LoraSpec, apply_loras
    from wan_core.moe import apply_expert_loras

    cfg = tiny.TINY_DIT_T2V

    def pair():
        return ExpertPair(tiny.built(WanDiT, cfg, factory.dit_official(cfg, 1)),
                          tiny.built(WanDiT, cfg, factory.dit_official(cfg, 2)))

    hi = LoraSpec(_lora(tmp_path / "hi.safetensors", cfg.dim, seed=1), 1.0)
    lo = LoraSpec(_lora(tmp_path / "lo.safetensors", cfg.dim, seed=2), 0.5)
    got, ref = pair(), pair()
    reports = apply_expert_loras(got, [hi], [lo], mode)
    apply_loras(ref.high, [hi], mode)
    apply_loras(ref.low, [lo], mode)
    x, t = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    ctx = torch.randn(1, 3, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    for a, b in ((got.high, ref.high), (got.low, ref.low)):
        assert torch.equal(a(x, t, ctx), b(x, t, ctx))
    assert [r.matched for r in reports] == [("blocks.1.self_attn.q.weight",)] * 2
    # a low-noise LoRA of another width: refused before the high-noise expert changes
    fresh = pair()
    before = {n: p.clone() for n, p in fresh.high.named_parameters()}
    bad = LoraSpec(_lora(tmp_path / "bad.safetensors", cfg.dim * 2), 1.0)
    with pytest.raises(LoraError):
        apply_expert_loras(fresh, [hi], [bad], mode)
    assert all(torch.equal(p, before[n]) for n, p in fresh.high.named_parameters())
    assert not any(m._forward_hooks for m in fresh.high.modules())


def test_expert_loras_undo_the_high_noise_hooks_when_the_low_noise_application_fails(tmp_path, monkeypatch):
    import wan_core.moe as moe_module
    from wan_core.lora import LoraSpec, apply_loras
    from wan_core.moe import apply_expert_loras

    cfg = tiny.TINY_DIT_T2V
    pair = ExpertPair(tiny.built(WanDiT, cfg, factory.dit_official(cfg, 1)),
                      tiny.built(WanDiT, cfg, factory.dit_official(cfg, 2)))
    spec = LoraSpec(_lora(tmp_path / "l.safetensors", cfg.dim), 1.0)
    calls = []

    def failing_second(model, specs, *args, **kwargs):   # e.g. out of memory while hooking the low expert
        calls.append(model)
        if len(calls) == 2:
            raise MemoryError("injected")
        return apply_loras(model, specs, *args, **kwargs)

    monkeypatch.setattr(moe_module, "apply_loras", failing_second)
    with pytest.raises(MemoryError):
        apply_expert_loras(pair, [spec], [spec], "unmerged")
    assert calls == [pair.high, pair.low]
    assert not any(m._forward_hooks for m in [*pair.high.modules(), *pair.low.modules()])


def test_vae_stages_size_a_job_with_the_vae_geometry():
    from wan_core.placement import plan_decode

    with FakeGPU():
        vae = fake_vae22()
        job = Job(1280, 704, 121)                       # made without saying which VAE
        need = stage_bytes("decode", vae, RunOptions(), job)
        assert need == stage_bytes("decode", vae, RunOptions(), (48, 31, 44, 80))
        tiling = plan_decode(vae, RunOptions(vram_budget=8 << 30), "cuda", job=job)
        # bench/simulated_vram.py: planned 6.95, simulated 6.74 GiB
        assert tiling.tile == 32 and "planned peak 6.95 GiB" in tiling.reason
