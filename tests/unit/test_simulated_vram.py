"""The simulated GPU (wan_core.memsim): the tracker counts device bytes exactly, the real code
runs on the fake device, and the planner's estimate brackets the simulated peak.

The plan-vs-simulation checks use real widths (T2V-1.3B: dim 1536, ffn 8960, and the real
Wan VAE) at real sizes (832x480): a fake tensor costs the same Python time at any size, so
only the number of ops (few blocks, few frames) is cut down. ``bench/simulated_vram.py``
runs the full published models, all stages, all 81 frames.
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from wan_core.configs import DiTConfig
from wan_core.memsim import (FakeGPU, SimJob, attention_workspace_bytes, fake_dit, fake_vae, simulate_dit_step,
                             simulate_vae_decode)
from wan_core.offload import BlockSwap, module_bytes, on_device
from wan_core.planner import dit_sizes, plan_memory, tokens_for, vae_decode_bytes

MiB = 1 << 20
TOLERANCE = 1.15


@pytest.fixture(scope="module")
def gpu():
    with FakeGPU() as session:
        yield session


def test_tracker_counts_a_known_allocation_pattern_exactly(gpu) -> None:
    mem = gpu.memory
    gc.collect()
    base, seen = mem.current, mem.allocations
    mem.reset_peak()
    a = torch.empty(1000, device="cuda")                  # 4000 bytes
    view, part = a.view(10, 100), a[10:20]                # views: no new storage
    assert mem.current - base == 4000
    b = a * 2                                             # a second storage
    a.mul_(3)                                             # in place: nothing new
    c = torch.empty(1000, dtype=torch.bfloat16)           # the CPU is not the device
    assert mem.current - base == 8000 and mem.allocations - seen == 2
    del b
    assert mem.current - base == 4000                     # the free is seen at once
    del a, view                                           # `part` still holds the storage
    assert mem.current - base == 4000
    del part
    gc.collect()
    assert mem.current == base and mem.peak - base == 8000
    del c


def test_shim_runs_cuda_indexing_moves_and_parameter_swaps(gpu) -> None:
    base = gpu.memory.current
    x = torch.empty(2, 3, 8, 4, 4).to("cuda")
    assert x.device.type == "cuda" and gpu.memory.current - base == x.numel() * 4
    ref = torch.empty(2, 3, 8, 4, 4)                      # a (fake) CPU tensor indexes natively
    for index in ((slice(None), slice(None), slice(None, 1)), (Ellipsis, None, 0), (None, 1, Ellipsis, slice(2, 3), -1),
                  (slice(None), -1), (slice(1, None, 2),), 1):
        assert x[index].shape == ref[index].shape, index
    x[:, :, 0] = 1.0
    x[:, :, 1:3] = torch.empty(2, 3, 2, 4, 4)
    assert gpu.memory.current - base == x.numel() * 4      # setitem writes in place
    p = torch.nn.Parameter(torch.empty(4, 4), requires_grad=False)
    p.data = torch.empty(4, 4, device="cuda")
    assert p.device.type == "cuda" and (p * 2).device.type == "cuda"
    del x, p


def test_sdpa_runs_the_fused_cuda_kernel_with_its_logsumexp_rows(gpu) -> None:
    b, h, n, d = 1, 12, 4096, 128
    q = torch.empty(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    gc.collect()
    base = gpu.memory.current
    gpu.memory.reset_peak()
    out = F.scaled_dot_product_attention(q, q, q)
    # output + float32 log-sum-exp rows: no [n, n] score matrix (the CPU math path's 400 MiB)
    lse = attention_workspace_bytes("sdpa", h, n, n, d, b)
    philox = 3 * 8                                        # flash's RNG seed and offset (uint64 [2] and [])
    assert gpu.memory.peak - base == out.numel() * 2 + lse + philox
    assert lse == 4 * b * h * n
    assert attention_workspace_bytes("math", h, n, n, d) > 100 * lse
    del out


def test_block_swap_on_the_fake_device_takes_the_no_stream_path(gpu) -> None:
    cfg = DiTConfig(dim=256, ffn_dim=512, num_layers=3)
    dit = fake_dit(cfg, "bf16")
    gc.collect()
    base = gpu.memory.current
    swap = BlockSwap(1, compute_device="cuda").setup(dit)
    assert swap._stream is None and swap.compute_device == torch.device("cuda", 0)
    placed = module_bytes(dit) - sum(module_bytes(b) for b in dit.blocks[1:])
    assert gpu.memory.current - base == placed
    swap.release()
    gc.collect()
    assert gpu.memory.current == base


def test_dit_step_plan_brackets_the_simulated_peak(gpu) -> None:
    # 1.3B widths, 4 blocks, 832x480x81 (32760 tokens); a budget that streams 3 of 4 blocks
    cfg = DiTConfig(dim=1536, ffn_dim=8960, num_layers=4)
    job = SimJob("custom", "fp8_e4m3fn", 832, 480, 81)
    sizes = dit_sizes(cfg, job.storage)
    tokens = tokens_for(job.width, job.height, job.frames)
    dit = fake_dit(cfg, job.storage)
    budget = plan_memory(1 << 40, sizes, tokens).stages.dit_step - sizes.block_bytes[0] // 2 + (512 * MiB)
    plan = plan_memory(budget, sizes, tokens)
    assert 0 < plan.resident_blocks < cfg.num_layers
    stage = simulate_dit_step(gpu, dit, job, plan.resident_blocks)
    assert stage.end == stage.start                       # every device copy dropped after the step
    assert stage.peak <= plan.stages.dit_step <= TOLERANCE * stage.peak, (stage, plan.stages)


def test_tiled_vae_decode_plan_brackets_the_simulated_peak(gpu) -> None:
    vae = fake_vae()
    job = SimJob("custom", "bf16", 832, 480, 9)           # 3 latent frames reach the steady chunk
    stage = simulate_vae_decode(gpu, vae, job, 32)
    planned = vae_decode_bytes(module_bytes(vae), (32, 32))
    assert stage.end == stage.start
    assert stage.peak <= planned <= TOLERANCE * stage.peak, (stage, planned)
    with on_device(vae, "cuda", empty_cache=False):       # the weights alone: what on_device adds
        assert gpu.memory.current - stage.start == module_bytes(vae)


@pytest.mark.parametrize("dim, heads", [(1536, 12), (5120, 40)])
def test_attention_backend_workspaces_fit_under_the_planned_attention_phase(dim, heads) -> None:
    # at the attention call a block holds 8 d (prepare's tokens, the block input) + the norm
    # output, q, k, v and the output in bf16 (5 x 2 d); the kernel's workspace comes on top
    tokens, c = 32760, 2
    planned_phase = tokens * (20 * dim + 2 * c * dim + 4 * heads)    # the planner's attention phase + 4 h
    for backend in ("sdpa", "flash", "sage"):
        held = tokens * (8 * dim + 5 * c * dim) + attention_workspace_bytes(backend, heads, tokens, tokens, 128)
        assert held <= planned_phase, backend
