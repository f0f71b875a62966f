"""Sharing GPU memory with the ComfyUI host (no ComfyUI, no GPU: a stubbed
``comfy.model_management`` records what the nodes ask of it).

Before each stage the nodes ask the host's ``free_memory`` for the bytes the engine's plan
needs (its ``--reserve-vram`` on top), never ``unload_all_models``; they budget against
``get_free_memory`` less that reserve; ``--lowvram`` / ``--novram`` / ``--highvram`` /
``--cpu`` become run options and devices. The models are built on the meta device: sizes
and plans only, nothing runs.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

import nodepack

GiB = 1 << 30
CUDA = torch.device("cuda", 0)


class FakeModelManagement(types.SimpleNamespace):
    """The parts of ``comfy.model_management`` the pack may call, recording each call."""

    def __init__(self, device=CUDA, offload=torch.device("cpu"), state="NORMAL_VRAM", free=10 * GiB,
                 reserve=GiB):
        super().__init__(calls=[], vram_state=types.SimpleNamespace(name=state))
        self._device, self._offload, self._free, self._reserve = device, offload, free, reserve

    def get_torch_device(self):
        return self._device

    def unet_offload_device(self):
        return self._offload

    def extra_reserved_memory(self):
        return self._reserve

    def get_free_memory(self, dev=None, torch_free_too=False):
        self.calls.append(("get_free_memory", dev))
        return self._free

    def free_memory(self, memory_required, device, keep_loaded=()):
        self.calls.append(("free_memory", memory_required, device))
        return []

    def unload_all_models(self):
        self.calls.append(("unload_all_models",))

    def soft_empty_cache(self, force=False):
        self.calls.append(("soft_empty_cache",))

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


@pytest.fixture(scope="module")
def mods(pack):
    return types.SimpleNamespace(plans=importlib.import_module(f"{nodepack.PACK_NAME}.nodes.plans"),
                                 host=importlib.import_module(f"{nodepack.PACK_NAME}.nodes.host"),
                                 run_plan=pack.wan_core.run_plan)


@pytest.fixture(scope="module")
def dit(pack):
    cfg = pack.wan_core.configs.DiTConfig(dim=256, ffn_dim=384, num_layers=4, text_dim=64, freq_dim=64)
    with torch.device("meta"):
        return pack.wan_core.dit.WanDiT(cfg)


def _host(monkeypatch, **kw) -> FakeModelManagement:
    mm = FakeModelManagement(**kw)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return mm


SHAPE = (16, 21, 60, 104)   # 832x480, 81 frames


def test_sampling_asks_the_host_for_the_planned_bytes_and_never_unloads_everything(monkeypatch, mods, dit):
    mm = _host(monkeypatch)
    options = mods.plans.run_options()
    plan = mods.plans.prepare(dit, SHAPE, options)
    need = mods.run_plan.stage_bytes("sampling", dit, options, mods.run_plan.Job.from_latent_shape(SHAPE))
    assert mm.named("free_memory") == [("free_memory", need + GiB, CUDA)]   # the plan's bytes + --reserve-vram
    assert not mm.named("unload_all_models")
    # the plan budgets against the host's free figure less its reserve, once
    assert plan.free_bytes == 9 * GiB
    assert plan.placement.memory.budget == 9 * GiB
    # free_memory is asked first, then the free memory is read
    assert [c[0] for c in mm.calls][:2] == ["free_memory", "get_free_memory"]


def test_every_stage_asks_for_its_own_bytes(monkeypatch, mods, dit, pack):
    mm = _host(monkeypatch)
    rp = mods.run_plan
    cfg = pack.wan_core.configs.VAEConfig(dim=8, z_dim=16)
    with torch.device("meta"):
        vae = pack.wan_core.vae.WanVAE(cfg)
    options = mods.plans.run_options()
    mods.plans.decode_stage(vae, options, SHAPE)
    mods.plans.image_encode_stage(vae, size=(832, 480, 81))
    job = rp.Job.from_latent_shape(SHAPE)
    assert mm.named("free_memory") == [("free_memory", rp.stage_bytes("decode", vae, options, job) + GiB, CUDA),
                                       ("free_memory", rp.stage_bytes("image encode", [vae], None, job) + GiB, CUDA)]
    # an untiled 832x480x81 decode needs its working set and the output video on top of the weights
    assert rp.stage_bytes("decode", vae, options, job) > 3 * 81 * 832 * 480 * 4
    tiled = dataclasses.replace(options, vae_tile=256)
    assert rp.stage_bytes("decode", vae, tiled, job) < rp.stage_bytes("decode", vae, options, job)


def test_the_stage_bytes_follow_the_options(mods, dit):
    rp = mods.run_plan
    job = rp.Job.from_latent_shape(SHAPE)
    full = rp.stage_bytes("sampling", dit, rp.RunOptions(), job)
    streamed = rp.stage_bytes("sampling", dit, rp.RunOptions(resident_blocks=0), job)
    block = sum(p.numel() * p.element_size() for p in dit.blocks[0].parameters())
    assert full - streamed == 2 * block   # 4 resident vs 2 in flight
    assert rp.stage_bytes("sampling", dit, rp.RunOptions(vram_budget=full // 2), job) == full // 2   # <= the budget
    assert rp.stage_bytes("text encoder", dit, rp.RunOptions(text_encoder_device="cpu")) == 0
    with pytest.raises(ValueError, match="needs the job"):
        rp.stage_bytes("sampling", dit, rp.RunOptions())
    with pytest.raises(ValueError, match="stage must be one of"):
        rp.stage_bytes("upscale", dit)


def test_lowvram_and_novram_stream_every_block_and_put_the_text_encoder_on_the_cpu(monkeypatch, mods, dit):
    for state in ("LOW_VRAM", "NO_VRAM"):
        mm = _host(monkeypatch, state=state)
        plan = mods.plans.prepare(dit, SHAPE, mods.plans.run_options())
        assert plan.placement.resident_blocks == 0
        assert plan.options.text_encoder_device == "cpu"
        mods.plans.text_encoder_stage(dit, mods.plans.run_options())   # umT5 on the CPU: no room asked for
        assert len(mm.named("free_memory")) == 1
    # the user's explicit choices win over the host's flag
    _host(monkeypatch, state="LOW_VRAM")
    memory = mods.plans.MemoryOptions(resident_blocks=2, text_encoder_on_cpu="no")
    plan = mods.plans.prepare(dit, SHAPE, mods.plans.run_options(memory))
    assert plan.placement.resident_blocks == 2 and plan.options.text_encoder_device == "gpu"


def test_highvram_keeps_the_weights_on_the_gpu_and_loads_make_room_there(monkeypatch, mods, dit, tmp_path):
    mm = _host(monkeypatch, state="HIGH_VRAM", offload=CUDA)
    plan = mods.plans.prepare(dit, SHAPE, mods.plans.run_options())
    assert plan.placement.resident_blocks is None and "rest on the GPU" in plan.placement.reason
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0" * 1000)
    mm.calls.clear()
    mods.host.make_room_to_load(str(f))
    assert mm.calls == [("free_memory", 1000 + GiB, CUDA)]
    _host(monkeypatch)   # offload on the CPU: a load asks nothing of the GPU
    mods.host.make_room_to_load(str(f))


def test_cpu_host_asks_nothing_and_budgets_nothing(monkeypatch, mods, dit):
    mm = _host(monkeypatch, device=torch.device("cpu"), state="DISABLED")
    plan = mods.plans.prepare(dit, SHAPE, mods.plans.run_options())
    assert plan.free_bytes is None and plan.placement.resident_blocks is None
    assert mm.calls == []
    assert mods.host.vram_mode() == "off"


def test_free_vram_subtracts_the_hosts_reserve_once_and_never_goes_negative(monkeypatch, mods):
    _host(monkeypatch, free=3 * GiB, reserve=GiB)
    assert mods.host.free_vram_bytes(CUDA) == 2 * GiB
    _host(monkeypatch, free=GiB // 2, reserve=GiB)
    assert mods.host.free_vram_bytes(CUDA) == 0
    assert mods.host.free_vram_bytes(torch.device("cpu")) is None


def test_no_code_of_the_pack_unloads_every_host_model():
    root = Path(__file__).resolve().parents[2]
    offenders = [str(p.relative_to(root)) for d in ("nodes", "wan_core") for p in (root / d).rglob("*.py")
                 if "unload_all_models" in p.read_text()]
    assert offenders == []
