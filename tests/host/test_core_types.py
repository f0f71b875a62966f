"""Core types in and out, in a real ComfyUI server (level 3, issue 15 parts 1-2).

- core CLIPTextEncode (a umT5 CLIP of type wan) -> WanCore Text Embeds From Conditioning
  gives the embeddings of WanCore Text Encode on the same file, and WanCore Sampler gives the
  same latents from either;
- core VAE + CLIPVisionEncode (crop none) -> WanCore Image Embeds From Core gives the image
  embeddings of WanCore Image To Video Encode on the same files, and the same latents;
- WanCore DiT To Model: the bridged MODEL's denoised prediction (T2V, and I2V with c_concat
  and clip_fea; with and without a core LoRA) equals ComfyUI's own Wan model loaded from the
  same file (core ``load_diffusion_model``); core KSampler / SamplerCustomAdvanced +
  ModelSamplingSD3 graphs and the two core-loader example workflows run end to end with it;
  our own sampler afterwards samples the unpatched weights.

ComfyUI's own loaders take their architecture from fixed configs, not from the file: the
CLIP loader (type wan) builds umT5-XXL from ``umt5_config_xxl.json`` and only recognises a
file with 24 blocks of width 4096; the CLIP vision loader picks ViT-H/L/G by layer count;
the VAE loader builds Wan's VAE with dim 96. None of them accepts a tiny file (the smallest
file they accept is the full-size model). So probe nodes here build ComfyUI's own objects
from the tiny files with only the sizes changed: ``comfy.sd.CLIP`` with
``umt5xxl_model_config`` (an option ComfyUI reads for this), ``ClipVisionModel`` with a
tiny config .json, ``comfy.sd.VAE`` with its dim 96 swapped for the file's. The DiT loader
infers sizes from shapes except the text width (4096) and the I2V CLIP width (1280): the
native parity uses tiny DiTs with those widths. The server runs with ``--fp32-text-enc``
(ComfyUI's text encoders and CLIP vision default to fp16 on the CPU).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hosttools  # noqa: E402
from hosttools import API, FRAMES, Server, node_id, tiny, uses_core_loaders, video_frames  # noqa: E402

hosttools.require_comfyui()
pytestmark = pytest.mark.host

TE_COMFY = "umt5_tiny_comfy.safetensors"     # the tiny umT5 in ComfyUI's (HF) key layout
DIT_4096 = "wan_tiny_t2v_text4096.safetensors"
I2V_4096 = "wan_tiny_i2v_text4096.safetensors"
CLIP_HF = "clip_vision_tiny_hf.safetensors"  # the tiny CLIP vision tower in HF key layout
PROMPT, NEGATIVE = "a cat walks on the grass", "blurry, static"

_PROBE = r'''
import torch
import comfy.model_management as mm
import comfy.sd
import comfy.text_encoders.wan
import comfy.utils
import folder_paths


class _Any(str):
    def __ne__(self, other):
        return False


ANY = _Any("*")


def _name(kind):
    return {kind: ("STRING", {"default": ""})}


@probe(_name("clip_name"), ("CLIP",))
def CoreProbeTinyWanCLIP(clip_name):
    """A core CLIP (umT5, type wan) from a tiny file: comfy.sd's own construction, sizes from the file."""
    sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("text_encoders", clip_name))
    tokenizer_data = {"spiece_model": sd.pop("spiece_model")}
    block = sd["encoder.block.0.layer.0.SelfAttention.q.weight"]
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.block.")})
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    config = {"d_model": block.shape[1], "d_kv": block.shape[0] // heads, "num_heads": heads,
              "num_layers": layers, "d_ff": sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
              "vocab_size": sd["shared.weight"].shape[0]}

    class Target:
        params = {}
        clip = comfy.text_encoders.wan.te()
        tokenizer = comfy.text_encoders.wan.WanT5Tokenizer

    clip = comfy.sd.CLIP(Target(), tokenizer_data=tokenizer_data,
                         model_options={"umt5xxl_model_config": config, "dtype": torch.float32})
    missing, unexpected = clip.load_sd(sd)
    assert not unexpected, unexpected
    return (clip,)


@probe(_name("unet_name"), ("MODEL",))
def CoreProbeNativeWan(unet_name):
    """ComfyUI's own Wan model from a diffusion_models file, float32."""
    path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
    return (comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float32}),)


@probe({"a": ("MODEL",), "b": ("MODEL",), "text_dim": ("INT", {"default": 4096})},
       optional={"clip_dim": ("INT", {"default": 0})})
def CoreProbeCompareDenoised(a, b, text_dim, clip_dim=0):
    """Max |a - b| of the two MODELs' denoised predictions on the same random input, text and sigmas."""
    mm.load_models_gpu([a, b])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    # as core umT5 gives it: 512 tokens, zero after the prompt's (the native model attends to all of
    # them, ours pads to 512 itself: a shorter context would differ by design, as upstream pads)
    context = torch.zeros(1, 512, text_dim)
    context[:, :7] = torch.randn(1, 7, text_dim, generator=g)
    extra = {}
    if clip_dim:   # I2V: mask + image latents on channels, CLIP tokens
        extra = {"c_concat": torch.randn(1, 20, 2, 4, 6, generator=g),
                 "clip_fea": torch.randn(1, 257, clip_dim, generator=g)}
    diffs, scale, kinds = [], 0.0, []
    for sigma in (0.95, 0.5, 0.1):
        s = torch.tensor([sigma])
        out = [m.model.apply_model(x, s, c_crossattn=context, **extra).float() for m in (a, b)]
        diffs.append(float((out[0] - out[1]).abs().max()))
        scale = max(scale, float(out[1].abs().max()))
    import comfy.model_sampling as ms

    kinds = [f"flow={isinstance(m.model.model_sampling, ms.ModelSamplingDiscreteFlow)}/"
             f"const={isinstance(m.model.model_sampling, ms.CONST)}/shift={float(m.model.model_sampling.shift)}"
             for m in (a, b)]
    return {"ui": {"max_abs": [max(diffs)], "scale": [scale], "sampling": kinds}}


@probe({"a": (ANY,), "b": (ANY,)})
def CoreProbeCompare(a, b):
    """Max |a - b| of two text embeds (positive and negative) or two LATENTs; shapes must agree."""
    if isinstance(a, dict):
        pairs = [(a["samples"], b["samples"])]
    elif hasattr(a, "clip_fea"):   # image embeds: mask + latents, CLIP tokens
        pairs = [(a.y, b.y), (a.clip_fea, b.clip_fea)]
    else:
        pairs = [(a.positive, b.positive), (a.negative, b.negative)]
    shapes = [[list(x.shape), list(y.shape)] for x, y in pairs]
    diffs = [float((x.float() - y.float()).abs().max()) if x.shape == y.shape else float("inf") for x, y in pairs]
    scale = max(float(y.abs().max()) for _, y in pairs)
    return {"ui": {"max_abs": [max(diffs)], "scale": [scale], "shapes": shapes}}


@probe(_name("vae_name"), ("VAE",))
def CoreProbeTinyWanVAE(vae_name):
    """comfy.sd.VAE over a tiny Wan 2.1 VAE file: ComfyUI's own class, its fixed dim 96 swapped for the file's."""
    import comfy.ldm.wan.vae as wan_vae

    sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("vae", vae_name))
    dim, full = sd["encoder.conv1.weight"].shape[0], wan_vae.WanVAE
    wan_vae.WanVAE = lambda **kw: full(**dict(kw, dim=dim))
    try:
        vae = comfy.sd.VAE(sd=sd, dtype=torch.float32)
    finally:
        wan_vae.WanVAE = full
    missing, _ = vae.first_stage_model.load_state_dict(sd, strict=False)
    assert not missing, missing
    return (vae,)


@probe(_name("clip_name"), ("CLIP_VISION",))
def CoreProbeTinyClipVision(clip_name):
    """comfy.clip_vision.ClipVisionModel from a tiny HF-layout file and its config (the .json beside it)."""
    import comfy.clip_vision

    path = folder_paths.get_full_path_or_raise("clip_vision", clip_name)
    clip = comfy.clip_vision.ClipVisionModel(path.rsplit(".", 1)[0] + ".json")
    missing, _ = clip.load_sd(comfy.utils.load_torch_file(path))
    assert not missing, missing
    return (clip,)


NODE_CLASS_MAPPINGS = mappings(CoreProbeTinyWanCLIP, CoreProbeNativeWan, CoreProbeCompareDenoised, CoreProbeCompare,
                               CoreProbeTinyWanVAE, CoreProbeTinyClipVision)
'''


def _write_core_models(base: Path) -> None:
    """The tiny umT5 in ComfyUI's key layout, and a tiny T2V DiT with ComfyUI's fixed text width."""
    from safetensors.torch import load_file, save_file

    from wan_core.configs import DiTConfig
    from wan_core.dit import WanDiT
    from wan_core.layouts_encoders import _T5_HF_LAYER
    from wan_core.selftest import SELFTEST_CONFIGS, _randomize

    te = base / "models" / "text_encoders"
    official = load_file(str(te / "umt5_tiny.safetensors"))
    to_hf = {v: k for k, v in _T5_HF_LAYER.items()}
    comfy_sd = {}
    for k, v in official.items():
        if k == "token_embedding.weight":
            comfy_sd["shared.weight"] = v
        elif k == "norm.weight":
            comfy_sd["encoder.final_layer_norm.weight"] = v
        elif k == "spiece_model":
            comfy_sd[k] = v
        else:
            _, n, rest = k.split(".", 2)
            comfy_sd[f"encoder.block.{n}.{to_hf[rest]}"] = v
    save_file(comfy_sd, str(te / TE_COMFY))
    _write_hf_clip_vision(base / "models" / "clip_vision")
    t2v = SELFTEST_CONFIGS["t2v"]
    cfg = DiTConfig(dim=t2v.dim, ffn_dim=t2v.ffn_dim, num_layers=t2v.num_layers, text_dim=4096, freq_dim=256)
    with torch.device("meta"):
        model = WanDiT(cfg)
    save_file({"model.diffusion_model." + k: v for k, v in _randomize(model, 11).items()},
              str(base / "models" / "diffusion_models" / DIT_4096))
    # ComfyUI's native I2V model also fixes the CLIP width (1280)
    cfg = DiTConfig(dim=t2v.dim, ffn_dim=t2v.ffn_dim, num_layers=t2v.num_layers, in_dim=36, text_dim=4096,
                    freq_dim=256, model_type="i2v", clip_dim=1280)
    with torch.device("meta"):
        model = WanDiT(cfg)
    save_file({"model.diffusion_model." + k: v for k, v in _randomize(model, 12).items()},
              str(base / "models" / "diffusion_models" / I2V_4096))


def _write_hf_clip_vision(folder: Path) -> None:
    """The tiny CLIP vision tower in the HF layout ComfyUI's CLIP vision model reads, and its config."""
    import json

    from safetensors.torch import load_file, save_file

    from wan_core.selftest import SELFTEST_CONFIGS

    c = SELFTEST_CONFIGS["clip"]
    official = load_file(str(folder / "clip_vision_tiny.safetensors"))
    official = {k.removeprefix("visual."): v for k, v in official.items()}
    v = "vision_model."
    hf = {v + "embeddings.class_embedding": official["cls_embedding"].reshape(-1),
          v + "embeddings.patch_embedding.weight": official["patch_embedding.weight"],
          v + "embeddings.position_embedding.weight": official["pos_embedding"][0],
          "visual_projection.weight": official["head"].t().contiguous()}
    for ours, name in (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")):
        for leaf in ("weight", "bias"):
            hf[f"{v}{name}.{leaf}"] = official[f"{ours}.{leaf}"]
    for n in range(c.num_layers):
        src, dst = f"transformer.{n}.", f"{v}encoder.layers.{n}."
        for leaf in ("weight", "bias"):
            for p, part in zip("qkv", official[f"{src}attn.to_qkv.{leaf}"].chunk(3, dim=0)):
                hf[f"{dst}self_attn.{p}_proj.{leaf}"] = part.contiguous()
            for ours, name in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                               ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
                hf[f"{dst}{name}.{leaf}"] = official[f"{src}{ours}.{leaf}"]
    save_file(hf, str(folder / CLIP_HF))
    config = {"hidden_act": "gelu", "hidden_size": c.width, "image_size": c.image_size, "intermediate_size": c.mlp_dim,
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": c.num_heads,
              "num_channels": 3, "num_hidden_layers": c.num_layers, "patch_size": c.patch_size,
              "projection_dim": c.out_dim}
    (folder / CLIP_HF.replace(".safetensors", ".json")).write_text(json.dumps(config))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = hosttools.base_directory(tmp_path_factory.mktemp("comfy_core"), "core_probe.py", _PROBE)
    _write_core_models(base)
    with hosttools.comfyui(base, "--fp32-text-enc") as srv:   # CLIP vision in float32 on the CPU
        yield srv


def _run_ok(server: Server, prompt: dict) -> dict:
    history, events = server.run(prompt)
    errors = [e for e in events if e["type"] == "execution_error"]
    assert not errors, f"{errors[0]['data'].get('exception_message')}\nlog: {server.log}"
    return history["outputs"]


def _n(cls: str, **inputs) -> dict:
    return {"class_type": cls, "inputs": inputs}


def _assert_same(outputs: dict, what: str, node: str) -> None:
    """The CoreProbeCompare outputs ``node`` (embeds, core vs ours) and ``cmp_latent`` (our
    sampler's latents from either): same shapes, max |a - b| <= 1e-4 (relative above 1)."""
    embeds, latent = outputs[node], outputs["cmp_latent"]
    print(f"{what} core vs ours:", embeds, "latents:", latent)
    assert all(a == b for a, b in embeds["shapes"]), embeds["shapes"]
    assert embeds["max_abs"][0] <= 1e-4 * max(1.0, embeds["scale"][0]), embeds
    assert latent["max_abs"][0] <= 1e-4 * max(1.0, latent["scale"][0]), latent


def _sampler(model: list, text: list, embeds: list, seed: int = 3) -> dict:
    return _n("WanCoreSampler", model=model, text_embeds=text, video_embeds=embeds, seed=seed, steps=2, cfg=5.0,
              shift=5.0, sampler="unipc", denoise=1.0)


def test_core_clip_text_encode_gives_our_text_embeds_and_our_sampler_the_same_latents(server):
    prompt = {
        "te": _n("WanCoreLoadTextEncoder", text_encoder_name=TE_COMFY, weight_dtype="fp32"),
        "ours": _n("WanCoreTextEncode", text_encoder=["te", 0], positive=PROMPT, negative=NEGATIVE, model_type="t2v"),
        "clip": _n("CoreProbeTinyWanCLIP", clip_name=TE_COMFY),
        "pos": _n("CLIPTextEncode", clip=["clip", 0], text=PROMPT),
        "neg": _n("CLIPTextEncode", clip=["clip", 0], text=NEGATIVE),
        "core": _n("WanCoreTextEmbedsFromConditioning", positive=["pos", 0], negative=["neg", 0]),
        "cmp_text": _n("CoreProbeCompare", a=["core", 0], b=["ours", 0]),
        "dit": _n("WanCoreLoadDiT", model_name="wan_tiny_t2v.safetensors", weight_dtype="fp32", attention="sdpa"),
        "size": _n("WanCoreEmptyVideoEmbeds", width=32, height=32, frames=5),
        "s_core": _sampler(["dit", 0], ["core", 0], ["size", 0]),
        "s_ours": _sampler(["dit", 0], ["ours", 0], ["size", 0]),
        "cmp_latent": _n("CoreProbeCompare", a=["s_core", 0], b=["s_ours", 0]),
    }
    # same token count (core umT5 pads to 512 with zeros, the adapter drops them), same values
    _assert_same(_run_ok(server, prompt), "text embeds", "cmp_text")


def test_the_bridged_dit_predicts_what_comfyuis_native_wan_model_predicts(server):
    prompt = {
        "dit": _n("WanCoreLoadDiT", model_name=DIT_4096, weight_dtype="fp32", attention="sdpa"),
        "bridge": _n("WanCoreDiTToModel", model=["dit", 0], shift=8.0),
        "native": _n("CoreProbeNativeWan", unet_name=DIT_4096),
        "cmp": _n("CoreProbeCompareDenoised", a=["bridge", 0], b=["native", 0], text_dim=4096),
    }
    out = _run_ok(server, prompt)["cmp"]
    print("denoised bridged vs native:", out)
    assert out["sampling"][0] == out["sampling"][1] == "flow=True/const=True/shift=8.0"
    assert out["max_abs"][0] <= 1e-4, out


def test_the_bridged_i2v_dit_predicts_what_comfyuis_native_i2v_model_predicts(server):
    prompt = {
        "dit": _n("WanCoreLoadDiT", model_name=I2V_4096, weight_dtype="fp32", attention="sdpa"),
        "bridge": _n("WanCoreDiTToModel", model=["dit", 0], shift=3.0),
        "native": _n("CoreProbeNativeWan", unet_name=I2V_4096),
        "sd3": _n("ModelSamplingSD3", model=["native", 0], shift=3.0),
        "cmp": _n("CoreProbeCompareDenoised", a=["bridge", 0], b=["sd3", 0], text_dim=4096, clip_dim=1280),
    }
    out = _run_ok(server, prompt)["cmp"]
    print("I2V denoised bridged vs native:", out)
    assert out["sampling"][0] == out["sampling"][1] == "flow=True/const=True/shift=3.0"
    assert out["max_abs"][0] <= 1e-4, out


def test_core_ksampler_and_sampler_custom_advanced_run_our_dit_end_to_end(server):
    prompt = {
        "dit": _n("WanCoreLoadDiT", model_name="wan_tiny_t2v.safetensors", weight_dtype="fp32", attention="sdpa"),
        "model": _n("WanCoreDiTToModel", model=["dit", 0], shift=5.0),
        "clip": _n("CoreProbeTinyWanCLIP", clip_name=TE_COMFY),
        "pos": _n("CLIPTextEncode", clip=["clip", 0], text=PROMPT),
        "neg": _n("CLIPTextEncode", clip=["clip", 0], text=NEGATIVE),
        "latent": _n("EmptyHunyuanLatentVideo", width=32, height=32, length=5, batch_size=1),
        "ks": _n("KSampler", model=["model", 0], positive=["pos", 0], negative=["neg", 0], latent_image=["latent", 0],
                 seed=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="simple", denoise=1.0),
        "save": _n("SaveLatent", samples=["ks", 0], filename_prefix="core_ksampler"),
        # the advanced path, with the shift changed downstream by ModelSamplingSD3
        "sd3": _n("ModelSamplingSD3", model=["model", 0], shift=3.0),
        "guider": _n("CFGGuider", model=["sd3", 0], positive=["pos", 0], negative=["neg", 0], cfg=5.0),
        "noise": _n("RandomNoise", noise_seed=1),
        "sampler": _n("KSamplerSelect", sampler_name="euler"),
        "sigmas": _n("BasicScheduler", model=["sd3", 0], scheduler="simple", steps=2, denoise=1.0),
        "adv": _n("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0], sampler=["sampler", 0],
                  sigmas=["sigmas", 0], latent_image=["latent", 0]),
        "save_adv": _n("SaveLatent", samples=["adv", 0], filename_prefix="core_advanced"),
    }
    outputs = _run_ok(server, prompt)
    import safetensors.torch

    for node, prefix in (("save", "core_ksampler"), ("save_adv", "core_advanced")):
        item = outputs[node]["latents"][0]
        path = server.base / "output" / item.get("subfolder", "") / item["filename"]
        samples = safetensors.torch.load_file(str(path))["latent_tensor"]
        assert samples.shape == (1, 16, 2, 4, 4), (prefix, samples.shape)
        assert torch.isfinite(samples).all() and samples.abs().max() > 0, prefix


def test_core_vae_and_clip_vision_encode_give_our_image_embeds_and_our_sampler_the_same_latents(server):
    # a 112x112 image (the tiny tower's size: CLIPVisionEncode resizes nothing) of 8-bit values (its rounding
    # to 1/255 changes nothing): what the core encoder then computes is exactly the official preprocessing
    prompt = {
        "image": _n("LoadImage", image="example.png"),
        "square": _n("ImageScale", image=["image", 0], upscale_method="nearest-exact", width=112, height=112,
                     crop="disabled"),
        "vae": _n("WanCoreLoadVAE", vae_name="wan_tiny_vae.safetensors", weight_dtype="fp32"),
        "cv": _n("WanCoreLoadCLIPVision", clip_name=CLIP_HF, weight_dtype="fp32"),
        "ours": _n("WanCoreImageToVideoEncode", vae=["vae", 0], clip_vision=["cv", 0], start_image=["square", 0],
                   width=32, height=32, frames=5),
        "core_vae": _n("CoreProbeTinyWanVAE", vae_name="wan_tiny_vae.safetensors"),
        "core_cv": _n("CoreProbeTinyClipVision", clip_name=CLIP_HF),
        "cv_out": _n("CLIPVisionEncode", clip_vision=["core_cv", 0], image=["square", 0], crop="none"),
        "core": _n("WanCoreImageEmbedsFromCore", vae=["core_vae", 0], clip_vision_output=["cv_out", 0],
                   start_image=["square", 0], width=32, height=32, frames=5),
        "cmp_embeds": _n("CoreProbeCompare", a=["core", 0], b=["ours", 0]),
        "te": _n("WanCoreLoadTextEncoder", text_encoder_name=TE_COMFY, weight_dtype="fp32"),
        "text": _n("WanCoreTextEncode", text_encoder=["te", 0], positive=PROMPT, negative=NEGATIVE, model_type="i2v"),
        "dit": _n("WanCoreLoadDiT", model_name="wan_tiny_i2v.safetensors", weight_dtype="fp32", attention="sdpa"),
        "s_core": _sampler(["dit", 0], ["text", 0], ["core", 0]),
        "s_ours": _sampler(["dit", 0], ["text", 0], ["ours", 0]),
        "cmp_latent": _n("CoreProbeCompare", a=["s_core", 0], b=["s_ours", 0]),
    }
    _assert_same(_run_ok(server, prompt), "image embeds", "cmp_embeds")


@pytest.mark.parametrize("name", sorted(p.stem for p in API.glob("*.json") if uses_core_loaders(p)))
def test_each_core_loader_workflow_runs_on_tiny_models(server, name):
    prompt = tiny(name)
    for node in prompt.values():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "CLIPLoader":
            node.update(class_type="CoreProbeTinyWanCLIP", inputs={"clip_name": TE_COMFY})
        elif cls == "VAELoader":
            node.update(class_type="CoreProbeTinyWanVAE", inputs={"vae_name": "wan_tiny_vae.safetensors"})
        elif cls == "EmptyHunyuanLatentVideo":
            inputs.update(width=32, height=32, length=FRAMES)
        elif cls == "KSampler":
            inputs["steps"] = 2
    outputs = _run_ok(server, prompt)
    items = outputs[node_id(prompt, "SaveVideo")]["images"]
    assert len(items) == 1 and video_frames(server, items[0]).shape == (FRAMES, 32, 32, 3)


def test_core_lora_loader_patches_the_bridged_dit_as_it_patches_the_native_model(server):
    lora = {"lora_name": "wan_tiny_lora.safetensors", "strength_model": 1.0}
    prompt = {
        "dit": _n("WanCoreLoadDiT", model_name=DIT_4096, weight_dtype="fp32", attention="sdpa"),
        "bridge": _n("WanCoreDiTToModel", model=["dit", 0], shift=8.0),
        "native": _n("CoreProbeNativeWan", unet_name=DIT_4096),
        "bridge_lora": _n("LoraLoaderModelOnly", model=["bridge", 0], **lora),
        "native_lora": _n("LoraLoaderModelOnly", model=["native", 0], **lora),
        "cmp": _n("CoreProbeCompareDenoised", a=["bridge_lora", 0], b=["native_lora", 0], text_dim=4096),
    }
    same = _run_ok(server, prompt)["cmp"]
    effect = _run_ok(server, dict(prompt, cmp=_n("CoreProbeCompareDenoised", a=["bridge_lora", 0], b=["native", 0],
                                                  text_dim=4096)))["cmp"]
    print("with LoRA, bridged vs native:", same, "LoRA effect:", effect)
    assert same["max_abs"][0] <= 1e-4 and effect["max_abs"][0] > 1e-3, (same, effect)


def test_our_sampler_after_a_core_lora_run_on_the_same_dit_samples_the_unpatched_weights(server):
    import safetensors.torch

    def graph(model_type: str, core: bool) -> dict:
        g = {
            "dit": _n("WanCoreLoadDiT", model_name="wan_tiny_t2v.safetensors", weight_dtype="fp32", attention="sdpa"),
            "te": _n("WanCoreLoadTextEncoder", text_encoder_name=TE_COMFY, weight_dtype="fp32"),
            # an explicit negative prompt: model_type changes nothing but makes the node run again
            "text": _n("WanCoreTextEncode", text_encoder=["te", 0], positive=PROMPT, negative=NEGATIVE,
                       model_type=model_type),
            "size": _n("WanCoreEmptyVideoEmbeds", width=32, height=32, frames=5),
            "ours": _sampler(["dit", 0], ["text", 0], ["size", 0], seed=9),
            "save": _n("SaveLatent", samples=["ours", 0], filename_prefix=f"ours_{model_type}"),
        }
        if core:   # our DiT through core KSampler with a core LoRA: ComfyUI keeps it loaded, patched
            g.update({
                "model": _n("WanCoreDiTToModel", model=["dit", 0], shift=5.0),
                "lora": _n("LoraLoaderModelOnly", model=["model", 0], lora_name="wan_tiny_lora.safetensors",
                           strength_model=1.0),
                "clip": _n("CoreProbeTinyWanCLIP", clip_name=TE_COMFY),
                "pos": _n("CLIPTextEncode", clip=["clip", 0], text=PROMPT),
                "latent": _n("EmptyHunyuanLatentVideo", width=32, height=32, length=5, batch_size=1),
                "ks": _n("KSampler", model=["lora", 0], positive=["pos", 0], negative=["pos", 0],
                         latent_image=["latent", 0], seed=1, steps=1, cfg=1.0, sampler_name="euler",
                         scheduler="simple", denoise=1.0),
                "save_ks": _n("SaveLatent", samples=["ks", 0], filename_prefix="core_lora"),
            })
            del g["ours"], g["save"]
        return g

    def latent(outputs: dict, node: str) -> torch.Tensor:
        item = outputs[node]["latents"][0]
        return safetensors.torch.load_file(str(server.base / "output" / item.get("subfolder", "") /
                                               item["filename"]))["latent_tensor"]

    before = latent(_run_ok(server, graph("t2v", core=False)), "save")
    _run_ok(server, graph("t2v", core=True))
    after = latent(_run_ok(server, graph("i2v", core=False)), "save")
    assert torch.equal(before, after)
