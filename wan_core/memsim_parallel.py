"""One rank of a multi-process run on the simulated GPU (:mod:`wan_core.memsim`).

The real sequence-parallel code (:class:`~wan_core.distributed.SequenceParallelRunner`, the
Ulysses all-to-alls, the ring's K/V blocks, :class:`~wan_core.distributed.CFGParallel`,
FSDP2 sharding by :func:`~wan_core.distributed.shard_blocks`) runs for one rank at real
shapes on fake tensors, its collectives on PyTorch's ``fake`` process-group backend (every
collective returns at once and moves no data: values are meaningless, shapes and lifetimes
are the real ones). What the rank holds on the device is counted as in a single-process
simulation.

Two placements are simulated:

- whole weights or block swap (:func:`simulate_rank_step` with ``resident_blocks``): on the
  fake ``cuda`` device, through the real :class:`~wan_core.offload.BlockSwap`;
- FSDP2-sharded blocks (``sharded=True``): FSDP2 needs a device handle the CPU-only wheel
  lacks for ``cuda``, so this one runs in a :class:`~wan_core.memsim.FakeGPU` counting the
  ``cpu`` device (``FakeGPU(device_type="cpu")``): the model is built there (every weight
  counts as on the device, as after the plan placed it), sharded, then one step runs.
  FSDP2 frees gathered weights by resizing their storage, which :func:`storage_resizes`
  reports to the tracker. CPU attention kernels return the same outputs and log-sum-exp
  rows as the CUDA ones.

Not modelled beyond :mod:`wan_core.memsim`'s list: NCCL's own buffers (outside PyTorch's
allocator, tens to hundreds of MB per communicator) and memory FSDP2 holds back on its
all-gather stream while a copy is in flight.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh
from torch.testing._internal.distributed.fake_pg import FakeStore   # PyTorch's own no-op backend

from .conditioning import latent_shape, make_noise
from .distributed import CFGParallel, ParallelConfig, ParallelGroups, make_groups, shard_blocks
from .memsim import FakeGPU, SimJob, Stage
from .offload import BlockSwap
from .runner import DiTRunner
from .schedulers import flow_schedule, sample_euler

__all__ = ["fake_world", "storage_resizes", "shard_for_simulation", "simulate_rank_step"]


@contextlib.contextmanager
def fake_world(config: ParallelConfig, rank: int = 0) -> Iterator[ParallelGroups]:
    """This process as ``rank`` of a ``config.world_size`` world on the ``fake`` backend
    (no other process, no data moved); yields the rank's groups. Refuses to run when a real
    process group is already joined."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; simulate ranks in a "
                           "process of their own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=config.world_size)
    try:
        yield make_groups(config)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def storage_resizes(gpu: FakeGPU) -> Iterator[None]:
    """Report ``UntypedStorage.resize_`` calls (FSDP2 frees and re-allocates gathered
    parameters that way, outside any op) to ``gpu``'s tracker for the block."""
    original = torch.UntypedStorage.resize_

    def resize_(storage, size):
        out = original(storage, size)
        gpu.memory.resized(storage)
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


def shard_for_simulation(dit, groups: ParallelGroups, gpu: FakeGPU) -> None:
    """:func:`~wan_core.distributed.shard_blocks` on the simulated device (its mesh is built
    outside the fake tensors, which cannot run the mesh's coordinate lookup)."""
    with unset_fake_temporarily():
        mesh = DeviceMesh.from_group(groups.sequence_group, gpu.device_type)
    with storage_resizes(gpu):
        shard_blocks(dit, groups, gpu.device_type, mesh=mesh)


def simulate_rank_step(gpu: FakeGPU, dit, job: SimJob, groups: ParallelGroups, *,
                       resident_blocks: int | None = None, sharded: bool = False) -> Stage:
    """One guided denoising step of ``job`` as this rank runs it: its branch only under CFG
    parallelism (the pair exchanged with :class:`~wan_core.distributed.CFGParallel`), else
    both; its token chunk under sequence parallelism. ``resident_blocks``: block swap with K
    resident (on the fake ``cuda`` device; the weights are placed inside the stage).
    ``sharded``: the blocks were sharded (:func:`shard_for_simulation`) before the stage, on
    a ``cpu``-counting session; the non-block weights and the shards are already placed."""
    shape = latent_shape(job.width, job.height, job.frames)
    cfg = dit.cfg
    device = gpu.device_type
    with gpu.stage("DiT step (rank)") as s, storage_resizes(gpu):
        swap = None
        if not sharded:
            swap = BlockSwap(dit.cfg.num_layers if resident_blocks is None else resident_blocks,
                             compute_device="cuda").setup(dit)
            device = dit.patch_embedding.weight.device
        try:
            runner = groups.wrap_runner(DiTRunner(dit, executor=swap))   # a SequenceParallelRunner when P > 1
            pair = CFGParallel(groups) if groups.config.cfg_parallel else None
            x = make_noise(0, shape).to(device)[None]
            pos = torch.empty(1, job.text_tokens, cfg.text_dim).to(device)
            neg = torch.empty(1, job.text_tokens, cfg.text_dim).to(device)
            y = clip = None
            if cfg.has_image_input:
                y = torch.empty(1, cfg.in_dim - cfg.out_dim, *shape[1:]).to(device)
                clip = torch.empty(1, 257, cfg.clip_dim).to(device)
            runner.begin_run(1)

            def model_fn(xt: Tensor, t: Tensor) -> Tensor:   # pipeline.sample's, without the NaN checks
                runner.begin_step(0)
                t = t.to(device)

                def cond() -> Tensor:
                    return runner(xt, t, pos, clip, y, branch="cond")

                def uncond() -> Tensor:
                    return runner(xt, t, neg, clip, y, branch="uncond")

                c, u = pair.pair(cond, uncond) if pair is not None else (cond(), uncond())
                return u + job.cfg_scale * (c - u)

            out = sample_euler(model_fn, x, flow_schedule(1, 5.0, "euler"))[0].float().cpu()
            del out, x, pos, neg, y, clip
        finally:
            if swap is not None:
                swap.release()
    return s
