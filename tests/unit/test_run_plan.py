"""The engine owns the run plan: generate(), the node chain and prepare_run + sample give the
same numbers for the same RunOptions, each stage logs one plan line, everything is undone
after an error, and the text-encoder / VAE-tile decisions follow the budget.

Everything runs through the pack's engine (``pack.wan_core``) so the nodes' values and the
engine's classes are the same objects; tiny random models from the selftest writer.
"""
from __future__ import annotations

import logging

import pytest
import torch

import nodepack

W, H, F = 32, 32, 5
SETTINGS = dict(seed=7, steps=4, cfg=5.0, shift=5.0, sampler="unipc", denoise=1.0)
GiB = 1 << 30

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


@pytest.fixture(scope="module")
def wc(pack):
    return pack.wan_core


@pytest.fixture(scope="module")
def files(pack, wc, tmp_path_factory):
    """The selftest checkpoints in ComfyUI model folders, plus a rank-2 LoRA on two Linears."""
    folders = nodepack.selftest_model_folders(pack, tmp_path_factory.mktemp("models"), extra=("loras",))
    dit = wc.load_dit(folders["diffusion_models"] / "wan_tiny_t2v.safetensors")
    nodepack.write_tiny_lora(folders["loras"] / "tiny_lora.safetensors", dit)
    return folders


@pytest.fixture(scope="module")
def models(pack, files):
    loaded = nodepack.load_selftest_models(pack, files)
    with nodepack.using_folders(files):
        loaded.loras = pack.nodes.WanCoreLoraLoader().load("tiny_lora.safetensors", 0.7)[0]
    return loaded


def _masters(module) -> list[int]:
    return [p.data_ptr() for p in module.parameters()]


def _hooks(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# ------------------------------------------------------------------ one plan, three front ends

def test_generate_nodes_and_prepare_run_give_the_same_numbers_for_the_same_plan(pack, wc, files, models):
    """Block swap bookkeeping on the CPU (1 resident block, the rest streamed), an unmerged
    LoRA and a TeaCache that skips steps: the same frames from all three paths."""
    n, dit = pack.nodes, models.t2v.model
    memory = n.WanCoreMemoryOptions().options(0.0, 1, "auto", "auto", 512)[0]
    cache = n.WanCoreStepCache().options("teacache", 1e6, 1, -1, "e", 2, 0.2)[0]
    options = wc.RunOptions(resident_blocks=1, loras=models.loras, step_cache=cache, weight_dtype="fp32")
    masters = _masters(dit)

    # 1. the node chain
    text = n.WanCoreTextEncode().encode(models.te, "a cat walks", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    latent = n.WanCoreSampler().sample(models.t2v, text, size, memory=memory, loras=models.loras, step_cache=cache,
                                       **SETTINGS)[0]
    node_frames = n.WanCoreDecode().decode(models.vae, latent, "auto", 512, 64)[0]

    # 2. prepare_run + sample on the loaded model
    settings = wc.SamplerSettings(**SETTINGS)
    with wc.prepare_run(dit, wc.Job(W, H, F), options, "cpu") as plan, plan.sampling() as runner:
        assert isinstance(runner.executor, wc.BlockSwap) and runner.executor.resident_blocks == 1
        latents = wc.sample(dit, text, settings, shape=wc.latent_shape(W, H, F), runner=runner)
        assert runner.executor.streamed_blocks > 0 and runner.step_cache.saved_fraction() > 0
    assert torch.equal(wc.vae.denormalize_latents(latents[None]), latent["samples"])

    # 3. generate() from the DiT file (loaded resting on the CPU with options.weight_dtype)
    frames = wc.generate(dit=files["diffusion_models"] / "wan_tiny_t2v.safetensors", vae=models.vae,
                         text_encoder=models.te, prompt="a cat walks", width=W, height=H, frames=F, options=options,
                         **SETTINGS)
    assert torch.equal(frames, node_frames)

    # the options changed the result, and left the model exactly as it was
    plain = wc.generate(dit=dit, vae=models.vae, text_encoder=models.te, prompt="a cat walks", width=W, height=H,
                        frames=F, **SETTINGS)
    assert not torch.equal(plain, frames)
    assert _masters(dit) == masters and _hooks(dit) == 0


def test_the_cli_flags_and_the_option_nodes_make_the_same_run_options(pack, wc, files, models):
    """The CLI hands generate() what options_from_args builds; equal options are the same run
    (previous test), so the three front ends agree."""
    import importlib

    cli = importlib.import_module(f"{pack.__name__}.wan_core.cli")
    n, lora = pack.nodes, models.loras[0]
    args = cli.build_parser().parse_args([
        "generate", "--dit", "d.safetensors", "--vae", "v.safetensors", "--text-encoder", "t.safetensors",
        "--prompt", "x", "--resident-blocks", "1", "--vram-budget", "6", "--text-encoder-device", "cpu",
        "--vae-tile", "256", "--lora", f"{lora.path}:0.7", "--step-cache", "magcache:0.3", "--compile"])
    memory = n.WanCoreMemoryOptions().options(6.0, 1, "yes", "custom", 256)[0]
    cache = n.WanCoreStepCache().options("magcache", 0.3, -1, -1, "e", 2, 0.2)[0]
    compiled = n.WanCoreCompileOptions().options("inductor", "default", "auto")[0]
    assert cli.options_from_args(args) == n.plans.run_options(memory, models.loras, cache, compiled)


def test_default_options_on_the_cpu_are_the_plain_path(wc, models):
    dit, te = models.t2v.model, models.te
    pos, neg = te.encode(["a boat", wc.NEGATIVE_PROMPT])
    text, settings = wc.TextEmbeds(pos, neg), wc.SamplerSettings(**SETTINGS)
    shape = wc.latent_shape(W, H, F)
    with wc.prepare_run(dit, shape, wc.RunOptions(), "cpu") as plan, plan.sampling() as runner:
        assert plan.placement.resident_blocks is None and runner.step_cache is None
        planned = wc.sample(dit, text, settings, shape=shape, runner=runner)
    assert torch.equal(planned, wc.sample(dit, text, settings, shape=shape))


# ------------------------------------------------------------------ logs

def test_each_stage_logs_one_plan_line_in_order(wc, models, caplog):
    image = torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.INFO, logger="wan_core"):
        wc.generate(dit=models.i2v.model, vae=models.vae, text_encoder=models.te, clip_vision=models.clip,
                    image=image, prompt="the cat turns", width=W, height=H, frames=F,
                    options=wc.RunOptions(resident_blocks=1), **dict(SETTINGS, steps=2))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wan_core plan: ")]
    assert [line.split(": ")[1] for line in lines] == list(wc.run_plan.STAGES), lines
    text, image_line, sampling, decode = lines
    assert "umT5 on cpu (no GPU)" in text and "VAE + CLIP vision on cpu, encode auto tiles" in image_line
    assert f"{W}x{H}, {F} frames, 2 steps" in sampling
    assert f"1/{len(models.i2v.model.blocks)} DiT blocks resident on cpu" in sampling
    assert "VAE on cpu, auto tiles" in decode


# ------------------------------------------------------------------ release on error

class _Stop(Exception):
    pass


def test_everything_is_released_after_an_error_inside_the_run(wc, models):
    dit = models.t2v.model
    masters, state = _masters(dit), {k: v.clone() for k, v in dit.state_dict().items()}
    options = wc.RunOptions(resident_blocks=1, loras=models.loras, step_cache=wc.StepCacheSpec())
    pos, neg = models.te.encode(["a cat", ""])
    last = dit.blocks[-1]
    last_masters, seen = _masters(last), {}

    def fail_inside_the_last_block(module, args):   # raises while the block's streamed copy is active
        seen.update(streamed=_masters(module) != last_masters, lora_hooks=_hooks(dit) - 1)
        raise _Stop

    handle = last.register_forward_pre_hook(fail_inside_the_last_block)
    try:
        with pytest.raises(_Stop):
            with wc.prepare_run(dit, wc.Job(W, H, F), options, "cpu") as plan, plan.sampling() as runner:
                wc.sample(dit, wc.TextEmbeds(pos, neg), wc.SamplerSettings(**SETTINGS),
                          shape=wc.latent_shape(W, H, F), runner=runner)
    finally:
        handle.remove()
    assert seen == {"streamed": True, "lora_hooks": 2}
    assert _hooks(dit) == 0 and _masters(dit) == masters
    assert all(p.device.type == "cpu" for p in dit.parameters())
    assert all(torch.equal(v, state[k]) for k, v in dit.state_dict().items())
    # and through generate(): an interrupt leaves the model usable with the same numbers
    common = dict(dit=dit, vae=models.vae, text_encoder=models.te, prompt="a cat", width=W, height=H, frames=F,
                  **SETTINGS)
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        wc.generate(options=options, interrupt=interrupt, **common)
    assert _hooks(dit) == 0 and _masters(dit) == masters
    assert torch.equal(wc.generate(**common), wc.generate(**common))


def test_a_budget_that_cannot_run_the_job_is_refused_before_any_model_runs(wc, models):
    with pytest.raises(wc.PlanError, match="minimum"):
        wc.prepare_run(models.t2v.model, (16, 21, 60, 104), wc.RunOptions(vram_budget=1 << 20), "cuda")


# ------------------------------------------------------------------ decisions

def test_text_encoder_device_follows_the_choice_and_the_budget(wc):
    place, cuda, cpu = wc.run_plan.place_text_encoder, torch.device("cuda", 0), torch.device("cpu")
    weights = 6 * GiB   # umT5-XXL bf16 is 10.6 GiB, fp8 5.3 GiB; workspace + reserve add 0.75 GiB
    auto = wc.RunOptions()
    assert place(weights, auto, "cpu").device == cpu                       # no GPU: the CPU is the device
    assert place(weights, auto, cuda, free_bytes=12 * GiB).device == cuda
    assert place(weights, auto, cuda, free_bytes=6 * GiB).device == cpu    # weights fit, workspace does not
    assert place(weights, wc.RunOptions(vram_budget=12 * GiB), cuda, free_bytes=GiB).device == cuda  # budget wins
    assert place(weights, wc.RunOptions(vram_budget=4 * GiB), cuda, free_bytes=80 * GiB).device == cpu
    assert place(weights, wc.RunOptions(text_encoder_device="cpu"), cuda, free_bytes=80 * GiB).device == cpu
    assert place(weights, wc.RunOptions(text_encoder_device="gpu"), cuda, free_bytes=GiB).device == cuda
    assert "exceed the budget 4.00 GiB" in place(weights, wc.RunOptions(vram_budget=4 * GiB), cuda).reason


def test_vae_tiles_follow_the_choice_and_the_budget(wc, models):
    plan, vae, planner = wc.run_plan.plan_decode, models.vae, wc.planner
    job = wc.Job(832, 480, 81)                  # 60 x 104 latent px, 21 latent frames
    weights = wc.offload.module_bytes(vae)
    assert plan(vae, wc.RunOptions(vae_tile="off"), "cuda").kwargs() == {"tile": None}
    assert plan(vae, wc.RunOptions(vae_tile=256), "cuda").kwargs() == {"tile": 32}        # pixels -> latent px
    assert plan(vae, wc.RunOptions(), "cpu").kwargs() == {"tile": "auto"}                 # decode_tiled's RAM rule
    assert plan(vae, wc.RunOptions(vram_budget=4 * GiB), "cpu", job=job).kwargs() == {"tile": "auto"}   # no GPU
    with pytest.raises(ValueError, match="needs the job"):
        plan(vae, wc.RunOptions(vram_budget=4 * GiB), "cuda")
    # a GPU budget: the planner's tile for the frame, within the budget minus the planner's reserve
    tiled = plan(vae, wc.RunOptions(vram_budget=4 * GiB), "cuda", job=job)
    assert tiled.kwargs() == {"tile": planner.plan_vae(4 * GiB, weights, (60, 104), 21).decode_tile}
    assert isinstance(tiled.tile, int) and planner.vae_decode_bytes(weights, (tiled.tile,) * 2) <= 4 * GiB - (
        planner.DEFAULT_RESERVE)
    assert "reserve 0.50 GiB" in tiled.describe()
    # the free VRAM is planned the same way (no second rule), and a latent shape is a job too
    assert plan(vae, wc.RunOptions(), "cuda", free_bytes=4 * GiB, job=(1, 16, 21, 60, 104)).tile == tiled.tile
    assert plan(vae, wc.RunOptions(vram_budget=80 * GiB), "cuda", job=job).kwargs() == {"tile": None}   # untiled
    with pytest.raises(wc.PlanError, match="minimum"):
        plan(vae, wc.RunOptions(vram_budget=GiB // 2), "cuda", job=job)


def _i2v_14b_720p(wc):
    """An I2V-14B fp8 720p x 81 job: the published shapes, sized on the meta device."""
    planner, configs = wc.planner, wc.configs
    job = wc.Job(1280, 720, 81, encode_video=True)
    vae_bytes = planner.module_param_bytes(wc.vae.WanVAE, configs.VAEConfig(), 4)                    # float32
    clip_bytes = planner.module_param_bytes(wc.clip_vision.CLIPVisionTower, configs.CLIPVisionConfig(), 2)

    def memory(budget):
        return planner.plan_memory(budget, planner.dit_sizes(configs.KNOWN_DIT["I2V-14B"], "fp8_e4m3fn"),
                                   job.tokens(), vae_bytes=vae_bytes, latent_hw=(90, 160),
                                   clip_vision_bytes=clip_bytes, encode_video=True)
    return job, vae_bytes, clip_bytes, memory


def test_at_12_gb_an_i2v_14b_720p_job_encodes_and_decodes_in_the_memory_plans_tiles(wc):
    job, vae_bytes, clip_bytes, memory = _i2v_14b_720p(wc)
    rp, budget = wc.run_plan, 12 * GiB
    plan = memory(budget)
    assert plan.vae_encode_tile is not None and plan.vae_tile is not None     # 720p does not fit whole
    for options, free in ((wc.RunOptions(vram_budget=budget), None), (wc.RunOptions(), budget)):
        encode = rp.plan_encode(vae_bytes, options, "cuda:0", free, job=job, clip_vision=clip_bytes)
        decode = rp.plan_decode(vae_bytes, options, "cuda:0", free, job=job)
        assert encode.kwargs() == {"tile": plan.vae_encode_tile} and encode.tile == plan.vae_encode_tile
        assert decode.kwargs() == {"tile": plan.vae_tile}
    assert plan.stages.vae_encode + plan.reserve_bytes <= budget
    assert plan.stages.vae_decode + plan.reserve_bytes <= budget


def test_a_generous_budget_encodes_and_decodes_untiled(wc):
    job, vae_bytes, clip_bytes, memory = _i2v_14b_720p(wc)
    rp, options = wc.run_plan, wc.RunOptions(vram_budget=80 * GiB)
    plan = memory(80 * GiB)
    assert plan.vae_encode_tile is None and plan.vae_tile is None
    assert rp.plan_encode(vae_bytes, options, "cuda:0", job=job, clip_vision=clip_bytes).kwargs() == {"tile": None}
    assert rp.plan_decode(vae_bytes, options, "cuda:0", job=job).kwargs() == {"tile": None}
    # explicit choices apply to both VAE passes; on the CPU both keep vae_tiling's RAM rule
    assert rp.plan_encode(vae_bytes, wc.RunOptions(vae_tile=512), "cuda:0", job=job).tile == 64
    assert rp.plan_encode(vae_bytes, wc.RunOptions(vae_tile="off"), "cuda:0", job=job).tile is None
    assert rp.plan_encode(vae_bytes, wc.RunOptions(), "cpu", job=job).kwargs() == {"tile": "auto"}


def test_prepare_run_plans_the_vae_stages_with_the_dit(wc, models):
    """prepare_run hands the VAE and CLIP to the planner: its memory plan holds the tiles the
    image-encode and decode stages then use, and a budget too small for the VAE is refused."""
    dit, vae, clip = models.i2v.model, models.vae, models.clip
    job = wc.Job(1280, 720, 81, encode_video=True)
    options = wc.RunOptions(vram_budget=4 * GiB)
    plan = wc.prepare_run(dit, job, options, "cuda", vae=vae, clip_vision=clip)
    memory = plan.memory
    assert memory is not None and isinstance(memory.vae_tile, int) and isinstance(memory.vae_encode_tile, int)
    rp = wc.run_plan
    assert rp.plan_encode(vae, options, "cuda", job=job, clip_vision=clip).tile == memory.vae_encode_tile
    assert rp.plan_decode(vae, options, "cuda", job=job).tile == memory.vae_tile
    assert memory.stages.clip_vision > 0 and memory.stages.vae_encode > 0
    # without the VAE the plan sizes the DiT alone; T2V jobs plan no encode
    assert wc.prepare_run(dit, job, options, "cuda").memory.vae_tile is None
    t2v = wc.prepare_run(models.t2v.model, wc.Job(1280, 720, 81), options, "cuda", vae=vae).memory
    assert t2v.vae_tile == memory.vae_tile and t2v.vae_encode_tile is None
    image = wc.Job(1280, 720, 1, encode_video=True)   # one frame: the VAE needs more than the tiny DiT
    with pytest.raises(wc.PlanError, match="VAE with the smallest tile"):
        wc.prepare_run(dit, image, wc.RunOptions(vram_budget=GiB - GiB // 4), "cuda", vae=vae, clip_vision=clip)


def test_run_options_refuse_bad_values_by_name(wc):
    for bad, name in ((dict(vram_budget=0), "vram_budget"), (dict(resident_blocks=-1), "resident_blocks"),
                      (dict(weight_dtype="int4"), "weight_dtype"), (dict(text_encoder_device="tpu"),
                                                                    "text_encoder_device"),
                      (dict(vae_tile="big"), "vae_tile"), (dict(vae_tile=4), "vae_tile"),
                      (dict(attention="fast"), "attention"), (dict(loras=("a.safetensors",)), "LoraSpec")):
        with pytest.raises(ValueError, match=name):
            wc.RunOptions(**bad)
    with pytest.raises(ValueError, match="magcache"):
        wc.StepCacheSpec("fastcache")
    assert wc.RunOptions(loras=[wc.LoraSpec("a.safetensors")]).loras == (wc.LoraSpec("a.safetensors"),)
    job = wc.Job.from_latent_shape((16, 21, 60, 104), steps=50)
    assert (job.width, job.height, job.frames, job.latent_shape) == (832, 480, 81, (16, 21, 60, 104))
    assert job.tokens() == 32760
