"""Cross-attention K/V computed once per guidance branch per run (runner.ContextKVCache).

The text and CLIP context of a branch do not change across steps, so the runner keeps each
block's K/V from the branch's first call. These tests pin that the cache is exact (outputs
bit-identical to the plain model over several steps and both branches, T2V and I2V), is
rebuilt when the inputs change, is cleared per run, and holds no more than its formula.
"""
from __future__ import annotations

import pytest
import torch

import tiny
from wan_core.dit import WanDiT
from wan_core.runner import ContextKVCache, DiTRunner, context_kv_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    dit = WanDiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.05)
    return dit


def _inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    cond = torch.randn(1, 7, cfg.text_dim, generator=g)
    uncond = torch.randn(1, 3, cfg.text_dim, generator=g)
    clip = y = None
    if cfg.has_image_input:
        clip = torch.randn(1, 257, cfg.clip_dim, generator=g)
        y = torch.randn(1, cfg.in_dim - 16, 2, 4, 6, generator=g)
    return x, cond, uncond, clip, y


def _t2v_after_one_call(steps: int):
    """A tiny T2V DiT and its context-caching runner after ``begin_run(steps)`` and one "cond"
    call at t = 500; returns ``dit, runner`` and that call's ``x, t, cond``."""
    dit = _model(tiny.TINY_DIT_T2V)
    x, cond, _, _, _ = _inputs(tiny.TINY_DIT_T2V)
    t = torch.tensor([500.0])
    runner = DiTRunner(dit, context_cache=True)
    runner.begin_run(steps)
    runner(x, t, cond, branch="cond")
    return dit, runner, x, t, cond


@pytest.mark.parametrize("cfg", [tiny.TINY_DIT_T2V, tiny.TINY_DIT_I2V], ids=["t2v", "i2v"])
@torch.no_grad()
def test_cached_outputs_are_bit_identical_over_steps_and_branches(cfg):
    dit = _model(cfg)
    x, cond, uncond, clip, y = _inputs(cfg)
    runner = DiTRunner(dit, context_cache=True)
    runner.begin_run(3)
    for step, t in enumerate((900.0, 500.0, 100.0)):
        runner.begin_step(step)
        tt = torch.tensor([t])
        xs = x * (1 + step)
        for branch, ctx in (("cond", cond), ("uncond", uncond)):
            got = runner(xs, tt, ctx, clip, y, branch=branch)
            assert torch.equal(got, dit(xs, tt, ctx, clip, y)), (step, branch)
    assert len(runner.context_kv._entries) == 2


@torch.no_grad()
def test_cache_skips_the_context_projections_after_the_first_step():
    dit = _model(tiny.TINY_DIT_T2V)
    x, cond, _, _, _ = _inputs(tiny.TINY_DIT_T2V)
    calls = []
    hook = dit.blocks[0].cross_attn.k.register_forward_hook(lambda *a: calls.append(1))
    runner = DiTRunner(dit)  # default: on, the blocks run on the CPU
    runner.begin_run(3)
    for step in range(3):
        runner(x, torch.tensor([500.0]), cond, branch="cond")
    hook.remove()
    assert len(calls) == 1


@torch.no_grad()
def test_changed_context_rebuilds_the_entry():
    dit, runner, x, t, cond = _t2v_after_one_call(2)
    other = cond + 1.0                       # another prompt on the same branch name
    assert torch.equal(runner(x, t, other, branch="cond"), dit(x, t, other))
    cond2 = cond.clone()
    runner(x, t, cond2, branch="cond")
    cond2.mul_(-1.0)                         # written in place after the entry was built
    assert torch.equal(runner(x, t, cond2, branch="cond"), dit(x, t, cond2))
    same = cond2.clone()                     # equal content, another tensor: reused, still exact
    assert torch.equal(runner(x, t, same, branch="cond/w1"), dit(x, t, same))


@torch.no_grad()
def test_begin_run_clears_the_cache_so_new_weights_count():
    dit, runner, x, t, cond = _t2v_after_one_call(1)
    assert runner.context_kv.nbytes() > 0
    dit.blocks[0].cross_attn.k.weight.add_(0.1)   # e.g. a LoRA merged between runs
    runner.begin_run(1)
    assert runner.context_kv.nbytes() == 0
    assert torch.equal(runner(x, t, cond, branch="cond"), dit(x, t, cond))


@pytest.mark.parametrize("cfg", [tiny.TINY_DIT_T2V, tiny.TINY_DIT_I2V], ids=["t2v", "i2v"])
@torch.no_grad()
def test_cache_memory_matches_the_formula_and_is_bounded(cfg):
    dit = _model(cfg)
    x, cond, uncond, clip, y = _inputs(cfg)
    t = torch.tensor([500.0])
    runner = DiTRunner(dit, context_cache=True)
    runner.begin_run(1)
    runner(x, t, cond, clip, y, branch="cond")
    runner(x, t, uncond, clip, y, branch="uncond")
    assert runner.context_kv.nbytes() == context_kv_bytes(cfg, 1, torch.float32, branches=2)
    cache = ContextKVCache(max_branches=2)
    for i in range(5):
        cache.entry(f"b{i}", cond, None)["x"] = (torch.zeros(3), torch.zeros(3), None, None)
    assert len(cache._entries) == 2 and cache.nbytes() == 2 * 2 * 3 * 4


@torch.no_grad()
def test_cache_is_off_by_default_off_the_cpu_and_when_disabled():
    dit = _model(tiny.TINY_DIT_T2V)
    x, cond, _, _, _ = _inputs(tiny.TINY_DIT_T2V)
    runner = DiTRunner(dit, context_cache=False)
    runner.begin_run(1)
    runner(x, torch.tensor([500.0]), cond)
    assert runner.context_kv.nbytes() == 0
