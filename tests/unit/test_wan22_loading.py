"""Wan 2.2 A14B experts load from every published layout (official folders, diffusers
transformer + transformer_2, ComfyUI single files per expert), and a Wan 2.1 model in a
Wan 2.2 graph (or the reverse) is refused with a clear message."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import factory
import tiny
import wan22_factory as f22
from wan_core.files import CheckpointError
from wan_core.loaders22 import boundary_from_folder, check_vae_for_dit, expert_paths, load_expert_pair
from wan_core.vae22 import WanVAE22

pytestmark = pytest.mark.usefixtures("one_thread")
I2V22 = dataclasses.replace(tiny.TINY_DIT_I2V, model_type="i2v_noclip")


def _save(path, sd):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _shards(folder, sd):
    """An official-style sharded set: two parts and an index."""
    keys = sorted(sd)
    half = len(keys) // 2
    parts = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
             "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in parts.items():
        _save(folder / name, {k: sd[k] for k in ks})
        weight_map.update({k: name for k in ks})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def experts():
    return factory.dit_official(tiny.TINY_DIT_T2V, 1), factory.dit_official(tiny.TINY_DIT_T2V, 2)


def _check(pair, experts):
    for dit, sd in zip((pair.high, pair.low), experts):
        got = dit.state_dict()
        assert all(torch.equal(got[k].float(), sd[k].float()) for k in sd)


def test_official_folder_with_high_and_low_noise_models(tmp_path, experts):
    root = tmp_path / "Wan2.2-T2V-A14B"
    _shards(root / "high_noise_model", experts[0])
    _shards(root / "low_noise_model", experts[1])
    assert expert_paths(root) == (root / "high_noise_model", root / "low_noise_model")
    _check(load_expert_pair(root, dtype=torch.float32), experts)


def test_diffusers_transformer_and_transformer_2(tmp_path, experts):
    root = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
    for sub, sd in zip(("transformer", "transformer_2"), experts):
        _save(root / sub / "diffusion_pytorch_model.safetensors", factory.dit_to_diffusers(sd))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875}))
    assert boundary_from_folder(root) == 0.875
    _check(load_expert_pair(root, dtype=torch.float32), experts)


def test_comfy_single_files_per_expert_incl_fp8(tmp_path, experts):
    high = _save(tmp_path / "wan2.2_t2v_high_noise_14B_fp16.safetensors",
                 {"model.diffusion_model." + k: v.half() for k, v in experts[0].items()})
    low = _save(tmp_path / "wan2.2_t2v_low_noise_14B_fp8_e4m3fn.safetensors",
                factory.make_checkpoint("dit", "fp8_e4m3fn", seed=2))
    pair = load_expert_pair(high, low, dtype=torch.float32)
    assert pair.high.cfg == pair.low.cfg


def test_i2v_a14b_experts_and_a_wan21_i2v_are_not_a_pair(tmp_path):
    a14b = _save(tmp_path / "i2v_high.safetensors", factory.dit_official(I2V22, 1))
    wan21 = _save(tmp_path / "i2v_14B_wan21.safetensors", factory.dit_official(tiny.TINY_DIT_I2V, 2))
    pair = load_expert_pair(a14b, _save(tmp_path / "i2v_low.safetensors", factory.dit_official(I2V22, 3)))
    assert pair.high.cfg.model_type == "i2v_noclip"
    with pytest.raises(CheckpointError, match="not the two experts"):
        load_expert_pair(a14b, wan21)


def test_a_single_model_folder_is_not_a_pair(tmp_path, experts):
    _save(tmp_path / "p" / "transformer" / "diffusion_pytorch_model.safetensors", factory.dit_to_diffusers(experts[0]))
    with pytest.raises(CheckpointError, match="single-model"):
        expert_paths(tmp_path / "p")


def test_vae_and_dit_of_different_generations_are_refused(tiny_vae):
    with torch.device("meta"):
        vae22 = WanVAE22(f22.TINY_VAE22)
    ti2v = tiny.TINY_DIT_TI2V
    check_vae_for_dit(ti2v, vae22)
    check_vae_for_dit(tiny.TINY_DIT_T2V, tiny_vae)
    with pytest.raises(CheckpointError, match="needs the Wan 2.2 VAE"):
        check_vae_for_dit(ti2v, tiny_vae)
    with pytest.raises(CheckpointError, match="needs the Wan 2.1 VAE"):
        check_vae_for_dit(tiny.TINY_DIT_T2V, vae22)


def test_generate_refuses_a_wan21_dit_with_the_wan22_vae_before_any_run():
    from wan_core.dit import WanDiT
    from wan_core.pipeline import generate

    with torch.device("meta"):
        vae22 = WanVAE22(f22.TINY_VAE22)
    dit = WanDiT(tiny.TINY_DIT_T2V).eval()
    with pytest.raises(CheckpointError, match="needs the Wan 2.1 VAE"):
        generate(dit=dit, vae=vae22, text_encoder=object(), prompt="a cat", width=48, height=32, frames=5, steps=2)


@pytest.mark.parametrize("cfg", [tiny.TINY_DIT_TI2V,
                                 I2V22])
def test_wan21_generate_names_the_wan22_entry_point(cfg):
    from wan_core.dit import WanDiT
    from wan_core.pipeline import generate

    with torch.device("meta"):
        dit = WanDiT(cfg)
    with pytest.raises(ValueError, match="generate_ti2v.*generate_a14b"):
        generate(dit=dit, vae=object(), text_encoder=object(), prompt="a cat", width=48, height=32, frames=5)
