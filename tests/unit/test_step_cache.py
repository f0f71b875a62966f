"""Step caches (TeaCache, MagCache) on tiny random models and on synthetic inputs."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import factory
import tiny
from wan_core import SamplerSettings, TextEmbeds, latent_shape, load_dit, sample
from wan_core.configs import KNOWN_DIT
from wan_core.runner import DiTRunner
from wan_core.step_cache import (MAGCACHE_RATIOS, TEACACHE_COEFFICIENTS, CacheCounts, MagCache, MagCalibrator,
                                 TeaCache, interpolate_ratios)

SHAPE = latent_shape(48, 32, 5)          # [16, 2, 4, 6] -> 12 tokens
STEPS = 8
SETTINGS = SamplerSettings(steps=STEPS, cfg=5.0, shift=5.0, seed=3)
HUGE = 1e9                                # a threshold no accumulated distance reaches


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    d = tmp_path_factory.mktemp("dit")
    return load_dit(factory.write_checkpoint(d, "dit", "official", variant="t2v"), dtype=torch.float32)


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(1)
    return TextEmbeds(torch.randn(6, tiny.TINY_T5.dim, generator=g), torch.randn(4, tiny.TINY_T5.dim, generator=g))


@pytest.fixture(scope="module")
def plain(dit, text):
    # one thread, as the tests it is compared with (one_thread is function-scoped, this fixture
    # runs before it): MKL's GEMMs of 5-7 / 9-11 rows (a short prompt's collapsed text rows,
    # wan_core.text_pad) round differently with 1 and 2 threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sample(dit, text, SETTINGS, shape=SHAPE)
    finally:
        torch.set_num_threads(threads)


def _cached(dit, text, cache, settings=SETTINGS):
    runner = DiTRunner(dit, step_cache=cache)
    return sample(dit, text, settings, shape=SHAPE, runner=runner)


def _inputs(e: torch.Tensor, grid=(1, 2, 2)) -> SimpleNamespace:
    """Stand-in for BlockInputs: what the caches read (e [1, dim], e0 [1, 6, dim], grid)."""
    return SimpleNamespace(e=e, e0=e[:, None].repeat(1, 6, 1), grid=grid)


# --------------------------------------------------------------------------- identity


def test_runner_without_cache_equals_plain_sample(dit, text, plain) -> None:
    assert torch.equal(_cached(dit, text, None), plain)


@pytest.mark.parametrize("make", [lambda d: TeaCache.for_model(d, 0.0), lambda d: TeaCache.for_model(d, 0.0, mode="e0"),
                                  lambda d: MagCache.for_model(d, 0.0), lambda d: MagCache.for_model(d, 0.5, k=0)])
def test_cache_that_cannot_skip_is_bit_identical_and_keeps_no_residual(dit, text, plain, make) -> None:
    cache = make(dit)
    assert torch.equal(_cached(dit, text, cache), plain)
    assert cache.counts() == {"cond": CacheCounts(STEPS, 0), "uncond": CacheCounts(STEPS, 0)}
    assert all(st.residual is None for st in cache._branches.values())   # no memory spent
    assert "0.0% of DiT block evaluations saved" in cache.summary()


# --------------------------------------------------------------------------- skipping


def test_teacache_high_threshold_skips_all_but_first_and_last_and_reports_it(dit, text, plain) -> None:
    cache = TeaCache.for_model(dit, HUGE)
    out = _cached(dit, text, cache)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert cache.counts() == {"cond": CacheCounts(2, STEPS - 2), "uncond": CacheCounts(2, STEPS - 2)}
    assert cache.reused_steps("cond") == cache.reused_steps("uncond") == list(range(1, STEPS - 1))
    assert cache.saved_fraction() == pytest.approx((STEPS - 2) / STEPS)
    line = cache.summary()
    assert "cond 2/8 computed, 6 reused" in line and "uncond 2/8 computed, 6 reused" in line and "75.0%" in line
    assert "\n" not in line


def test_first_and_last_steps_run_even_when_skipping_is_allowed_everywhere(dit, text) -> None:
    for cache in (TeaCache.for_model(dit, HUGE, start_step=0), MagCache.for_model(dit, HUGE, k=99, start_step=0)):
        _cached(dit, text, cache)
        assert cache.reused_steps("cond") == list(range(1, STEPS - 1)), cache.summary()
    cache = TeaCache.for_model(dit, HUGE, start_step=3, end_step=6)
    _cached(dit, text, cache)
    assert cache.reused_steps("cond") == [3, 4, 5]
    cache = TeaCache.for_model(dit, HUGE, mode="e0")      # official use_ret_steps retains 5 steps
    _cached(dit, text, cache)
    assert cache.reused_steps("uncond") == [5, 6]


def test_reused_step_adds_the_stored_residual_to_this_steps_tokens(dit) -> None:
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(1, *SHAPE, generator=g), torch.randn(1, *SHAPE, generator=g)
    ctx = torch.randn(1, 6, tiny.TINY_T5.dim, generator=g)
    t0, t1 = torch.tensor([999.0]), torch.tensor([900.0])
    cache = TeaCache.for_model(dit, HUGE)
    runner = DiTRunner(dit, step_cache=cache)
    runner.begin_run(3)
    runner.begin_step(0)
    assert torch.equal(runner(x0, t0, ctx), dit(x0, t0, ctx))
    runner.begin_step(1)
    got = runner(x1, t1, ctx)
    tok0, inp0 = dit.prepare(x0, t0, ctx)
    out0 = tok0
    for block in dit.blocks:
        out0 = block(out0, inp0)
    tok1, inp1 = dit.prepare(x1, t1, ctx)
    assert torch.equal(got, dit.finish(tok1 + (out0 - tok0), inp1))
    assert cache.counts()["cond"] == CacheCounts(1, 1)


def test_magcache_skips_at_most_k_in_a_row_after_the_retention_steps(dit, text) -> None:
    cache = MagCache.for_model(dit, HUGE, k=2, retention_ratio=0.2)
    steps = 10    # int(2 * 10 * 0.2) = 4: both branches may skip from step 2
    _cached(dit, text, cache, SamplerSettings(steps=steps, cfg=5.0, seed=3))
    for branch in ("cond", "uncond"):
        assert cache.reused_steps(branch) == [2, 3, 5, 6, 8]
    assert cache.counts()["cond"] == CacheCounts(5, 5)
    assert "MagCache[T2V-1.3B" in cache.summary()


def test_magcache_threshold_bounds_the_accumulated_error() -> None:
    # the published 1.3B ratios at 50 steps; with threshold 0.12 the official rule gives this
    cache = MagCache(0.12, k=2, cfg=KNOWN_DIT["T2V-1.3B"])
    cache.begin_run(50)
    tok, inp = torch.zeros(1, 4, 8), _inputs(torch.ones(1, 8))
    decided = []
    for step in range(50):
        compute = cache.should_compute("cond", step, tok, inp)
        if compute:
            cache.store("cond", tok, tok + 1)
        decided.append(compute)
    ratios = list(MAGCACHE_RATIOS["T2V-1.3B"][0::2])
    expected, acc, err, run = [], 1.0, 0.0, 0
    for step in range(50):       # independent restatement of magcache_forward for one branch
        if step == 0 or step == 49 or 2 * step < 20:
            expected.append(True)
            continue
        acc *= ratios[step]
        run += 1
        err += abs(1 - acc)
        if err < 0.12 and run <= 2:
            expected.append(False)
        else:
            expected.append(True)
            acc, err, run = 1.0, 0.0, 0
    assert decided == expected and decided.count(False) > 10


# --------------------------------------------------------------------------- branch state


def test_cond_and_uncond_keep_independent_state() -> None:
    g = torch.Generator().manual_seed(0)
    cond_e = [torch.randn(1, 8, generator=g) * 0.05 + 1 for _ in range(12)]           # small changes
    uncond_e = [torch.randn(1, 8, generator=g) * (0.05 + 0.5 * (i % 2)) + 1 for i in range(12)]
    tok = torch.zeros(1, 3, 8)

    def run(branches: dict[str, list[torch.Tensor]]) -> tuple[dict[str, list[bool]], TeaCache]:
        cache = TeaCache(0.15, coefficients=(1.0, 0.0))    # identity rescale: acc += rel_l1
        cache.begin_run(12)
        seen: dict[str, list[bool]] = {b: [] for b in branches}
        for step in range(12):
            for b, es in branches.items():
                c = cache.should_compute(b, step, tok, _inputs(es[step]))
                if c:
                    cache.store(b, tok, tok + (1.0 if b == "cond" else -2.0))
                seen[b].append(c)
        return seen, cache

    both, cache = run({"cond": cond_e, "uncond": uncond_e})
    alone, _ = run({"cond": cond_e})
    assert both["cond"] == alone["cond"]             # uncond calls do not disturb cond's accumulator
    assert both["cond"] != both["uncond"]
    assert torch.equal(cache.reuse("cond", tok), tok + 1) and torch.equal(cache.reuse("uncond", tok), tok - 2)


def test_teacache_accumulates_the_published_rescaled_relative_l1() -> None:
    cfg = KNOWN_DIT["T2V-14B"]
    cache = TeaCache.for_model(cfg, 0.3)
    assert cache.coefficients == TEACACHE_COEFFICIENTS["e"]["T2V-14B"]
    poly = np.poly1d(TEACACHE_COEFFICIENTS["e"]["T2V-14B"])
    es = [torch.full((1, 8), 1.0 + 0.02 * i) + 0.01 * torch.arange(8.0) for i in range(10)]
    tok = torch.zeros(1, 2, 8)
    cache.begin_run(10)
    got, expected, acc = [], [], 0.0
    for step, e in enumerate(es):
        c = cache.should_compute("cond", step, tok, _inputs(e))
        if c:
            cache.store("cond", tok, tok)
        got.append(c)
        if step in (0, 9):
            acc, compute = 0.0, True
        else:
            prev = es[step - 1]
            acc += poly(((e - prev).abs().mean() / prev.abs().mean()).item())
            compute = acc >= 0.3
            acc = 0.0 if compute else acc
        expected.append(compute)
    assert got == expected and got.count(False) >= 2


# --------------------------------------------------------------------------- tables


def test_published_tables_are_chosen_from_the_detected_variant() -> None:
    for name, key in (("T2V-1.3B", "T2V-1.3B"), ("T2V-14B", "T2V-14B")):
        for mode in ("e", "e0"):
            assert TeaCache.for_model(KNOWN_DIT[name], 0.1, mode=mode).coefficients == TEACACHE_COEFFICIENTS[mode][key]
        assert MagCache.for_model(KNOWN_DIT[name]).table == key
    assert TeaCache.for_model(tiny.TINY_DIT_T2V, 0.1).table == "T2V-1.3B"   # custom width: nearest
    # 480P and 720P I2V weights look alike: the patch grid of the run decides (or the caller)
    tok = torch.zeros(1, 2, 8)
    for grid, key in (((21, 30, 52), "I2V-14B-480P"), ((21, 45, 80), "I2V-14B-720P")):
        for cache in (TeaCache.for_model(KNOWN_DIT["I2V-14B"], 0.1), MagCache.for_model(KNOWN_DIT["I2V-14B"])):
            assert cache.table is None
            cache.begin_run(4)
            cache.should_compute("cond", 0, tok, _inputs(torch.ones(1, 8), grid))
            assert cache.table == key, cache.summary()
    assert TeaCache.for_model(KNOWN_DIT["I2V-14B"], 0.1, resolution="720p").table == "I2V-14B-720P"
    assert MagCache.for_model(KNOWN_DIT["FLF2V-14B"]).table == "I2V-14B-720P"
    with pytest.raises(ValueError, match="resolution"):
        TeaCache.for_model(KNOWN_DIT["I2V-14B"], 0.1, resolution="1080p")


def test_magcache_ratios_are_interpolated_to_the_step_count() -> None:
    table = MAGCACHE_RATIOS["T2V-1.3B"]
    assert len(table) == 100 and len(MAGCACHE_RATIOS["I2V-14B-480P"]) == 80
    cache = MagCache.for_model(KNOWN_DIT["T2V-1.3B"])
    cache.begin_run(50)
    assert cache.step_ratios("cond") == list(table[0::2]) and cache.step_ratios("uncond") == list(table[1::2])
    cache.begin_run(20)
    cond = np.asarray(table[0::2])
    official = cond[np.round(np.arange(20) * 49 / 19).astype(int)]     # nearest_interp, as published
    assert cache.step_ratios("cond") == official.tolist()
    assert cache.step_ratios("cond")[0] == 1.0 and cache.step_ratios("cond")[-1] == table[-2]
    assert interpolate_ratios([1.0, 0.9, 0.8], 1) == [0.8]
    assert interpolate_ratios([1.0, 0.9, 0.8], 5) == [1.0, 1.0, 0.9, 0.8, 0.8]   # round half to even


def test_calibrated_ratios_drive_magcache(dit, text, plain) -> None:
    cal = MagCalibrator()
    assert torch.equal(_cached(dit, text, cal), plain)
    table = cal.table()
    assert len(table) == 2 * STEPS and table[:2] == (1.0, 1.0) and all(r > 0 for r in table)
    cache = MagCache(0.3, k=3, ratios=table, start_step=1)
    out = _cached(dit, text, cache)
    assert torch.isfinite(out).all() and cache.summary().startswith("MagCache[custom")


def test_caches_must_know_the_run_length() -> None:
    cache = TeaCache(0.1, coefficients=(1.0, 0.0))
    with pytest.raises(RuntimeError, match="begin_run"):
        cache.should_compute("cond", 0, torch.zeros(1, 2, 8), _inputs(torch.ones(1, 8)))


def test_magcache_retention_follows_the_official_interleaved_call_counter() -> None:
    cache = MagCache(HUGE, k=9, retention_ratio=0.3, ratios=(1.0,) * 10)
    cache.begin_run(5)    # int(2 * 5 * 0.3) = 3: cond call 2*step >= 3 from step 2, uncond 2*step+1 from step 1
    tok, inp = torch.zeros(1, 2, 8), _inputs(torch.ones(1, 8))
    for step in range(5):
        for b in ("cond", "uncond"):
            if cache.should_compute(b, step, tok, inp):
                cache.store(b, tok, tok)
    assert cache.reused_steps("cond") == [2, 3] and cache.reused_steps("uncond") == [1, 2, 3]
