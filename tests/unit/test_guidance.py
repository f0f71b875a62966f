"""Guidance options (SLG, CFG-Zero*, CFG schedule) and RIFLEx on a tiny random DiT."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import tiny
from wan_core import SamplerSettings, TextEmbeds, sample
from wan_core.dit import RIFLEX_K, RopeOptions, WanDiT, rope_axis_dims, rope_tables
from wan_core.guidance import GuidanceOptions, cfg_zero_star_scale, guide, parse_blocks, parse_cfg_schedule
from wan_core.runner import DiTRunner
from wan_core.schedulers import flow_schedule, get_sampler

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 3, 4, 6)
SETTINGS = SamplerSettings(steps=5, cfg=5.0, shift=5.0, seed=3, sampler="euler")


@pytest.fixture(scope="module")
def dit() -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(dataclasses.replace(tiny.TINY_DIT_T2V, num_layers=3)).eval()


@pytest.fixture(scope="module")
def text() -> TextEmbeds:
    g = torch.Generator().manual_seed(1)
    return TextEmbeds(torch.randn(5, tiny.TINY_T5.dim, generator=g), torch.randn(3, tiny.TINY_T5.dim, generator=g))


class RecordingRunner(DiTRunner):
    """Records (step, branch, skipped blocks) of every call."""

    def __init__(self, dit) -> None:
        super().__init__(dit)
        self.calls: list[tuple[int, str, tuple[int, ...]]] = []

    def __call__(self, x, t, context, clip_fea=None, y=None, branch="cond", *, rope=None, skip_blocks=()):
        self.calls.append((self.step, branch, tuple(sorted(skip_blocks))))
        return super().__call__(x, t, context, clip_fea, y, branch, rope=rope, skip_blocks=skip_blocks)


def _official(dit, text, settings) -> torch.Tensor:
    """The official CFG loop written out: the numbers sample() gave before guidance options."""
    schedule = flow_schedule(settings.steps, settings.shift, settings.sampler)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(settings.seed))[None]
    pos, neg = text.positive[None], text.negative[None]

    def model_fn(xt, t):
        cond, uncond = dit(xt, t, pos), dit(xt, t, neg)
        return uncond + settings.cfg * (cond - uncond)

    with torch.no_grad():   # as the official pipeline runs
        return get_sampler(settings.sampler)(model_fn, x, schedule)[0]


def test_default_guidance_is_bit_identical_to_official_cfg(dit, text) -> None:
    ref = _official(dit, text, SETTINGS)
    assert torch.equal(sample(dit, text, SETTINGS, shape=SHAPE), ref)
    assert torch.equal(sample(dit, text, SETTINGS, shape=SHAPE, guidance=GuidanceOptions()), ref)
    # SLG with no layers, CFG-Zero* off, RIFLEx off, an empty schedule: still the same numbers
    off = GuidanceOptions(slg_blocks=(), cfg_zero_star=False, riflex=False, cfg_schedule=())
    assert torch.equal(sample(dit, text, SETTINGS, shape=SHAPE, guidance=off), ref)


def test_cfg_zero_star_scale_equals_its_closed_form() -> None:
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(3, 16, 2, 4, 4, generator=g), torch.randn(3, 16, 2, 4, 4, generator=g)
    s = cfg_zero_star_scale(cond, uncond)
    assert s.shape == (3, 1, 1, 1, 1)
    for b in range(3):
        c, u = cond[b].double().flatten(), uncond[b].double().flatten()
        expect = float(c @ u / (u @ u + 1e-8))
        assert math.isclose(float(s[b]), expect, rel_tol=1e-5)   # float32 sums: measured <= 2e-7 rel
    guided = guide(cond, uncond, 4.0, zero_star=True)
    assert torch.allclose(guided, uncond * s + 4.0 * (cond - uncond * s))
    # uncond parallel to cond: s* recovers the ratio, so the guided output is cfg * cond's remainder
    assert torch.allclose(cfg_zero_star_scale(2 * uncond, uncond).flatten(), torch.full((3,), 2.0))


def test_cfg_zero_star_changes_the_run_and_zero_init_skips_the_model(dit, text) -> None:
    ref = sample(dit, text, SETTINGS, shape=SHAPE)
    assert not torch.equal(sample(dit, text, SETTINGS, shape=SHAPE, guidance=GuidanceOptions(cfg_zero_star=True)), ref)
    runner = RecordingRunner(dit)
    sample(dit, text, SETTINGS, shape=SHAPE, runner=runner, guidance=GuidanceOptions(zero_init_steps=2))
    assert {s for s, _, _ in runner.calls} == {2, 3, 4}   # steps 0 and 1 output zeros, no model call


def test_slg_skips_exactly_the_chosen_blocks_in_uncond_over_the_range(dit, text) -> None:
    runner = RecordingRunner(dit)
    opts = GuidanceOptions(slg_blocks=(1,), slg_start=0.2, slg_end=0.8)
    out = sample(dit, text, SETTINGS, shape=SHAPE, runner=runner, guidance=opts)
    # 5 steps: fractions 0, .2, .4, .6, .8 -> steps 1..3 are in [0.2, 0.8)
    expect = []
    for step in range(5):
        expect += [(step, "cond", ()), (step, "uncond", (1,) if 1 <= step <= 3 else ())]
    assert runner.calls == expect
    assert not torch.equal(out, sample(dit, text, SETTINGS, shape=SHAPE))


def test_skipping_a_block_runs_the_others_unchanged(dit, text) -> None:
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(9))
    t, ctx = torch.tensor([500]), text.positive[None]
    runner = DiTRunner(dit)
    assert torch.equal(runner(x, t, ctx, skip_blocks=()), dit(x, t, ctx))
    tokens, inputs = dit.prepare(x, t, ctx)
    for i in (0, 2):
        tokens = dit.blocks[i](tokens, inputs)
    assert torch.equal(runner(x, t, ctx, skip_blocks=(1,)), dit.finish(tokens, inputs))
    with pytest.raises(ValueError, match="block indices"):
        runner(x, t, ctx, skip_blocks=(3,))


def test_cfg_schedule_of_one_skips_the_unconditional_pass(dit, text) -> None:
    runner = RecordingRunner(dit)
    opts = GuidanceOptions(cfg_schedule=((0, 6.0), (3, 1.0)))
    assert [opts.cfg_at(i, 5.0) for i in range(5)] == [6.0, 6.0, 6.0, 1.0, 1.0]
    sample(dit, text, SETTINGS, shape=SHAPE, runner=runner, guidance=opts)
    assert [(s, b) for s, b, _ in runner.calls] == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond"),
                                                    (2, "cond"), (2, "uncond"), (3, "cond"), (4, "cond")]


def test_text_forms_and_bad_values() -> None:
    assert parse_blocks("9, 10") == (9, 10) and parse_blocks("") == ()
    assert parse_cfg_schedule("0:6,10:3,30:1") == ((0, 6.0), (10, 3.0), (30, 1.0))
    with pytest.raises(ValueError, match="START_STEP:CFG"):
        parse_cfg_schedule("6")
    with pytest.raises(ValueError, match="increasing step"):
        GuidanceOptions(cfg_schedule=((5, 2.0), (1, 3.0)))
    with pytest.raises(ValueError, match="slg_start"):
        GuidanceOptions(slg_start=0.9, slg_end=0.1)
    assert GuidanceOptions().describe() == ""


def test_riflex_changes_only_the_intended_temporal_frequency() -> None:
    grid, head_dim = (30, 2, 3), 128
    cos0, sin0 = rope_tables(grid, head_dim, torch.device("cpu"), torch.float64)
    cos1, sin1 = rope_tables(grid, head_dim, torch.device("cpu"), torch.float64,
                             RopeOptions(riflex_k=RIFLEX_K, riflex_length=30))
    changed = ((cos0 != cos1) | (sin0 != sin1)).any(dim=0).flatten().nonzero().flatten().tolist()
    assert changed == [RIFLEX_K - 1]            # column 5 of the 22 temporal ones (of 64)
    assert rope_axis_dims(head_dim)[0] // 2 == 22
    # the new frequency is 0.9 * 2 pi / L': frame 30 would be at 0.9 of one period
    angle = torch.atan2(sin1[:, 0, RIFLEX_K - 1], cos1[:, 0, RIFLEX_K - 1]).view(30, 6)[:, 0]
    step = 0.9 * 2 * math.pi / 30
    assert torch.allclose(angle[:5], torch.arange(5, dtype=torch.float64) * step)


def test_time_offset_gives_the_rows_of_the_longer_clip() -> None:
    full = rope_tables((8, 2, 2), 128, torch.device("cpu"))
    part = rope_tables((3, 2, 2), 128, torch.device("cpu"), options=RopeOptions(time_offset=4))
    for a, b in zip(full, part):
        assert torch.equal(a.view(8, 4, 1, 64)[4:7].reshape(-1, 1, 64), b)


def test_slg_block_beyond_the_model_is_refused_before_sampling(dit, text) -> None:
    with pytest.raises(ValueError, match="blocks 0..2"):
        sample(dit, text, SETTINGS, shape=SHAPE, guidance=GuidanceOptions(slg_blocks=(3,)))


def test_cli_flags_become_guidance_and_context_options() -> None:
    from wan_core.cli import build_parser, context_from_args, guidance_from_args

    base = ["generate", "--dit", "d", "--vae", "v", "--text-encoder", "t", "--prompt", "p"]
    args = build_parser().parse_args(base)
    assert guidance_from_args(args) is None and context_from_args(args) is None
    args = build_parser().parse_args(base + ["--slg-blocks", "9,10", "--cfg-zero-star", "--zero-init-steps", "1",
                                             "--cfg-schedule", "0:6,20:1", "--riflex", "--context-frames", "81",
                                             "--context-overlap", "32", "--context-schedule", "looped"])
    g, c = guidance_from_args(args), context_from_args(args)
    assert g == GuidanceOptions(slg_blocks=(9, 10), cfg_zero_star=True, zero_init_steps=1,
                                cfg_schedule=((0, 6.0), (20, 1.0)), riflex=True)
    assert (c.context_frames, c.overlap, c.schedule, c.fuse) == (81, 32, "looped", "pyramid")
