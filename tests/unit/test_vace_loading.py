"""VACE DiT files load by their tensors in every published layout: official, Comfy-Org
repackaged (``model.diffusion_model.`` prefix, also scaled fp8) and diffusers; the loader
returns a :class:`~wan_core.vace.WanVaceDiT` with the attachment layers inferred from the
block count, holding exactly the official values."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from factory import dequantize_reference, save_safetensors
from vace_factory import TINY_VACE, VACE_LAYOUTS, vace_in_layout, vace_official, write_vace
from wan_core.checkpoint import inspect_checkpoint, read_state_dict
from wan_core.files import CheckpointError
from wan_core.loaders import load_dit
from wan_core.vace import WanVaceDiT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layout", VACE_LAYOUTS)
def test_every_layout_is_detected_as_vace_with_inferred_layers(tmp_path, layout):
    det = inspect_checkpoint(write_vace(tmp_path, layout))
    assert det.kind == "dit"
    assert det.config == TINY_VACE
    assert det.layout == {"official": "official", "comfy_prefixed": "comfy", "diffusers": "diffusers",
                          "scaled_fp8": "comfy"}[layout]
    assert "vace" in det.config.variant


@pytest.mark.parametrize("layout", ["official", "comfy_prefixed", "diffusers"])
def test_load_dit_returns_the_vace_model_with_the_official_values(tmp_path, layout):
    model = load_dit(write_vace(tmp_path, layout))
    assert isinstance(model, WanVaceDiT)
    expected = vace_official(TINY_VACE)
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k].float(), v), k


def test_scaled_fp8_file_keeps_fp8_blocks_and_dequantizes_to_the_file_values(tmp_path):
    path = write_vace(tmp_path, "scaled_fp8")
    model = load_dit(path)
    assert model.vace_blocks[1].after_proj.weight.dtype == torch.float8_e4m3fn
    assert model.vace_blocks[0].before_proj.weight.dtype == torch.float8_e4m3fn
    sd, _ = read_state_dict(path)
    ref = dequantize_reference({k[len("model.diffusion_model."):]: v
                                for k, v in vace_in_layout(vace_official(TINY_VACE), "scaled_fp8").items()})
    for k in ("vace_blocks.1.after_proj.weight", "vace_blocks.0.self_attn.q.weight", "blocks.3.ffn.0.weight"):
        assert torch.equal(sd[k], ref[k]), k


@torch.no_grad()
def test_loaded_diffusers_file_computes_like_the_official_one(tmp_path):
    a = load_dit(write_vace(tmp_path, "official"))
    b = load_dit(write_vace(tmp_path, "diffusers"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 96, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 3, TINY_VACE.text_dim, generator=g)
    t = torch.tensor([500.0])
    assert torch.equal(a(x, t, ctx, y=y), b(x, t, ctx, y=y))


def test_uneven_vace_block_count_is_refused_naming_the_file(tmp_path):
    cfg = dataclasses.replace(TINY_VACE, vace_layers=(0, 1, 2))      # 3 blocks over 4 layers
    sd = vace_official(cfg)
    path = save_safetensors(sd, tmp_path / "odd_vace.safetensors")
    with pytest.raises(CheckpointError, match="odd_vace.safetensors.*evenly"):
        inspect_checkpoint(path)


def test_vace_blocks_without_patch_embedding_are_refused(tmp_path):
    sd = {k: v for k, v in vace_official(TINY_VACE).items() if not k.startswith("vace_patch_embedding")}
    path = save_safetensors(sd, tmp_path / "broken_vace.safetensors")
    with pytest.raises(CheckpointError, match="broken_vace.safetensors"):
        inspect_checkpoint(path)


def test_gguf_vace_file_loads_with_quantized_vace_blocks(tmp_path):
    import re

    import gguf_factory

    sd = vace_official(TINY_VACE)
    tensors, orig = gguf_factory.dit_tensors(sd, {"*": "Q8_0"}, flat_patch=True)
    linear = re.compile(r"^vace_blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02]|before_proj|after_proj)\.weight$")
    for name, (a, _) in list(tensors.items()):
        if linear.match(name):
            tensors[name] = (a, "Q8_0")
    a, _ = tensors["vace_patch_embedding.weight"]      # GGUF holds <= 4 dims: stored flat, shape recorded
    orig["vace_patch_embedding.weight"] = tuple(a.shape)
    tensors["vace_patch_embedding.weight"] = (a.reshape(a.shape[0], -1), "F32")
    path = gguf_factory.write_gguf(tmp_path / "vace_q8.gguf", "wan", tensors, orig_shapes=orig)
    model = load_dit(path)
    assert isinstance(model, WanVaceDiT) and model.cfg == TINY_VACE
    assert type(model.vace_blocks[1].after_proj).__name__ == "QuantLinear"
    assert torch.equal(model.vace_patch_embedding.weight, sd["vace_patch_embedding.weight"])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 96, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 3, TINY_VACE.text_dim, generator=g)
    ref = WanVaceDiT(TINY_VACE).eval()
    ref.load_state_dict(sd)
    with torch.no_grad():
        err = (model(x, torch.tensor([500.0]), ctx, y=y) - ref(x, torch.tensor([500.0]), ctx, y=y)).abs().max()
    assert err < 0.05     # Q8_0 blocks + F16 rest of random weights: measured 0.019 (outputs ~|4|)
