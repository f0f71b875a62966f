"""Block swap (wan_core.offload.BlockSwap): bit-identical output for K = 0, some, all.

On this CPU-only machine compute and offload device are both the CPU, and the executor
still makes a real copy of every streamed block and drops it after use, so the whole
bookkeeping (prefetch one block ahead, restore the masters, byte counts) is exercised. The
CUDA test (real side stream, pinned masters) runs only where a GPU is present.
"""
from __future__ import annotations

import dataclasses

import factory
import pytest
import tiny
import torch

from wan_core.conditioning import TextEmbeds
from wan_core.dit import WanDiT
from wan_core.loaders import load_dit
from wan_core.offload import BlockSwap, module_bytes, on_device
from wan_core.pipeline import SamplerSettings, sample
from wan_core.planner import dit_sizes_from_module
from wan_core.runner import DiTRunner

CFG = dataclasses.replace(tiny.TINY_DIT_T2V, num_layers=4)


def _model(storage: str, tmp_path) -> WanDiT:
    if storage == "scaled_fp8":
        return load_dit(factory.write_checkpoint(tmp_path, "dit", "scaled_fp8", cfg=CFG), weight_dtype="keep")
    torch.manual_seed(0)
    return WanDiT(CFG).eval().requires_grad_(False)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([321.0]),
            torch.randn(1, 5, CFG.text_dim, generator=g))


def _pointers(model):
    return [p.data_ptr() for p in model.parameters()]


@pytest.mark.parametrize("storage, k, prefetch", [
    ("fp32", 0, True), ("fp32", 1, True), ("fp32", 3, True), ("fp32", 4, True), ("fp32", 9, True),
    ("fp32", 0, False), ("fp32", 2, False),
    ("scaled_fp8", 0, True), ("scaled_fp8", 2, True), ("scaled_fp8", 4, True), ("scaled_fp8", 1, False)])
def test_block_swap_output_is_bit_identical_to_plain_forward(tmp_path, storage: str, k: int, prefetch: bool) -> None:
    model = _model(storage, tmp_path)
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
    before = _pointers(model)
    swap = BlockSwap(k, "cpu", prefetch=prefetch).setup(model)
    runner = DiTRunner(model, executor=swap)
    with torch.no_grad():
        outs = [runner(x, t, ctx) for _ in range(2)]
    for out in outs:
        assert torch.equal(out, ref)
    streamed = max(0, CFG.num_layers - k)
    assert swap.streamed_blocks == 2 * streamed          # each streamed block copied in once per call
    assert _pointers(model) == before                    # masters back in place, device copies dropped
    swap.release()
    assert _pointers(model) == before


def test_sample_with_block_swap_equals_plain_sample(tmp_path) -> None:
    model = _model("scaled_fp8", tmp_path)
    g = torch.Generator().manual_seed(2)
    text = TextEmbeds(torch.randn(5, CFG.text_dim, generator=g), torch.randn(3, CFG.text_dim, generator=g))
    settings = SamplerSettings(steps=3, cfg=4.0, seed=7)
    ref = sample(model, text, settings, shape=(16, 2, 4, 4))
    swap = BlockSwap(2, "cpu").setup(model)
    out = sample(model, text, settings, shape=(16, 2, 4, 4), runner=DiTRunner(model, executor=swap))
    assert torch.equal(out, ref)
    assert swap.streamed_blocks == 3 * 2 * 2             # steps x (cond, uncond) x streamed blocks


@pytest.mark.parametrize("k, prefetch, streaming_blocks", [(0, True, 2), (2, True, 2), (3, True, 1),
                                                           (4, True, 0), (1, False, 1)])
def test_device_bytes_per_plan(tmp_path, k: int, prefetch: bool, streaming_blocks: int) -> None:
    model = _model("scaled_fp8", tmp_path)
    block = module_bytes(model.blocks[0])
    other = module_bytes(model) - CFG.num_layers * block
    swap = BlockSwap(k, "cpu", prefetch=prefetch).setup(model)
    got = swap.device_bytes()
    assert got.resident == other + k * block
    assert got.streaming == streaming_blocks * block
    assert got.peak == got.resident + got.streaming
    sizes = dit_sizes_from_module(model)
    assert sizes.other_bytes == other and sizes.block_bytes == (block,) * CFG.num_layers
    # the same figure without placing anything
    assert BlockSwap(k, prefetch=prefetch).device_bytes(model.blocks, other) == got


def test_interrupted_run_restores_every_master(tmp_path) -> None:
    model = _model("fp32", tmp_path)
    before = _pointers(model)
    swap = BlockSwap(1, "cpu").setup(model)

    class Stop(Exception):
        pass

    def boom(*_args, **_kw):
        raise Stop

    model.blocks[2].forward = boom
    x, t, ctx = _inputs()
    with pytest.raises(Stop), torch.no_grad():
        DiTRunner(model, executor=swap)(x, t, ctx)
    assert _pointers(model) == before
    del model.blocks[2].forward


def test_on_device_uses_copies_and_restores_the_masters(tmp_path) -> None:
    model = _model("fp32", tmp_path)
    before = _pointers(model)
    with on_device(model, "cpu") as m:       # same device: nothing copied, nothing to drop
        assert _pointers(m) == before
    assert _pointers(model) == before


def test_executor_sets_itself_up_from_the_blocks_it_is_given(tmp_path) -> None:
    model = _model("fp32", tmp_path)
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
        swap = BlockSwap(1, "cpu")
        assert torch.equal(DiTRunner(model, executor=swap)(x, t, ctx), ref)
    assert swap.streamed_blocks == CFG.num_layers - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("k", [0, 2, 4])
def test_cuda_block_swap_is_bit_identical_and_streams_from_pinned_ram(tmp_path, k: int) -> None:
    model = _model("scaled_fp8", tmp_path)
    x, t, ctx = (v.cuda() for v in _inputs())
    with torch.no_grad(), on_device(model, "cuda"):
        ref = model(x, t, ctx)
    assert all(p.device.type == "cpu" for p in model.parameters())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    swap = BlockSwap(k, "cuda").setup(model)
    assert all(p.is_pinned() for b in model.blocks[k:] for p in b.parameters())
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = DiTRunner(model, executor=swap)(x, t, ctx)
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    plan = swap.device_bytes()
    weights_peak = torch.cuda.max_memory_allocated() - base
    assert weights_peak >= plan.resident
    swap.release()
    assert all(p.device.type == "cpu" for p in model.parameters())
