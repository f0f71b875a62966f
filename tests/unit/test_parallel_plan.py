"""The run plan plans per rank when several processes share a video (wan_core.parallel_plan).

Decisions are pure arithmetic on the published 14B sizes; the estimate is checked against
the real sequence-parallel code run for one rank on the simulated GPU (wan_core.memsim_parallel:
fake tensors, the ``fake`` process-group backend) at real widths (1.3B: dim 1536, ffn 8960,
12 heads) and a real size (832x480, 33 frames: 14,040 tokens), two blocks to keep it quick.
Measured planned / simulated: Ulysses 2 1.093, Ring 2 1.118, Ulysses 2 x Ring 2 1.137,
CFG 2 x Ulysses 2 1.099, FSDP2-sharded Ulysses 2 1.239 (two gathered blocks planned, the
CPU-run FSDP2 holds one: CUDA's all-gather stream may hold the next); the weights a sharded
rank keeps are planned to within 8 bytes. ``bench/multi_gpu.py --vram`` runs the 14B at 720p x 81.
"""
from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from wan_core.configs import KNOWN_DIT, DiTConfig
from wan_core.distributed import ParallelConfig
from wan_core.memsim import FakeGPU, SimJob, fake_dit
from wan_core.memsim_parallel import fake_world, shard_for_simulation, simulate_rank_step
from wan_core.parallel_plan import block_shards, block_shards_for, plan_rank, rank_activation_bytes
from wan_core.placement import plan_sampling
from wan_core.planner import GiB, PlanError, dit_sizes, tokens_for
from wan_core.run_options import Job, RunOptions

T14 = KNOWN_DIT["T2V-14B"]
TOKENS_720P = tokens_for(1280, 720, 81)   # 75,600
MID = DiTConfig(dim=1536, ffn_dim=8960, num_layers=2)
JOB = SimJob("custom", "bf16", 832, 480, 33)
CEILING = 1.25


@pytest.fixture(scope="module")
def t14():
    """The published 14B's sizes and block shards in bf16 (meta builds, nothing allocated)."""
    return dit_sizes(T14, "bf16"), block_shards_for(T14, "bf16")


def test_14b_bf16_720p_on_8_ranks_of_24gb_is_sharded_not_swapped(t14):
    sizes, shards = t14
    assert sizes.total_bytes > 24 * GiB   # the whole DiT (26.6 GiB) fits no rank
    plan = plan_rank(24 * GiB, sizes, TOKENS_720P, ParallelConfig(8), shards)
    assert plan.weights == "sharded" and plan.chunk == 9450
    assert plan.weight_bytes == sizes.other_bytes + shards.per_rank(8)   # 1/8 of the blocks' Linear weights
    assert plan.peak_bytes <= 24 * GiB and "sharded over 8 ranks (FSDP2)" in plan.describe()
    assert "9450 of 75600 tokens a rank" in plan.describe()
    # sharding off: block swap with the most resident blocks that fit, activations of the rank's chunk
    swap = plan_rank(24 * GiB, sizes, TOKENS_720P, ParallelConfig(8, shard_weights="off"), shards)
    assert swap.weights == "swap" and 0 < swap.resident_blocks < 40 and swap.peak_bytes <= 24 * GiB
    # a budget holding everything keeps the weights whole (no all-gathers)
    assert plan_rank(80 * GiB, sizes, TOKENS_720P, ParallelConfig(8), shards).weights == "whole"


def test_a_rank_plans_its_token_share_and_the_layout_buffers(t14):
    sizes = t14[0]
    one = rank_activation_bytes(sizes, TOKENS_720P, ParallelConfig())
    ulysses = rank_activation_bytes(sizes, TOKENS_720P, ParallelConfig(8))
    ring = rank_activation_bytes(sizes, TOKENS_720P, ParallelConfig(1, 8))
    assert ulysses < one / 2 and ulysses <= ring   # a share of the tokens; the ring holds K/V blocks and scores
    # tokens that do not divide the ranks are padded: 75,601 tokens -> chunks of 9,451
    assert plan_rank(80 * GiB, sizes, TOKENS_720P + 1, ParallelConfig(8)).chunk == 9451
    # with per-token timesteps (Wan 2.2 TI2V) the prepare phase holds the full e / e0
    assert rank_activation_bytes(sizes, TOKENS_720P, ParallelConfig(8), per_token_timesteps=True) > ulysses


def test_a_budget_too_small_for_any_placement_names_the_minimum(t14):
    sizes, shards = t14
    # the smallest placement of a 14B rank is block swap with every block streamed (5.71 GiB:
    # two blocks in flight beat 1/8 of forty)
    with pytest.raises(PlanError, match=r"4.00 GiB per rank cannot run .* the minimum is 5.71 GiB per rank \(every "
                                        r"block streamed"):
        plan_rank(4 * GiB, sizes, TOKENS_720P, ParallelConfig(8), shards)
    with pytest.raises(PlanError, match=r"minimum is [0-9.]+ GiB per rank \(sharded blocks"):
        plan_rank(4 * GiB, sizes, TOKENS_720P, ParallelConfig(8, shard_weights="on"), shards)
    with pytest.raises(ValueError, match="shard_weights 'on' cannot shard the DiT here: there is one rank"):
        plan_rank(24 * GiB, sizes, TOKENS_720P, ParallelConfig(1, 1, True, "on"), shards)
    with pytest.raises(ValueError, match="shard_weights must be one of auto, on, off"):
        ParallelConfig(2, shard_weights="yes")


def test_placement_of_a_rank_on_the_cpu_and_with_a_budget():
    torch.manual_seed(0)
    cfg = DiTConfig(dim=64, ffn_dim=128, num_layers=2, text_dim=32, freq_dim=32, text_len=8, head_dim=16)
    from wan_core.dit import WanDiT

    dit = WanDiT(cfg).eval()
    job = Job(64, 64, 5)
    on = plan_sampling(dit, job, RunOptions(), "cpu", parallel=ParallelConfig(2, shard_weights="on"))
    assert on.sharded and on.resident_blocks is None and "sharded" in on.describe()
    auto = plan_sampling(dit, job, RunOptions(), "cpu", parallel=ParallelConfig(2))
    assert not auto.sharded and auto.resident_blocks is None   # no budget on the CPU: as one process
    with pytest.raises(ValueError, match="block swap\\) and sharded weights cannot be combined"):
        plan_sampling(dit, job, RunOptions(resident_blocks=1), "cpu", parallel=ParallelConfig(2, shard_weights="on"))
    with pytest.raises(ValueError, match="--cfg-parallel alone keeps a whole DiT"):
        plan_sampling(dit, job, RunOptions(), "cpu", parallel=ParallelConfig(1, 1, True, "on"))


def _simulate(config: ParallelConfig, sharded: bool) -> tuple[int, int]:
    """(simulated peak, bytes on the device at the step's start) of rank 0."""
    with fake_world(config, 0) as groups:
        if sharded:
            with FakeGPU(device_type="cpu") as gpu:
                dit = fake_dit(MID, JOB.storage)
                shard_for_simulation(dit, groups, gpu)
                gc.collect()
                stage = simulate_rank_step(gpu, dit, JOB, groups, sharded=True)
                assert stage.end == stage.start
                return stage.peak, stage.start
        with FakeGPU() as gpu:
            stage = simulate_rank_step(gpu, fake_dit(MID, JOB.storage), JOB, groups, resident_blocks=MID.num_layers)
            assert stage.end == stage.start
            return stage.peak, stage.start


@pytest.mark.parametrize("layout, sharded", [((2, 1, False), False), ((1, 2, False), False), ((2, 2, False), False),
                                             ((2, 1, True), False), ((2, 1, False), True)],
                         ids=["ulysses2", "ring2", "ulysses2xring2", "ulysses2+cfg", "ulysses2+sharded"])
def test_rank_plan_brackets_the_simulated_rank(layout, sharded):
    config = ParallelConfig(*layout)
    sizes = dit_sizes(MID, JOB.storage)
    tokens = tokens_for(JOB.width, JOB.height, JOB.frames)
    peak, start = _simulate(config, sharded)
    if sharded:
        with FakeGPU():
            shards = block_shards(fake_dit(MID, JOB.storage))
        assert shards == block_shards_for(MID, JOB.storage)
        plan = plan_rank(1 << 40, sizes, tokens, dataclasses.replace(config, shard_weights="on"), shards)
        # the weights a sharded rank keeps (measured: equal but for 8 bytes, a scalar the session holds)
        assert abs(plan.weight_bytes - start) <= 64
    else:
        plan = plan_rank(1 << 40, sizes, tokens, config)
    planned = plan.peak_bytes - plan.reserve_bytes
    assert peak <= planned <= CEILING * peak, (planned / peak, planned, peak)


def test_the_header_check_before_loading_uses_the_rank_plan():
    """--vram-budget under torchrun is a rank's: 6 GiB cannot hold a 14B 720p x 81 step in one
    process (75,600 tokens) but can on 8 ranks (9,450 tokens each, every block streamed)."""
    from wan_core.cli_checks import check_plan
    from wan_core.layouts import Detected

    header = Detected("dit", "official", T14, {}, quant="none")
    options = RunOptions(vram_budget=6 * GiB)
    with pytest.raises(PlanError, match="cannot run T2V-14B bf16 at 75600 tokens"):
        check_plan(header, options, 1280, 720, 81, "sdpa", "cuda")
    check_plan(header, options, 1280, 720, 81, "sdpa", "cuda", parallel=ParallelConfig(8))
    with pytest.raises(PlanError, match="per rank cannot run"):
        check_plan(header, RunOptions(vram_budget=5 * GiB), 1280, 720, 81, "sdpa", "cuda", parallel=ParallelConfig(8))


def test_sharded_blocks_add_their_all_gathers_to_the_comm_volume(t14):
    """Each DiT call all-gathers the sharded blocks: a rank sends its 1/P shard to P - 1 peers.
    14B bf16 720p x 81, Ulysses 8, two calls a step: 27.13 GB of Ulysses traffic, 49.19 GB of
    all-gathers (bench/multi_gpu.py prints both)."""
    from wan_core.distributed import comm_bytes_per_step

    sharded = t14[1].total_sharded
    plain = comm_bytes_per_step(ParallelConfig(8), TOKENS_720P, 5120, 40, 16 * 21 * 90 * 160)
    with_shards = comm_bytes_per_step(ParallelConfig(8), TOKENS_720P, 5120, 40, 16 * 21 * 90 * 160,
                                      sharded_bytes=sharded)
    assert plain["fsdp"] == 0 and round(plain["total"] / 1e9, 2) == 27.13
    assert with_shards["fsdp"] == 2 * sharded * 7 // 8 and round(with_shards["fsdp"] / 1e9, 2) == 49.19
