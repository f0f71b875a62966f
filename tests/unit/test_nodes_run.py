"""The nodes called directly on tiny random models (no ComfyUI): same numbers as wan_core.

``folder_paths`` is a stub listing a temporary model folder; ``comfy.utils`` /
``comfy.model_management`` stubs record progress ticks and deliver an interrupt.
"""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

import nodepack

W, H, F, STEPS = 32, 32, 5, 2
SETTINGS = dict(seed=7, steps=STEPS, cfg=5.0, shift=5.0, sampler="unipc", denoise=1.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pack():
    return nodepack.load_pack()


@pytest.fixture(scope="module")
def model_dir(pack, tmp_path_factory):
    return nodepack.selftest_model_folders(pack, tmp_path_factory.mktemp("models"))


@pytest.fixture()
def folder_paths(monkeypatch, model_dir):
    monkeypatch.setitem(sys.modules, "folder_paths", nodepack.fake_folder_paths(model_dir))


@pytest.fixture(scope="module")
def models(pack, model_dir):
    return nodepack.load_selftest_models(pack, model_dir)


def _decode(pack, models, latent):
    return pack.nodes.WanCoreDecode().decode(models.vae, latent, "auto", 512, 64)[0]


def test_loaders_list_the_model_folders_and_load_each_kind(pack, folder_paths, models):
    spec = pack.nodes.WanCoreLoadDiT.INPUT_TYPES()["required"]["model_name"][0]
    assert spec == ["wan_tiny_i2v.safetensors", "wan_tiny_t2v.safetensors"]
    assert models.t2v.model.cfg.model_type == "t2v" and models.i2v.model.cfg.model_type == "i2v"
    assert models.t2v.memory is None   # the DIT socket value: the module and the loader's memory options
    with pytest.raises(FileNotFoundError, match="models/vae"):
        pack.nodes.WanCoreLoadVAE().load("missing.safetensors", "fp32")


def test_t2v_nodes_give_the_same_frames_as_generate(pack, models):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "a cat walks", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    latent = n.WanCoreSampler().sample(models.t2v, text, size, **SETTINGS)[0]
    assert latent["samples"].shape == (1, 16, 2, H // 8, W // 8) and latent["samples"].dtype == torch.float32
    frames = _decode(pack, models, latent)
    ref = pack.wan_core.generate(dit=models.t2v.model, vae=models.vae, text_encoder=models.te, prompt="a cat walks",
                                 width=W, height=H, frames=F, **SETTINGS)
    assert frames.shape == (F, H, W, 3) and frames.dtype == torch.float32 and frames.device.type == "cpu"
    assert torch.equal(frames, ref)


def test_latent_output_is_raw_vae_space_as_comfyui_wan21(pack, models):
    n, wc = pack.nodes, pack.wan_core
    text = n.WanCoreTextEncode().encode(models.te, "a dog", "blurry", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    raw = n.WanCoreSampler().sample(models.t2v, text, size, **SETTINGS)[0]["samples"]
    settings = wc.SamplerSettings(**{k: v for k, v in SETTINGS.items()})
    normalised = wc.sample(models.t2v.model, text, settings, shape=wc.latent_shape(W, H, F))
    torch.testing.assert_close(wc.vae.normalize_latents(raw)[0], normalised, rtol=0, atol=1e-5)
    mean = torch.tensor(wc.configs.VAE_LATENT_MEAN).view(16, 1, 1, 1)
    std = torch.tensor(wc.configs.VAE_LATENT_STD).view(16, 1, 1, 1)
    assert torch.equal(raw[0], normalised * std + mean)


def test_empty_negative_prompt_is_the_official_default_of_the_model_type(pack, models):
    n, wc = pack.nodes, pack.wan_core
    for kind, default in (("t2v", wc.NEGATIVE_PROMPT), ("i2v", wc.NEGATIVE_PROMPT_I2V),
                          ("flf2v", wc.NEGATIVE_PROMPT_FLF2V)):
        implicit = n.WanCoreTextEncode().encode(models.te, "a cat", "", kind)[0]
        explicit = n.WanCoreTextEncode().encode(models.te, "a cat", default, kind)[0]
        assert torch.equal(implicit.negative, explicit.negative)


def test_i2v_nodes_give_the_same_frames_as_generate(pack, models):
    n = pack.nodes
    image = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(1))
    text = n.WanCoreTextEncode().encode(models.te, "the cat turns", "", "i2v")[0]
    embeds = n.WanCoreImageToVideoEncode().encode(models.vae, models.clip, image, W, H, F)[0]
    frames = _decode(pack, models, n.WanCoreSampler().sample(models.i2v, text, embeds, **SETTINGS)[0])
    ref = pack.wan_core.generate(dit=models.i2v.model, vae=models.vae, text_encoder=models.te, clip_vision=models.clip,
                                 image=image[0], prompt="the cat turns", width=W, height=H, frames=F, **SETTINGS)
    assert torch.equal(frames, ref)


def test_v2v_encode_and_partial_denoise_give_the_same_frames_as_generate(pack, models):
    n = pack.nodes
    video = torch.rand(F, H, W, 3, generator=torch.Generator().manual_seed(2))
    latent = n.WanCoreEncode().encode(models.vae, video, "auto", 512, 64)[0]
    assert latent["samples"].shape == (1, 16, 2, H // 8, W // 8)
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    v2v = dict(SETTINGS, denoise=0.5, steps=4)
    frames = _decode(pack, models, n.WanCoreSampler().sample(models.t2v, text, size, latent=latent, **v2v)[0])
    ref = pack.wan_core.generate(dit=models.t2v.model, vae=models.vae, text_encoder=models.te, prompt="a cat",
                                 video=video, **v2v)
    assert torch.equal(frames, ref)
    bigger = n.WanCoreEmptyVideoEmbeds().embeds(W * 2, H, F)[0]
    with pytest.raises(ValueError, match="input latents are 32x32, 5 frames but the run is 64x32.*video_embeds"):
        n.WanCoreSampler().sample(models.t2v, text, bigger, latent=latent, **v2v)


def test_custom_tiling_passes_tile_and_overlap_in_latent_pixels(pack, models):
    n, tiling = pack.nodes, pack.wan_core.vae_tiling
    z = {"samples": torch.randn(1, 16, 1, 6, 6, generator=torch.Generator().manual_seed(3))}
    tiled = n.WanCoreDecode().decode(models.vae, z, "custom", 32, 16)[0]
    ref = tiling.decode_tiled(models.vae, z["samples"], normalized=False, tile=4, overlap=2)
    assert tiled.shape == (1, 48, 48, 3)
    assert torch.equal(tiled, ref.float().add(1).div(2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1))
    whole = n.WanCoreDecode().decode(models.vae, z, "off", 512, 64)[0]
    assert not torch.equal(tiled, whole)


def test_model_and_embeds_mismatches_are_refused_with_clear_errors(pack, models):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "x", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    image = torch.rand(1, 32, 32, 3)
    embeds = n.WanCoreImageToVideoEncode().encode(models.vae, models.clip, image, W, H, F)[0]
    with pytest.raises(ValueError, match="text-to-video model.*Image To Video Encode"):
        n.WanCoreSampler().sample(models.t2v, text, embeds, **SETTINGS)
    with pytest.raises(ValueError, match="image-to-video model.*start image"):
        n.WanCoreSampler().sample(models.i2v, text, size, **SETTINGS)
    flf = n.WanCoreImageToVideoEncode().encode(models.vae, models.clip, image, W, H, F, end_image=image)[0]
    with pytest.raises(ValueError, match="text-to-video model"):   # (an I2V model takes it: Fun InP, test_fun_*)
        n.WanCoreSampler().sample(models.t2v, text, flf, **SETTINGS)
    with pytest.raises(ValueError, match="frames 80"):
        n.WanCoreEmptyVideoEmbeds().embeds(W, H, 80)


class _Interrupted(Exception):
    pass


def test_progress_ticks_every_step_and_an_interrupt_stops_sampling_without_harm(pack, models, monkeypatch):
    n = pack.nodes
    ticks, checks = [], {"n": 0, "stop_at": None}

    class Bar:
        def __init__(self, total, node_id=None):
            self.node_id = node_id

        def update_absolute(self, value, total=None, preview=None):
            ticks.append((self.node_id, value, total))

    def throw():
        checks["n"] += 1
        if checks["stop_at"] is not None and checks["n"] >= checks["stop_at"]:
            raise _Interrupted()

    mm = types.SimpleNamespace(get_torch_device=lambda: torch.device("cpu"),
                               unet_offload_device=lambda: torch.device("cpu"), unload_all_models=lambda: None,
                               soft_empty_cache=lambda: None, throw_exception_if_processing_interrupted=throw)
    monkeypatch.setitem(sys.modules, "comfy.utils", types.SimpleNamespace(ProgressBar=Bar))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    settings = dict(SETTINGS, steps=3)
    first = n.WanCoreSampler().sample(models.t2v, text, size, unique_id="9", **settings)[0]["samples"]
    assert ticks == [("9", 1, 3), ("9", 2, 3), ("9", 3, 3)]
    assert checks["n"] >= 3
    checks.update(n=0, stop_at=2)
    with pytest.raises(_Interrupted):
        n.WanCoreSampler().sample(models.t2v, text, size, unique_id="9", **settings)
    checks.update(stop_at=None)
    again = n.WanCoreSampler().sample(models.t2v, text, size, unique_id="9", **settings)[0]["samples"]
    assert torch.equal(first, again)


# ------------------------------------------------------------------ memory, LoRA and step cache options

def _plain(pack, models, text, size, **settings):
    return pack.nodes.WanCoreSampler().sample(models.t2v, text, size, **settings)[0]["samples"]


def test_memory_options_on_the_cpu_give_the_plain_result_bit_for_bit(pack, models):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    plain = _plain(pack, models, text, size, **SETTINGS)
    blocks = len(models.t2v.model.blocks)
    for budget, k in ((0.0, -1), (8.0, -1), (0.0, 0), (0.0, 1), (0.0, blocks + 3)):
        memory = n.WanCoreMemoryOptions().options(budget, k, "auto", "auto", 512)[0]
        out = n.WanCoreSampler().sample(models.t2v, text, size, memory=memory, **SETTINGS)[0]["samples"]
        assert torch.equal(out, plain), (budget, k)
    # the loader's options are the default of its samplers; the swap left every weight on its master
    assert all(p.device.type == "cpu" for p in models.t2v.model.parameters())


def test_memory_options_translate_to_the_engines_run_options(pack):
    from wancore_pack.nodes.plans import run_options

    n, wc = pack.nodes, pack.wan_core
    auto = run_options(n.WanCoreMemoryOptions().options(0.0, -1, "auto", "auto", 512)[0])
    assert auto == wc.RunOptions() and run_options(None) == wc.RunOptions()
    memory = n.WanCoreMemoryOptions().options(8.0, 3, "yes", "custom", 256)[0]
    spec = n.WanCoreStepCache().options("magcache", -1.0, -1, 7, "e", 2, 0.2)[0]
    options = run_options(memory, (), spec, None)
    assert options == wc.RunOptions(vram_budget=8 << 30, resident_blocks=3, text_encoder_device="cpu", vae_tile=256,
                                    step_cache=wc.StepCacheSpec("magcache", None, None, 7))
    assert run_options(n.WanCoreMemoryOptions().options(0.0, -1, "no", "off", 512)[0]).text_encoder_device == "gpu"
    assert run_options(memory, vae_tile="off").vae_tile == "off"   # WanCore Decode's own tiling wins


def test_memory_plan_on_a_gpu_chooses_block_swap_from_the_budget(pack, models):
    """The node's memory widgets reach wan_core's planner (fake cuda device: nothing runs)."""
    from wancore_pack.nodes.plans import run_options

    n, dit, wc = pack.nodes, models.t2v.model, pack.wan_core
    plan_sampling, job = wc.run_plan.plan_sampling, wc.Job.from_latent_shape((16, 21, 60, 104))
    options = n.WanCoreMemoryOptions()
    blocks = len(dit.blocks)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def plan(gb, k, device=cuda, offload=cpu, free=None):
        return plan_sampling(dit, job, run_options(options.options(gb, k, "auto", "auto", 512)[0]), device, offload,
                             free)

    p = plan(0.0, -1, free=24 << 30)
    assert p.resident_blocks == blocks and p.reason.startswith("free VRAM 24.00 GiB")
    assert "budget 8.00 GiB" in plan(8.0, -1, free=1 << 40).reason   # the user's budget wins over the free VRAM
    p = plan(0.0, 1, free=1 << 40)
    assert p.resident_blocks == 1 and "explicit" in p.reason
    with pytest.raises(wc.PlanError, match="minimum"):
        plan(0.25, -1)
    assert plan(0.0, -1, free=256 << 20).resident_blocks == 0         # free VRAM short: stream all
    assert plan(0.0, -1, offload=cuda, free=1 << 30).resident_blocks is None   # --highvram: in place
    assert plan(0.0, -1, device=cpu, free=None).resident_blocks is None        # --cpu: in place


@pytest.fixture()
def lora_file(model_dir, models):
    """A random rank-2 LoRA on two Linears of the tiny T2V model, plus one key matching nothing."""
    folder = model_dir["diffusion_models"].parent / "loras"
    folder.mkdir(exist_ok=True)
    nodepack.write_tiny_lora(folder / "tiny_lora.safetensors", models.t2v.model, extra={
        "diffusion_model.blocks.0.no_such_layer.lora_down.weight": torch.zeros(2, 4),
        "diffusion_model.blocks.0.no_such_layer.lora_up.weight": torch.zeros(4, 2)})
    return folder


def test_lora_node_applies_the_lora_unmerged_while_sampling_as_wan_core_does(pack, models, lora_file, monkeypatch,
                                                                              caplog):
    n, wc = pack.nodes, pack.wan_core
    model_dir = {k: lora_file.parent / k for k in ("diffusion_models", "vae", "text_encoders", "clip_vision",
                                                    "loras")}
    monkeypatch.setitem(sys.modules, "folder_paths", nodepack.fake_folder_paths(model_dir))
    assert n.WanCoreLoraLoader.INPUT_TYPES()["required"]["lora_name"][0] == ["tiny_lora.safetensors"]
    first = n.WanCoreLoraLoader().load("tiny_lora.safetensors", 0.8)[0]
    loras = n.WanCoreLoraLoader().load("tiny_lora.safetensors", -0.3, loras=first)[0]
    assert [s.strength for s in loras] == [0.8, -0.3]
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    plain = _plain(pack, models, text, size, **SETTINGS)
    before = {k: v.clone() for k, v in models.t2v.model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="wan_core"):
        out = n.WanCoreSampler().sample(models.t2v, text, size, loras=loras, **SETTINGS)[0]["samples"]
    assert any("no_such_layer" in r.getMessage() for r in caplog.records), "unmatched keys must be named"
    settings = wc.SamplerSettings(**SETTINGS)
    with wc.applied_loras(models.t2v.model, list(loras)):
        ref = wc.sample(models.t2v.model, text, settings, shape=wc.latent_shape(W, H, F))
    assert torch.equal(out, wc.vae.denormalize_latents(ref[None]))
    assert not torch.equal(out, plain)
    # removed afterwards: weights and output exactly as before
    assert all(torch.equal(v, before[k]) for k, v in models.t2v.model.state_dict().items())
    assert torch.equal(_plain(pack, models, text, size, **SETTINGS), plain)
    # with memory options (block swap on the CPU): the very same numbers
    memory = n.WanCoreMemoryOptions().options(0.0, 1, "auto", "auto", 512)[0]
    swapped = n.WanCoreSampler().sample(models.t2v, text, size, loras=loras, memory=memory, **SETTINGS)[0]
    assert torch.equal(swapped["samples"], out)


def test_loader_merges_loras_and_stores_fp8_weights(pack, models, lora_file, monkeypatch):
    n = pack.nodes
    model_dir = {k: lora_file.parent / k for k in ("diffusion_models", "loras")}
    monkeypatch.setitem(sys.modules, "folder_paths", nodepack.fake_folder_paths(model_dir))
    loras = n.WanCoreLoraLoader().load("tiny_lora.safetensors", 0.8)[0]
    merged = n.WanCoreLoadDiT().load("wan_tiny_t2v.safetensors", "fp32", "sdpa", loras=loras)[0]
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    unmerged = n.WanCoreSampler().sample(models.t2v, text, size, loras=loras, **SETTINGS)[0]["samples"]
    out = n.WanCoreSampler().sample(merged, text, size, **SETTINGS)[0]["samples"]
    torch.testing.assert_close(out, unmerged, rtol=0, atol=1e-4)   # float32 rounding only (W+sBA vs Wx+sBAx)
    fp8 = n.WanCoreLoadDiT().load("wan_tiny_t2v.safetensors", "fp8_e4m3fn", "sdpa")[0]
    assert fp8.model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    out8 = n.WanCoreSampler().sample(fp8, text, size, **SETTINGS)[0]["samples"]
    assert out8.shape == out.shape and torch.isfinite(out8).all()


def _summary(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if "DiT block evaluations saved" in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("method", ["teacache", "magcache"])
def test_step_cache_threshold_zero_is_plain_and_a_high_threshold_reports_reused_steps(pack, models, method, caplog):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    settings = dict(SETTINGS, steps=6)
    plain = _plain(pack, models, text, size, **settings)
    node = n.WanCoreStepCache()
    off = node.options(method, 0.0, -1, -1, "e", 2, 0.2)[0]
    with caplog.at_level(logging.INFO, logger="wan_core"):
        same = n.WanCoreSampler().sample(models.t2v, text, size, step_cache=off, **settings)[0]["samples"]
    assert torch.equal(same, plain)
    assert "cond 6/6 computed, 0 reused" in _summary(caplog)
    caplog.clear()
    high = node.options(method, 1e6, 1, -1, "e", 4, 0.0)[0]
    with caplog.at_level(logging.INFO, logger="wan_core"):
        fast = n.WanCoreSampler().sample(models.t2v, text, size, step_cache=high, **settings)[0]["samples"]
    line = _summary(caplog)
    assert "cond 2/6 computed, 4 reused" in line and "uncond 2/6 computed, 4 reused" in line, line
    assert not torch.equal(fast, plain)


def test_a_requeued_prompt_runs_no_text_encoder(pack, models, monkeypatch):
    n = pack.nodes
    calls = []
    real = models.te.encode
    monkeypatch.setattr(models.te, "encode", lambda prompts: calls.append(list(prompts)) or real(prompts))
    first = n.WanCoreTextEncode().encode(models.te, "a requeued prompt", "blurry, dark", "t2v")[0]
    again = n.WanCoreTextEncode().encode(models.te, "a requeued prompt", "blurry, dark", "t2v")[0]
    assert calls == [["a requeued prompt", "blurry, dark"]]
    assert torch.equal(first.positive, again.positive) and torch.equal(first.negative, again.negative)
    memory = n.WanCoreMemoryOptions().options(0.0, -1, "yes", "auto", 512)[0]
    on_cpu = n.WanCoreTextEncode().encode(models.te, "another prompt", "blurry, dark", "t2v", memory=memory)[0]
    assert calls[-1] == ["another prompt"] and on_cpu.positive.device.type == "cpu"


def test_compile_options_trace_the_blocks_with_the_same_numbers_and_disconnecting_restores(pack, models):
    n = pack.nodes
    text = n.WanCoreTextEncode().encode(models.te, "a cat", "", "t2v")[0]
    size = n.WanCoreEmptyVideoEmbeds().embeds(W, H, F)[0]
    plain = _plain(pack, models, text, size, **SETTINGS)
    options = n.WanCoreCompileOptions().options("eager", "default", "auto")[0]   # dynamo trace, no codegen
    compiled = pack.nodes.plans.compiled_models()
    dit = models.t2v.model
    torch._dynamo.reset()
    try:
        out = n.WanCoreSampler().sample(models.t2v, text, size, compile=options, **SETTINGS)[0]["samples"]
        assert compiled.get(dit) is not None and not compiled.get(dit).fell_back
        assert "forward" in dit.blocks[0].__dict__ and "wancore_compiled" not in vars(dit)
        assert torch.equal(out, plain)
        again = n.WanCoreSampler().sample(models.t2v, text, size, **SETTINGS)[0]["samples"]
        assert compiled.get(dit) is None and "forward" not in dit.blocks[0].__dict__
        assert torch.equal(again, plain)
    finally:
        torch._dynamo.reset()
