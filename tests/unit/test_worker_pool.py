"""Sampling in a pool of worker processes (WanCore Multi-GPU Options): same numbers, reuse, errors.

Two pools of two spawned CPU processes on gloo, each started once and shared by the tests:
the node path (the repository imported as the package ``wancore_pack``, as ComfyUI imports
it, so the workers must import the engine under its own name) with Ulysses 2, and the engine
API with CFG parallelism. The tiny selftest DiTs have 2 heads of 128 (dim 256), 2 blocks.
Measured (torch 2.13 CPU, float32): Ulysses 2 and CFG parallelism give the single-process
latents bit for bit (max |diff| 0, T2V and I2V), as in tests/unit/test_distributed.py;
tolerance 1e-5. Starting a pool costs ~4-12 s here (each process imports torch).
"""
from __future__ import annotations

import os
import signal
import sys
import time
import types

import pytest
import torch

import nodepack

W, H, F = 32, 32, 5
SETTINGS = dict(seed=7, steps=2, cfg=5.0, shift=5.0, sampler="unipc", denoise=1.0)
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


class _Cancel(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


@pytest.fixture(scope="module")
def model_dir(pack, tmp_path_factory):
    return nodepack.selftest_model_folders(pack, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def models(pack, model_dir):
    return nodepack.load_selftest_models(pack, model_dir)


@pytest.fixture(scope="module")
def node_pool(pack):
    """The Ulysses 2 options of the node; the pack's pool holder is closed after the module."""
    yield pack.nodes.WanCoreMultiGPUOptions().options("cpu,cpu", 2, 1, False)[0]
    pack.nodes.multigpu.worker_pools().close()


@pytest.fixture()
def host(monkeypatch):
    """``comfy`` stubs: progress ticks recorded, an interrupt delivered when ``state["stop"]`` says so."""
    state = {"ticks": [], "stop": lambda: False}

    class Bar:
        def __init__(self, total, node_id=None):
            self.node_id = node_id

        def update_absolute(self, value, total=None, preview=None):
            state["ticks"].append(value)

    def throw():
        if state["stop"]():
            raise _Cancel()

    mm = types.SimpleNamespace(get_torch_device=lambda: torch.device("cpu"),
                               unet_offload_device=lambda: torch.device("cpu"), soft_empty_cache=lambda: None,
                               throw_exception_if_processing_interrupted=throw)
    monkeypatch.setitem(sys.modules, "comfy.utils", types.SimpleNamespace(ProgressBar=Bar))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return state


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- the node path (Ulysses 2)


def test_ulysses_pool_equals_the_one_process_sampler_and_keeps_its_workers(pack, models, node_pool, host):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "a cat walks", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    ref = n.WanCoreSampler().sample(models.t2v, text, size, **SETTINGS)[0]["samples"]
    host["ticks"].clear()
    out = n.WanCoreSampler().sample(models.t2v, text, size, multi_gpu=node_pool, unique_id="3", **SETTINGS)[0]
    assert _max_diff(out["samples"], ref) <= TOL   # measured 0
    assert host["ticks"] == [1, 2]   # rank 0's steps reach the node's progress bar
    pool = n.multigpu.worker_pools().get(node_pool)
    pids = pool.pids
    assert len(pids) == 2 and os.getpid() not in pids
    again = n.WanCoreSampler().sample(models.t2v, text, size, multi_gpu=node_pool, **dict(SETTINGS, seed=8))[0]
    ref8 = n.WanCoreSampler().sample(models.t2v, text, size, **dict(SETTINGS, seed=8))[0]["samples"]
    assert pool.pids == pids and _max_diff(again["samples"], ref8) <= TOL   # same processes, no restart


def test_another_model_is_loaded_by_the_workers_and_i2v_conditioning_crosses(pack, models, node_pool, host):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "i2v")[0]
    image = torch.rand(1, 40, 40, 3, generator=torch.Generator().manual_seed(1))
    embeds = n.WanCoreImageToVideoEncode().encode(models.vae, models.clip, image, W, H, F)[0]
    ref = n.WanCoreSampler().sample(models.i2v, text, embeds, **SETTINGS)[0]["samples"]
    out = n.WanCoreSampler().sample(models.i2v, text, embeds, multi_gpu=node_pool, **SETTINGS)[0]["samples"]
    assert _max_diff(out, ref) <= TOL   # measured 0: the workers swapped the T2V model for the I2V one


def test_cancel_in_the_host_stops_the_workers_within_a_step(pack, models, node_pool, host):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "a cat walks", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    seen = {}

    def stop() -> bool:   # Cancel pressed once the first step has arrived
        if host["ticks"] and "at" not in seen:
            seen["at"] = len(host["ticks"])
        return "at" in seen

    host["ticks"].clear()
    host["stop"] = stop
    pids = n.multigpu.worker_pools().get(node_pool).pids
    with pytest.raises(_Cancel):
        n.WanCoreSampler().sample(models.t2v, text, size, multi_gpu=node_pool, **dict(SETTINGS, steps=30))
    # the ranks check before every model evaluation: at most the step under way when the flag was
    # set finishes (plus one already sent but not yet read), never the 30
    assert max(host["ticks"]) <= seen["at"] + 2, (host["ticks"], seen)
    print("cancel after step", seen["at"], "of 30; last step reported", max(host["ticks"]))   # the figure, with -s
    host["stop"] = lambda: False
    out = n.WanCoreSampler().sample(models.t2v, text, size, multi_gpu=node_pool, **SETTINGS)[0]["samples"]
    ref = n.WanCoreSampler().sample(models.t2v, text, size, **SETTINGS)[0]["samples"]
    assert n.multigpu.worker_pools().get(node_pool).pids == pids and _max_diff(out, ref) <= TOL


def test_other_options_close_the_running_pool(pack, node_pool):
    pools = pack.nodes.multigpu.worker_pools()
    old = pools.get(node_pool)
    assert pools.get(node_pool) is old and old.running   # one pool per configuration, reused
    procs = list(old._procs)
    other = pack.nodes.WanCoreMultiGPUOptions().options("cpu,cpu", 1, 2, False)[0]
    new = pools.get(other)   # not started until its first job
    assert new is not old and not new.running and not old.running
    assert all(p.exitcode is not None for p in procs)   # the old workers have exited


def test_sampler_refuses_a_model_without_a_file_before_any_process_starts(pack, models, host):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    bare = n.types.LoadedDiT(models.t2v.model)
    options = n.WanCoreMultiGPUOptions().options("cpu,cpu", 1, 1, True)[0]
    with pytest.raises(ValueError, match="did not come from WanCore Load Diffusion Model"):
        n.WanCoreSampler().sample(bare, text, size, multi_gpu=options, **SETTINGS)


# --------------------------------------------------------------------------- the engine API (CFG parallel)


@pytest.fixture(scope="module")
def engine(pack, model_dir):
    """A CFG-parallel pool of the top-level ``wan_core``, the T2V file and its one-process result."""
    import wan_core as wc

    path = model_dir["diffusion_models"] / "wan_tiny_t2v.safetensors"
    g = torch.Generator().manual_seed(5)
    text = wc.TextEmbeds(torch.randn(6, 128, generator=g), torch.randn(4, 128, generator=g))
    settings = wc.SamplerSettings(steps=2, cfg=5.0, shift=5.0, sampler="unipc", seed=3)
    shape = (16, 2, 4, 6)
    ref = wc.sample(wc.load_dit(path, dtype=torch.float32), text, settings, shape=shape)
    pool = wc.WorkerPool(wc.PoolConfig(("cpu", "cpu"), wc.ParallelConfig(cfg_parallel=True), threads=1,
                                       stop_timeout_s=20.0))
    job = wc.PoolJob(wc.DiTSource(path, dtype=torch.float32), text, settings, shape=shape)
    yield types.SimpleNamespace(wc=wc, pool=pool, job=job, ref=ref)
    pool.close()


def test_cfg_parallel_pool_equals_the_one_process_sample(engine):
    out = engine.pool.sample(engine.job)
    assert out.shape == engine.ref.shape and _max_diff(out, engine.ref) <= TOL   # measured 0


def test_the_samplers_loras_apply_in_every_worker_as_in_one_process(engine, tmp_path):
    import dataclasses

    wc = engine.wc
    dit = wc.load_dit(engine.job.source.path, dtype=torch.float32)
    lora = wc.LoraSpec(nodepack.write_tiny_lora(tmp_path / "lora.safetensors", dit), 0.7)
    with wc.applied_loras(dit, [lora]):
        ref = wc.sample(dit, engine.job.text, engine.job.settings, shape=engine.job.shape)
    out = engine.pool.sample(dataclasses.replace(engine.job, options=wc.RunOptions(loras=(lora,))))
    assert _max_diff(out, ref) <= TOL and _max_diff(ref, engine.ref) > 1e-3   # measured 0; the LoRA matters


def test_fun_control_conditioning_runs_in_the_pool_as_in_one_process(engine, tmp_path):
    from safetensors.torch import save_file

    import factory
    import tiny

    wc = engine.wc
    cfg = tiny.TINY_DIT_FUN_CONTROL
    path = tmp_path / "fun_control.safetensors"
    save_file(factory.dit_official(cfg, seed=4), str(path))
    g = torch.Generator().manual_seed(9)
    fun = wc.FunControlEmbeds(y=torch.randn(32, 2, 4, 6, generator=g),
                              clip_fea=torch.randn(9, cfg.clip_dim, generator=g),
                              reference=None, width=48, height=32, frames=5)
    text = wc.TextEmbeds(torch.randn(6, cfg.text_dim, generator=g), torch.randn(4, cfg.text_dim, generator=g))
    ref = wc.sample(wc.load_dit(path), text, engine.job.settings, fun=fun)
    out = engine.pool.sample(wc.PoolJob(wc.DiTSource(path), text, engine.job.settings, fun=fun))
    assert _max_diff(out, ref) <= TOL   # measured 0


def test_an_error_in_the_workers_names_the_rank_and_the_pool_stays_up(engine, tmp_path):
    import dataclasses

    wc, pool = engine.wc, engine.pool
    pool.start()
    pids = pool.pids
    nan = dataclasses.replace(engine.job, text=wc.TextEmbeds(engine.job.text.positive * float("nan"),
                                                             engine.job.text.negative))
    # both ranks find the NaN (same numbers everywhere): named once
    with pytest.raises(wc.PoolError, match=r"ranks 0 \(cpu\), 1 \(cpu\): NonFiniteError: the prompt embedding "
                                           "contains NaN"):
        pool.sample(nan)
    # a failure while the ranks set up (here: a LoRA file that is missing) ends the job on all of them
    gone = wc.LoraSpec(tmp_path / "gone.safetensors")
    missing = dataclasses.replace(engine.job, options=wc.RunOptions(loras=(gone,)))
    with pytest.raises(wc.PoolError, match=r"ranks? [01] \(cpu\).*: \w+Error: .*gone\.safetensors"):
        pool.sample(missing)
    assert pool.pids == pids and _max_diff(pool.sample(engine.job), engine.ref) <= TOL


def test_a_killed_worker_gives_a_clear_error_at_once_and_the_next_job_restarts_the_pool(engine):
    wc, pool = engine.wc, engine.pool
    pool.start()
    victim = pool.pids[1]

    def kill(info) -> None:
        if info.step == 1:
            os.kill(victim, signal.SIGKILL)

    job = engine.job
    slow = wc.PoolJob(job.source, job.text, wc.SamplerSettings(steps=40, cfg=5.0, shift=5.0, seed=3), shape=job.shape)
    t0 = time.monotonic()
    with pytest.raises(wc.PoolError, match=rf"rank 1 \(cpu, pid {victim}\) was killed by SIGKILL during the run; "
                                           "the pool was shut down and starts again on the next run"):
        pool.sample(slow, callback=kill)
    assert time.monotonic() - t0 < 15 and not pool.running
    assert _max_diff(pool.sample(job), engine.ref) <= TOL and victim not in pool.pids


def test_jobs_the_pool_cannot_run_are_refused_before_any_process_starts(engine):
    wc = engine.wc
    pool = wc.WorkerPool(wc.PoolConfig(("cpu",) * 4, wc.ParallelConfig(ulysses=4)))
    with pytest.raises(ValueError, match="the Ulysses degree 4 must divide the 2 attention heads"):
        pool.sample(engine.job)
    pool = wc.WorkerPool(wc.PoolConfig(("cpu",) * 2, wc.ParallelConfig(ring=2)))
    cached = wc.PoolJob(engine.job.source, engine.job.text, engine.job.settings, shape=engine.job.shape,
                        options=wc.RunOptions(step_cache=wc.StepCacheSpec()))
    with pytest.raises(ValueError, match="step caches"):
        pool.sample(cached)
    assert not pool.running


# --------------------------------------------------------------------------- options and plain data


def test_devices_and_layout_are_checked_with_clear_errors(pack):
    import wan_core as wc

    assert wc.parse_devices("0, 1,2-3") == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    assert wc.parse_devices("cpu,cpu") == ("cpu", "cpu")
    with pytest.raises(ValueError, match="'gpu1' in devices"):
        wc.parse_devices("0,gpu1")
    with pytest.raises(ValueError, match=r"3 devices \(cuda:0, cuda:1, cuda:2\) but 4 processes"):
        wc.PoolConfig(wc.parse_devices("0,1,2"), wc.ParallelConfig(ulysses=2, cfg_parallel=True))
    with pytest.raises(ValueError, match="name a GPU twice"):
        wc.PoolConfig(("cuda:0", "cuda:0"), wc.ParallelConfig(ulysses=2))
    with pytest.raises(ValueError, match="nccl"):
        wc.PoolConfig(("cpu", "cpu"), wc.ParallelConfig(ring=2), backend="nccl")
    missing = torch.cuda.device_count() + 1
    config = wc.PoolConfig(wc.parse_devices(f"0,{missing}"), wc.ParallelConfig(ring=2))
    with pytest.raises(ValueError, match=rf"cuda:{missing} do(es)? not exist"):
        config.check_devices()
    node = pack.nodes.WanCoreMultiGPUOptions
    assert "but 2 processes" in node.VALIDATE_INPUTS("cpu,cpu,cpu", 2, 1, False)
    assert node.VALIDATE_INPUTS("cpu,cpu,cpu,cpu", 2, 1, True) is True and node.VALIDATE_INPUTS(None, 2, 1, True)
    # the GPUs are looked for when the node runs (a saved graph is valid on a machine without them)
    assert node.VALIDATE_INPUTS(f"0,{missing}", 1, 2, False) is True
    with pytest.raises(ValueError, match=rf"cuda:{missing} do(es)? not exist"):
        node().options(f"0,{missing}", 1, 2, False)


def test_jobs_cross_as_plain_data_under_any_package_name(pack):
    """The pack's classes (``wancore_pack.wan_core.*``, as inside ComfyUI) become the top-level
    engine's on the other side, field for field."""
    import wan_core as wc

    from wan_core.pool_wire import from_wire

    p = pack.wan_core
    source = p.DiTSource("/m/dit.safetensors", dtype=torch.bfloat16, loras=(p.LoraSpec("/m/l.safetensors", .5),))
    job = p.PoolJob(source,
                    p.TextEmbeds(torch.ones(2, 3), torch.zeros(1, 3)), p.SamplerSettings(steps=3),
                    shape=(16, 1, 2, 2), options=p.RunOptions(vram_budget=1 << 30),
                    guidance=p.GuidanceOptions(slg_blocks=(1,), cfg_schedule=((0, 2.0),)))
    back = from_wire(p.pool_wire.to_wire(job))
    assert type(back) is wc.PoolJob and type(back.text) is wc.TextEmbeds and type(back.source.loras[0]) is wc.LoraSpec
    assert back.source == wc.DiTSource("/m/dit.safetensors", torch.bfloat16,
                                       loras=(wc.LoraSpec("/m/l.safetensors", .5),))
    assert back.settings == wc.SamplerSettings(steps=3) and back.options == wc.RunOptions(vram_budget=1 << 30)
    assert back.guidance == wc.GuidanceOptions(slg_blocks=(1,), cfg_schedule=((0, 2.0),))
    assert torch.equal(back.text.positive, job.text.positive) and back.shape == (16, 1, 2, 2)
    with pytest.raises(TypeError, match="cannot be sent to the multi-GPU workers"):
        p.pool_wire.to_wire(types.SimpleNamespace())
