"""Wan 2.2 A14B: two experts switched by timestep, per-expert guidance, and I2V-A14B without
CLIP tokens — on tiny random DiTs (tests/factory.py) in the official layout."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import factory
import tiny
from wan_core.conditioning import TextEmbeds, image_to_tensor
from wan_core.conditioning22 import encode_image_latents
from wan_core.configs import KNOWN_DIT, DiTConfig
from wan_core.dit import WanDiT
from wan_core.loaders import load_dit
from wan_core.moe import (A14B_DEFAULTS, MOE_I2V_A14B, MOE_T2V_A14B, ExpertPair, MoEOptions, MoESampling,
                          check_experts)
from wan_core.pipeline import SamplerSettings, sample
from wan_core.schedulers import flow_schedule

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (16, 2, 4, 6)


def _official_unipc_timesteps(steps: int, shift: float) -> np.ndarray:
    """Official FlowUniPCMultistepScheduler.set_timesteps (Wan2.2 wan/utils/fm_solvers_unipc.py),
    written out: train sigmas 1 - linspace(1, 1/1000, 1000)[::-1] (float32), sigma_max = the
    first, sigma_min = the last; linspace(max, min, steps + 1)[:-1], shifted, x1000, int64."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    train = torch.from_numpy(1.0 - alphas).to(torch.float32)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.from_numpy(sigmas * 1000).to(torch.int64).numpy()


def _official_switch(timesteps: np.ndarray, boundary: float) -> int:
    """``t.item() >= boundary * 1000`` picks the high-noise expert (text2video.py)."""
    high = [int(t) >= boundary * 1000 for t in timesteps]
    return high.index(False) if False in high else len(high)


@pytest.mark.parametrize("steps", [4, 10, 20, 40, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0, 12.0, 16.0])
@pytest.mark.parametrize("boundary", [0.5, 0.875, 0.9, 0.95])
def test_switch_step_equals_the_official_rule(steps, shift, boundary):
    official = _official_unipc_timesteps(steps, shift)
    ours = flow_schedule(steps, shift, "unipc").timesteps
    assert ours.tolist() == official.tolist()
    assert MoEOptions(boundary).switch_step(ours) == _official_switch(official, boundary)


def test_published_a14b_defaults():
    assert (MOE_T2V_A14B.boundary, MOE_T2V_A14B.cfg_low, MOE_T2V_A14B.cfg_high) == (0.875, 3.0, 4.0)
    assert (MOE_I2V_A14B.boundary, MOE_I2V_A14B.cfg_low, MOE_I2V_A14B.cfg_high) == (0.9, 3.5, 3.5)
    assert A14B_DEFAULTS["t2v"][1:] == (12.0, 40) and A14B_DEFAULTS["i2v"][1:] == (5.0, 40)
    # T2V-A14B at its official settings: 40 steps, shift 12 -> the switch falls mid-run
    k = MOE_T2V_A14B.switch_step(flow_schedule(40, 12.0).timesteps)
    assert k == _official_switch(_official_unipc_timesteps(40, 12.0), 0.875) and 0 < k < 40
    with pytest.raises(ValueError, match="boundary"):
        MoEOptions(boundary=1.5)


@pytest.fixture(scope="module")
def experts():
    def build(seed: int, cfg: DiTConfig = tiny.TINY_DIT_T2V) -> WanDiT:
        with torch.device("meta"):
            dit = WanDiT(cfg)
        dit.load_state_dict(factory.dit_official(cfg, seed), strict=True, assign=True)
        return dit.eval().requires_grad_(False)
    return build(1), build(2)


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(0)
    return TextEmbeds(torch.randn(5, tiny.TINY_T5.dim, generator=g), torch.randn(3, tiny.TINY_T5.dim, generator=g))


def test_two_identical_experts_equal_a_one_model_run_bit_for_bit(experts, text):
    dit = experts[0]
    settings = SamplerSettings(steps=5, cfg=4.0, shift=8.0, seed=3)
    one = sample(dit, text, settings, shape=SHAPE)
    k = MoEOptions(0.875).switch_step(flow_schedule(5, 8.0).timesteps)
    assert 0 < k < 5   # the switch really happens inside the run
    two = sample(dit, text, settings, shape=SHAPE, moe=MoESampling(dit, MoEOptions(0.875, cfg_low=4.0, cfg_high=4.0)))
    assert torch.equal(one, two)


@pytest.mark.parametrize("boundary, expert, cfg", [(0.001, 0, 4.0), (1.0, 1, 3.0)])
def test_each_expert_runs_with_its_own_guidance(experts, text, boundary, expert, cfg):
    """A boundary below every timestep runs only the high-noise expert at cfg_high; one above
    every timestep only the low-noise expert at cfg_low: each equals that model run alone."""
    high, low = experts
    settings = SamplerSettings(steps=4, cfg=7.0, shift=5.0, seed=1)
    moe = MoESampling(low, MoEOptions(boundary, cfg_low=3.0, cfg_high=4.0))
    got = sample(high, text, settings, shape=SHAPE, moe=moe)
    alone = sample(experts[expert], text, dataclasses.replace(settings, cfg=cfg), shape=SHAPE)
    assert torch.equal(got, alone)


def test_the_expert_changes_once_at_the_official_step_and_the_hook_sees_it(experts, text):
    high, low = experts
    steps, shift, opts = 8, 12.0, MOE_T2V_A14B
    calls: list[tuple[int, str]] = []
    switches: list[tuple[object, object]] = []

    class Spy:   # records which expert each evaluation ran on
        def __init__(self, dit, name):
            from wan_core.runner import DiTRunner
            self.inner, self.name, self.dit = DiTRunner(dit), name, dit

        def begin_run(self, n): self.inner.begin_run(n)
        def begin_step(self, i): self.step = i; self.inner.begin_step(i)
        def __call__(self, *a, **k):
            calls.append((self.step, self.name))
            return self.inner(*a, **k)

    moe = MoESampling(low, opts, low_runner=Spy(low, "low"), on_switch=lambda a, b: switches.append((a, b)))
    sample(high, text, SamplerSettings(steps=steps, cfg=4.0, shift=shift, seed=0), shape=SHAPE,
           runner=Spy(high, "high"), moe=moe)
    k = _official_switch(_official_unipc_timesteps(steps, shift), 0.875)
    assert 0 < k < steps
    assert [name for step, name in calls] == ["high"] * (2 * k) + ["low"] * (2 * (steps - k))
    assert switches == [(high, low)]


def test_experts_of_different_shapes_are_refused(experts):
    with torch.device("meta"):
        other = WanDiT(dataclasses.replace(tiny.TINY_DIT_T2V, num_layers=3))
    with pytest.raises(ValueError, match="same architecture"):
        ExpertPair(experts[0], other)
    check_experts(*experts)
    assert ExpertPair(*experts).cfg == experts[0].cfg


# --------------------------------------------------------------------------- I2V-A14B

I2V22 = dataclasses.replace(tiny.TINY_DIT_I2V, model_type="i2v_noclip")


def test_i2v_a14b_file_is_detected_without_clip_and_loads(tmp_path):
    sd = factory.dit_official(I2V22, 5)
    assert not any(k.startswith("img_emb") or "k_img" in k for k in sd)
    path = tmp_path / "wan2.2_i2v_high_noise_14B.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(path))
    dit = load_dit(path, dtype=torch.float32)
    assert dit.cfg.model_type == "i2v_noclip" and dit.cfg.in_dim == 36
    assert dit.cfg.needs_image and not dit.cfg.has_image_input
    assert KNOWN_DIT["I2V-A14B"].model_type == "i2v_noclip"
    with torch.device("meta"):
        full = WanDiT(KNOWN_DIT["I2V-A14B"])
    assert full.cfg.variant == "I2V-A14B"
    assert not any("img" in n for n, _ in full.named_parameters())


def _official_i2v22_y(vae, img: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
    """Official image2video.py (Wan 2.2), written out: msk ones at frame 0, first frame
    repeated 4x, regrouped (T', 4) -> channels; y = VAE(image resized bicubic + zeros)."""
    lat_h, lat_w = h // 8, w // 8
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]
    video = torch.concat([torch.nn.functional.interpolate(img[None].cpu(), size=(h, w), mode="bicubic").transpose(0, 1),
                          torch.zeros(3, frames - 1, h, w)], dim=1)
    y = vae.encode(video[None])[0]
    return torch.concat([msk, y])


def test_i2v_a14b_conditioning_matches_the_official_construction(tiny_vae):
    img = image_to_tensor(torch.rand(40, 60, 3, generator=torch.Generator().manual_seed(2)))
    emb = encode_image_latents(tiny_vae, img, frames=5, width=48, height=32)
    assert emb.clip_fea is None and emb.y.shape == (20, 2, 4, 6)
    assert torch.equal(emb.y, _official_i2v22_y(tiny_vae, img, 5, 32, 48))


def test_i2v_a14b_samples_with_two_experts_and_no_clip(tiny_vae, text):
    def build(seed):
        with torch.device("meta"):
            dit = WanDiT(I2V22)
        dit.load_state_dict(factory.dit_official(I2V22, seed), strict=True, assign=True)
        return dit.eval()
    high, low = build(1), build(2)
    img = image_to_tensor(torch.rand(32, 48, 3, generator=torch.Generator().manual_seed(4)))
    emb = encode_image_latents(tiny_vae, img, frames=5, width=48, height=32)
    out = sample(high, text, SamplerSettings(steps=4, shift=5.0, seed=2), image=emb,
                 moe=MoESampling(low, MOE_I2V_A14B))
    assert out.shape == (16, 2, 4, 6) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="clip_fea"):
        high(torch.zeros(1, 16, 2, 4, 6), torch.tensor([500.0]), text.positive[None], torch.zeros(1, 257, 160),
             emb.y[None])
    with pytest.raises(ValueError, match="image"):
        sample(high, text, SamplerSettings(steps=2), shape=SHAPE)


# --------------------------------------------------------------------------- run plan: one expert at a time

def test_run_plan_holds_one_expert_at_a_time_and_swaps_at_the_switch(experts, text):
    import contextlib

    from wan_core.moe import expert_stages
    from wan_core.runner import DiTRunner

    high, low = experts
    events: list[str] = []
    inside: set[str] = set()

    class Plan:   # a RunPlan's sampling stage, recording when each expert is placed / released
        def __init__(self, dit, name):
            self.dit, self.name = dit, name

        @contextlib.contextmanager
        def sampling(self):
            events.append(f"place {self.name}")
            inside.add(self.name)
            assert len(inside) == 1, f"two experts placed at once: {inside}"
            runner = DiTRunner(self.dit)
            orig = runner.__call__

            class Checked(DiTRunner):
                def __call__(s, *a, **k):
                    assert inside == {self.name}
                    return orig(*a, **k)
            runner.__class__ = Checked
            try:
                yield runner
            finally:
                inside.discard(self.name)
                events.append(f"release {self.name}")

    settings = SamplerSettings(steps=6, cfg=4.0, shift=12.0, seed=5)
    with expert_stages(Plan(high, "high"), Plan(low, "low"), MOE_T2V_A14B) as (runner, moe):
        staged = sample(high, text, settings, shape=SHAPE, runner=runner, moe=moe)
    assert events == ["place high", "release high", "place low", "release low"]
    assert torch.equal(staged, sample(high, text, settings, shape=SHAPE, moe=MoESampling(low, MOE_T2V_A14B)))


def test_real_run_plans_give_the_same_latents(experts, text):
    from wan_core.moe import expert_stages
    from wan_core.run_plan import prepare_run

    high, low = experts
    settings = SamplerSettings(steps=4, cfg=4.0, shift=12.0, seed=6)
    with prepare_run(high, SHAPE) as hp, prepare_run(low, SHAPE) as lp, \
            expert_stages(hp, lp, MOE_T2V_A14B) as (runner, moe):
        planned = sample(high, text, settings, shape=SHAPE, runner=runner, moe=moe)
    assert torch.equal(planned, sample(high, text, settings, shape=SHAPE, moe=MoESampling(low, MOE_T2V_A14B)))
