"""The embedded context and cross-attention K/V computed once per guidance branch per run
(runner.ContextKVCache), and counted by the run plan on a GPU.

The text and CLIP context of a branch do not change across steps, so the runner keeps the
embedded context and each block's K/V from the branch's first call. These tests pin that the
cache is exact (outputs bit-identical to the plain model over several steps and both
branches, T2V and I2V), is rebuilt when the inputs change, is cleared per run, holds no more
than its formula; and that on a GPU the memory plan counts those bytes, turns the cache on
only when it fits beside the resident blocks it chose (off, and said so, when not), and that
the simulated GPU step grows by what the plan adds.
"""
from __future__ import annotations

import pytest
import torch

import tiny
from wan_core.configs import DiTConfig
from wan_core.dit import WanDiT
from wan_core.memsim import FakeGPU, SimJob, fake_dit, simulate_dit_step
from wan_core.planner import (DEFAULT_RESERVE, dit_activation_bytes, dit_sizes, dit_sizes_from_module, plan_memory,
                              tokens_for)
from wan_core.run_plan import Job, RunOptions, plan_sampling, prepare_run, stage_bytes
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
def test_text_and_image_embeddings_run_once_per_branch_per_run():
    dit = _model(tiny.TINY_DIT_I2V)
    x, cond, uncond, clip, y = _inputs(tiny.TINY_DIT_I2V)
    calls = {"text": 0, "image": 0}
    hooks = [dit.text_embedding.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1)),
             dit.img_emb.register_forward_hook(lambda *a: calls.__setitem__("image", calls["image"] + 1))]
    runner = DiTRunner(dit)
    for run in range(2):
        runner.begin_run(3)
        for step in range(3):
            for branch, ctx in (("cond", cond), ("uncond", uncond)):
                runner(x, torch.tensor([500.0]), ctx, clip, y, branch=branch)
    for h in hooks:
        h.remove()
    assert calls == {"text": 4, "image": 4}   # each branch's first call of each run


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
    # float32: the padding collapsed (wan_core.text_pad), L real rows + 1 pad row per branch,
    # under the bound the run plan counts (text_len rows)
    held = runner.context_kv.nbytes()
    assert held == sum(context_kv_bytes(cfg, 1, torch.float32, branches=1, text_rows=c.shape[1] + 1)
                       for c in (cond, uncond))
    assert held < context_kv_bytes(cfg, 1, torch.float32, branches=2)
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


# --------------------------------------------------------------------------- the run plan on a GPU

# 1.3B widths, 2 blocks, 832x480x81 (32760 tokens), bf16: K/V of 2 branches x 2 blocks = 12.6 MB
PLAN_CFG = DiTConfig(dim=1536, ffn_dim=8960, num_layers=2)
PLAN_JOB = SimJob("custom", "bf16", 832, 480, 81)


def _plans(budget: int):
    sizes = dit_sizes(PLAN_CFG, "bf16")
    tokens = tokens_for(832, 480, 81)
    kv = context_kv_bytes(PLAN_CFG, 1, torch.bfloat16)
    return (plan_memory(budget, sizes, tokens), plan_memory(budget, sizes, tokens, context_cache_bytes=kv), kv)


def test_plan_counts_the_cache_when_it_fits_and_keeps_the_resident_blocks_when_not():
    roomy, with_cache, kv = _plans(8 << 30)
    assert with_cache.context_cache and with_cache.resident_blocks == roomy.resident_blocks == 2
    assert with_cache.stages.dit_step == roomy.stages.dit_step + kv
    assert with_cache.dit_peak_bytes == roomy.dit_peak_bytes + kv
    assert "text K/V cache on (0.01 GiB)" in with_cache.describe()
    # a budget the plan without the cache fills to within half the cache: K unchanged, cache off
    tight = roomy.stages.dit_step + roomy.reserve_bytes + kv // 2
    plain, refused, _ = _plans(tight)
    assert not refused.context_cache and refused.resident_blocks == plain.resident_blocks == 2
    assert refused.stages.dit_step == plain.stages.dit_step and refused.dit_peak_bytes == plain.dit_peak_bytes
    assert "text K/V cache off (0.01 GiB does not fit beside 2 resident blocks)" in refused.describe()


def test_gpu_placement_turns_the_cache_on_only_where_the_plan_fits_it():
    with FakeGPU():
        dit = fake_dit(PLAN_CFG, "bf16")
        job = Job(832, 480, 81)
        kv = context_kv_bytes(PLAN_CFG, 1, torch.bfloat16)
        roomy = plan_sampling(dit, job, RunOptions(vram_budget=8 << 30), "cuda")
        assert roomy.context_cache is True and "text K/V cache on" in roomy.describe()
        need = roomy.memory.stages.dit_step + roomy.memory.reserve_bytes
        tight = plan_sampling(dit, job, RunOptions(vram_budget=need - kv // 2), "cuda")
        assert tight.context_cache is False and "text K/V cache off" in tight.describe()
        assert tight.resident_blocks == roomy.resident_blocks
        explicit = plan_sampling(dit, job, RunOptions(resident_blocks=1), "cuda")
        assert explicit.context_cache is False and "text K/V cache off (not planned)" in explicit.describe()
        assert plan_sampling(dit, job, RunOptions(), "cpu").context_cache is None   # the runner's CPU default
        # the host is asked to make room for it; the runner of the plan gets the decision
        sizes = dit_sizes_from_module(dit, 2)
        whole = sizes.total_bytes + dit_activation_bytes(sizes, tokens_for(832, 480, 81)) + DEFAULT_RESERVE
        assert stage_bytes("sampling", dit, RunOptions(), job) == whole + kv
        with prepare_run(dit, job, RunOptions(vram_budget=8 << 30), "cuda") as plan, plan.sampling() as runner:
            assert runner.context_cache is True


def test_simulated_gpu_step_grows_by_the_planned_cache_bytes():
    _, plan, kv = _plans(8 << 30)
    with FakeGPU() as gpu:
        dit = fake_dit(PLAN_CFG, "bf16")
        plain = simulate_dit_step(gpu, dit, PLAN_JOB, plan.resident_blocks)
        cached = simulate_dit_step(gpu, dit, PLAN_JOB, plan.resident_blocks, context_cache=plan.context_cache)
    assert cached.end == cached.start                   # dropped with the run
    # the step peaks in the uncond pass with both branches held: the whole cache on top of the
    # plain peak but the embedded text of the current call, which the plain step holds too
    # (measured to the byte: 14,155,776 = 15,728,640 - 512 x 1536 x 2)
    assert kv - (cached.peak - plain.peak) == 512 * 1536 * 2, (cached, plain, kv)
    assert cached.peak <= plan.stages.dit_step <= 1.15 * cached.peak
