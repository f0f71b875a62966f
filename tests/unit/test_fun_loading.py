"""Wan2.1-Fun DiT files load by their tensors in every published layout: VideoX-Fun's own
(official names), Comfy-Org repackaged (``model.diffusion_model.``, also fp8 / scaled fp8),
diffusers-named and GGUF. Fun Control (in_dim 48, img_emb) -> ``fun="control"``; V1.1 adds
``ref_conv`` (-> ``ref_in_dim=16``); Fun InP has the I2V shapes; Fun Camera is refused clearly.
Names and shapes from VideoX-Fun ``videox_fun/models/wan_transformer3d.py`` (``ref_conv`` =
Conv2d(16, dim, 2x2, stride 2x2); ``control_adapter`` = the camera ``SimpleAdapter``)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import factory
import tiny
from wan_core.checkpoint import inspect_checkpoint, read_state_dict
from wan_core.configs import KNOWN_DIT
from wan_core.files import CheckpointError
from wan_core.loaders import load_dit

pytestmark = pytest.mark.usefixtures("one_thread")

CONTROL, CONTROL_REF = tiny.TINY_DIT_FUN_CONTROL, tiny.TINY_DIT_FUN_CONTROL_REF
LAYOUTS = {"official": "official", "comfy_prefixed": "comfy", "diffusers": "diffusers",
           "fp8_e4m3fn": "official", "scaled_fp8": "official"}


@pytest.mark.parametrize("cfg", [CONTROL, CONTROL_REF], ids=["v1.0", "v1.1"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_is_detected_as_fun_control(tmp_path, cfg, layout):
    prefix = {"prefix": True} if layout in ("fp8_e4m3fn", "scaled_fp8") else {}   # Comfy-Org repackaged fp8
    det = inspect_checkpoint(factory.write_checkpoint(tmp_path, "dit", layout, cfg=cfg, **prefix))
    assert det.kind == "dit" and det.config == cfg
    assert det.config.fun == "control" and det.config.ref_in_dim == cfg.ref_in_dim
    assert det.layout == ("comfy" if prefix else LAYOUTS[layout])
    assert "fun-control" in det.config.variant


@pytest.mark.parametrize("layout", ["official", "comfy_prefixed", "diffusers"])
def test_load_dit_holds_exactly_the_file_values_including_ref_conv(tmp_path, layout):
    model = load_dit(factory.write_checkpoint(tmp_path, "dit", layout, cfg=CONTROL_REF))
    expected = factory.expected_official("dit", layout, cfg=CONTROL_REF)
    got = model.state_dict()
    assert set(got) == set(expected) and "ref_conv.weight" in got
    for k, v in expected.items():
        assert torch.equal(got[k].float(), v), k
    assert model.ref_conv.weight.shape == (CONTROL_REF.dim, 16, 2, 2)


def test_scaled_fp8_file_keeps_ref_conv_float32_and_blocks_fp8(tmp_path):
    model = load_dit(factory.write_checkpoint(tmp_path, "dit", "scaled_fp8", cfg=CONTROL_REF, prefix=True))
    assert model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    assert model.ref_conv.weight.dtype == torch.float32       # in the DiT's float32 policy, like patch_embedding


def test_gguf_fun_control_file_loads_with_quantized_blocks(tmp_path):
    import gguf_factory

    sd = factory.dit_official(CONTROL_REF)
    tensors, orig = gguf_factory.dit_tensors(sd, {"*": "Q8_0"}, flat_patch=True)
    path = gguf_factory.write_gguf(tmp_path / "fun_control_q8.gguf", "wan", tensors, orig_shapes=orig)
    det = inspect_checkpoint(path)
    assert det.config == CONTROL_REF and "Q8_0" in det.quant
    model = load_dit(path)
    assert type(model.blocks[0].ffn[0]).__name__ == "QuantLinear"
    # the 4-D conv is stored unquantized (F16 by the ComfyUI-GGUF rule): within its rounding of the file values
    torch.testing.assert_close(model.ref_conv.weight.float(), sd["ref_conv.weight"], atol=2e-3, rtol=0)
    x, t, ctx, clip, y = tiny.dit_inputs(CONTROL_REF)
    out = model(x, t, ctx, clip, y, full_ref=torch.randn(1, 16, 4, 4))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["Fun-InP-1.3B", "Fun-Control-1.3B", "Fun-Control-14B"])
def test_full_size_fun_configs_are_named(name):
    cfg = KNOWN_DIT[name]
    assert cfg.variant == name
    assert dataclasses.replace(cfg, ref_in_dim=16).variant == name.replace("Fun-", "Fun-V1.1-")
    assert cfg.has_image_input and cfg.needs_image == (name == "Fun-InP-1.3B")


def test_fun_camera_file_is_refused_naming_the_file_and_what_works(tmp_path):
    cfg = dataclasses.replace(CONTROL, in_dim=32)       # Control-Camera: noise + start latents, control_adapter
    sd = factory.dit_official(cfg)
    sd["control_adapter.conv.weight"] = torch.randn(cfg.dim, 24 * 64, 2, 2)
    sd["control_adapter.conv.bias"] = torch.randn(cfg.dim)
    path = factory.save_safetensors(sd, tmp_path / "fun_camera.safetensors")
    with pytest.raises(CheckpointError, match="fun_camera.safetensors.*Control-Camera.*not supported"):
        inspect_checkpoint(path)


def test_malformed_ref_conv_is_refused(tmp_path):
    sd = factory.dit_official(CONTROL_REF)
    sd["ref_conv.weight"] = torch.randn(CONTROL_REF.dim, 16, 3, 3)
    path = factory.save_safetensors(sd, tmp_path / "bad_ref.safetensors")
    with pytest.raises(CheckpointError, match="bad_ref.safetensors.*ref_conv"):
        inspect_checkpoint(path)
    sd = factory.dit_official(tiny.TINY_DIT_I2V)        # ref_conv on an in_dim-36 model: not a Fun Control
    sd["ref_conv.weight"], sd["ref_conv.bias"] = torch.randn(256, 16, 2, 2), torch.randn(256)
    with pytest.raises(CheckpointError, match="only Fun Control"):
        inspect_checkpoint(factory.save_safetensors(sd, tmp_path / "i2v_ref.safetensors"))


def test_fun_inp_loads_as_the_i2v_model_it_is(tmp_path):
    det = inspect_checkpoint(factory.write_checkpoint(tmp_path, "dit", "official", variant="i2v"))
    assert det.config == tiny.TINY_DIT_I2V and det.config.fun == "" and det.config.needs_image


def test_read_state_dict_of_a_fun_file_has_official_names(tmp_path):
    sd, det = read_state_dict(factory.write_checkpoint(tmp_path, "dit", "comfy_prefixed", cfg=CONTROL_REF))
    assert "ref_conv.bias" in sd and "img_emb.proj.1.weight" in sd and det.config.fun == "control"
