"""Every published layout of every kind loads to the same internal tensors and config.

The files come from tests/factory.py, which writes each layout from the official one
independently of wan_core (diffusers layouts through diffusers' own converters). Lossless
layouts must give bit-identical tensors; fp8 and scaled fp8 the exact dequantised values.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import factory
import tiny
from wan_core.checkpoint import inspect_checkpoint, read_state_dict
from wan_core.configs import KNOWN_DIT, CLIPVisionConfig, T5Config, VAEConfig
from wan_core.files import CheckpointError
from wan_core.loaders import load_clip_vision, load_dit, load_text_encoder, load_vae

OUR_KIND = {"dit": "dit", "vae": "vae", "t5": "t5", "clip": "clip_vision"}
TINY = {"vae": tiny.TINY_VAE, "t5": tiny.TINY_T5, "clip": tiny.TINY_CLIP}
DIT_TINY = {"t2v": tiny.TINY_DIT_T2V, "i2v": tiny.TINY_DIT_I2V, "flf2v": tiny.TINY_DIT_FLF2V}
EXPECTED_LAYOUT = {"official": "official", "comfy_prefixed": "comfy", "diffusers": "diffusers",
                   "fp8_e4m3fn": "official", "fp8_e5m2": "official", "scaled_fp8": "official",
                   "hf": "hf", "hf_with_spiece": "hf", "hf_scaled_fp8": "hf"}
EXPECTED_QUANT = {"fp8_e4m3fn": "fp8_e4m3fn", "fp8_e5m2": "fp8_e5m2", "scaled_fp8": "scaled_fp8_e4m3fn",
                  "hf_scaled_fp8": "scaled_fp8_e4m3fn"}

CASES = [(k, lay, v) for k, lay in factory.LAYOUTS for v in (("t2v", "i2v", "flf2v") if k == "dit" else ("",))]


def _id(case: tuple[str, str, str]) -> str:
    return "-".join(p for p in case if p)


def _write(tmp_path: Path, kind: str, layout: str, variant: str, **opts) -> Path:
    if kind == "dit":
        opts["variant"] = variant
    return factory.write_checkpoint(tmp_path, kind, layout, **opts)


def _expected(kind: str, layout: str, variant: str) -> dict[str, torch.Tensor]:
    opts = {"variant": variant} if kind == "dit" else {}
    return factory.expected_official(kind, layout, **opts)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_layout_detected_and_tensors_identical(tmp_path: Path, case: tuple[str, str, str]) -> None:
    kind, layout, variant = case
    path = _write(tmp_path, kind, layout, variant)
    sd, det = read_state_dict(path, dtype=torch.float32)
    assert det.kind == OUR_KIND[kind]
    assert det.layout == EXPECTED_LAYOUT[layout]
    assert det.quant == EXPECTED_QUANT.get(layout, "none")
    assert det.config == (DIT_TINY[variant] if kind == "dit" else TINY[kind])
    expected = _expected(kind, layout, variant)
    assert set(sd) == set(expected)
    for name, ref in expected.items():
        assert sd[name].dtype == torch.float32
        assert torch.equal(sd[name], ref), f"{name} differs in {layout}"


def test_pth_and_safetensors_and_prefix_give_identical_tensors(tmp_path: Path) -> None:
    a, _ = read_state_dict(factory.write_checkpoint(tmp_path, "vae", "official"))
    b, _ = read_state_dict(factory.write_checkpoint(tmp_path, "vae", "official", ext=".safetensors"))
    c, det = read_state_dict(factory.write_checkpoint(tmp_path, "dit", "fp8_e4m3fn", variant="t2v", prefix=True))
    d, _ = read_state_dict(factory.write_checkpoint(tmp_path, "dit", "fp8_e4m3fn", variant="t2v",
                                                    name="bare.safetensors"))
    assert det.layout == "comfy"
    for x, y in ((a, b), (c, d)):
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_bf16_file_keeps_bf16_values_exactly(tmp_path: Path) -> None:
    path = factory.write_checkpoint(tmp_path, "dit", "official", variant="i2v", dtype=torch.bfloat16)
    model = load_dit(path)   # dtype=None keeps the file's dtype for Linears
    ref = factory.dit_official(tiny.TINY_DIT_I2V)
    for name, p in model.state_dict().items():
        assert torch.equal(p.float(), ref[name].to(torch.bfloat16).float()), name
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.head.modulation.dtype == torch.float32        # precision policy


# -- public loaders ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["official", "diffusers", "scaled_fp8", "fp8_e5m2"])
def test_load_dit_streams_every_layout(tmp_path: Path, layout: str, caplog) -> None:
    path = _write(tmp_path, "dit", layout, "i2v")
    with caplog.at_level(logging.INFO, logger="wan_core"):
        model = load_dit(path, dtype=torch.float32)
    expected = _expected("dit", layout, "i2v")
    state = model.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert not any(p.is_meta for p in model.parameters())
    line = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert len(line) == 1
    assert f"loaded {path.name}: custom-i2v(dim=256, layers=2, in=36) (dit, layout {EXPECTED_LAYOUT[layout]}" in line[0]
    assert "stored as float32" in line[0]
    assert model.checkpoint_report.layout == EXPECTED_LAYOUT[layout]


def test_fp8_dit_stays_fp8_by_default_and_bf16_on_request(tmp_path: Path) -> None:
    path = _write(tmp_path, "dit", "scaled_fp8", "t2v")
    expected = _expected("dit", "scaled_fp8", "t2v")["blocks.1.self_attn.q.weight"]
    model = load_dit(path)                        # "as in the file": no 2x RAM for a 14B fp8 file
    layer = model.blocks[1].self_attn.q
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.float() * layer.scale_weight, expected)
    assert model.blocks[1].modulation.dtype == torch.float32
    assert "scaled_fp8_e4m3fn" in model.checkpoint_report.line()
    with pytest.raises(ValueError, match="stores fp8 weights; reload it"):
        model.cast_storage(torch.bfloat16)        # would drop the scales
    model = load_dit(path, dtype=torch.bfloat16)  # dequantised on request
    q = model.blocks[1].self_attn.q.weight
    assert q.dtype == torch.bfloat16 and torch.equal(q, expected.to(torch.bfloat16))
    assert model.blocks[1].modulation.dtype == torch.float32


def test_load_vae_text_encoder_and_clip(tmp_path: Path) -> None:
    vae = load_vae(factory.write_checkpoint(tmp_path, "vae", "diffusers"))
    exp = factory.expected_official("vae", "diffusers")
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in exp.items())
    te = load_text_encoder(factory.write_checkpoint(tmp_path, "t5", "hf_scaled_fp8"), dtype=torch.float32)
    assert te.tokenizer.vocab_size <= tiny.TINY_T5.vocab
    out = te.encode(["a cat on a red sofa"])
    assert out[0].ndim == 2 and out[0].shape[1] == tiny.TINY_T5.dim and torch.isfinite(out[0]).all()
    clip = load_clip_vision(factory.write_checkpoint(tmp_path, "clip", "official"), dtype=torch.float32)
    exp = factory.expected_official("clip", "official")
    assert all(torch.equal(clip.state_dict()[k], v) for k, v in exp.items())


def test_official_umt5_without_tokenizer_says_where_to_put_spiece(tmp_path: Path) -> None:
    path = factory.write_checkpoint(tmp_path, "t5", "official")
    with pytest.raises(CheckpointError, match=r"without an embedded tokenizer .* 'spiece\.model'") as err:
        load_text_encoder(path)
    assert str(tmp_path / "spiece.model") in str(err.value)
    (tmp_path / "spiece.model").write_bytes(factory.TINY_SPIECE.read_bytes())
    te = load_text_encoder(path)
    assert te.tokenizer.vocab_size > 10


# -- errors a person can act on --------------------------------------------------------

LOADERS = {"dit": load_dit, "vae": load_vae, "t5": load_text_encoder, "clip_vision": load_clip_vision}
WHAT = {"dit": "a Wan 2.1 diffusion model", "vae": "a Wan 2.1 VAE", "t5": "a umT5-XXL text encoder",
        "clip_vision": "a CLIP ViT-H/14 vision encoder"}
FILES = {"dit": ("dit", "official"), "vae": ("vae", "official"), "t5": ("t5", "hf_with_spiece"),
         "clip_vision": ("clip", "hf")}


@pytest.mark.parametrize(("loader", "given"), [(a, b) for a in sorted(LOADERS) for b in sorted(FILES) if a != b])
def test_wrong_kind_is_refused_with_the_right_advice(tmp_path: Path, loader: str, given: str) -> None:
    path = factory.write_checkpoint(tmp_path, *FILES[given])
    with pytest.raises(CheckpointError) as err:
        LOADERS[loader](path)
    msg = str(err.value)
    assert msg.startswith(f"{path.name} is {WHAT[given]}")
    assert f"this loader needs {WHAT[loader]}" in msg


def test_unknown_layout_lists_first_keys(tmp_path: Path) -> None:
    path = tmp_path / "mystery.safetensors"
    save_file({"foo.weight": torch.ones(2), "bar.bias": torch.ones(1)}, str(path))
    with pytest.raises(CheckpointError, match=r"mystery\.safetensors: unknown checkpoint layout.*bar\.bias, foo\.weight"):
        load_dit(path)


def test_extra_unknown_key_in_a_dit_is_named(tmp_path: Path) -> None:
    sd = factory.dit_official(tiny.TINY_DIT_T2V)
    sd["blocks.0.self_attn.extra_proj.weight"] = torch.ones(3)
    path = factory.save_safetensors(sd, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: unknown keys .*blocks\.0\.self_attn\.extra_proj\.weight"):
        load_dit(path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    sd = factory.dit_official(tiny.TINY_DIT_T2V)
    del sd["blocks.1.ffn.2.bias"]
    path = factory.save_safetensors(sd, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: incomplete .* missing blocks\.1\.ffn\.2\.bias"):
        load_dit(path)


def test_truncated_dit_is_refused_before_loading(tmp_path: Path) -> None:
    path = factory.write_checkpoint(tmp_path, "dit", "official", variant="t2v")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="the file is truncated"):
        load_dit(path)


def test_lora_and_other_families_are_named(tmp_path: Path) -> None:
    lora = tmp_path / "style_lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(4, 8),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(8, 4)}, str(lora))
    with pytest.raises(CheckpointError, match=r"style_lora\.safetensors is a LoRA"):
        load_dit(lora)
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.ones(2)}, str(flux))
    with pytest.raises(CheckpointError, match="another family"):
        load_dit(flux)
    t5 = factory.t5_to_hf(factory.t5_official(tiny.TINY_T5))
    t5 = {k: v for k, v in t5.items() if "relative_attention_bias" not in k or ".block.0." in k}
    path = factory.save_safetensors(t5, tmp_path / "t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match="not umT5-XXL"):
        load_text_encoder(path)


# -- configs of the real models, inferred from shapes alone ---------------------------


def _sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16",
                        overrides: dict[str, str] | None = None) -> Path:
    """A full-size safetensors file whose data is a hole: the header is real, no disk used."""
    header, offset = {}, 0
    sizes = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1}
    for name, shape in shapes.items():
        dt = (overrides or {}).get(name, dtype)
        n = sizes[dt]
        for s in shape:
            n *= s
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return path


@pytest.mark.parametrize("name", sorted(KNOWN_DIT))
def test_full_size_dit_configs_inferred_from_shapes(tmp_path: Path, name: str) -> None:
    known = KNOWN_DIT[name]
    shapes = factory.official_shapes("dit", known)
    path = _sparse_safetensors(tmp_path / "some_renamed_file.safetensors",
                               {"model.diffusion_model." + k: v for k, v in shapes.items()})
    det = inspect_checkpoint(path)
    assert det.config == known and det.config.variant == name
    assert det.config.num_heads == known.dim // 128


def test_full_size_vae_t5_clip_configs_inferred_from_shapes(tmp_path: Path) -> None:
    vae = inspect_checkpoint(_sparse_safetensors(tmp_path / "a.safetensors", factory.official_shapes("vae", VAEConfig())))
    assert vae.config == VAEConfig() and vae.config.variant == "Wan2.1-VAE"
    t5_shapes = factory.official_shapes("t5", T5Config())
    t5 = inspect_checkpoint(_sparse_safetensors(tmp_path / "b.safetensors", t5_shapes))
    assert t5.config == T5Config() and t5.config.variant == "umT5-XXL"
    clip_shapes = factory.official_shapes("clip", CLIPVisionConfig(), with_textual=False)
    clip = inspect_checkpoint(_sparse_safetensors(tmp_path / "c.safetensors", clip_shapes))
    assert clip.config == CLIPVisionConfig() and clip.config.num_heads == 16 and clip.config.num_tokens == 257


def test_every_network_declares_its_checkpoint_report_and_the_loader_fills_it(tmp_path: Path) -> None:
    from wan_core.checkpoint import LoadReport, load_module
    from wan_core.clip_vision import CLIPVisionTower
    from wan_core.dit import WanDiT
    from wan_core.text_encoder import UMT5Encoder
    from wan_core.vace import WanVaceDiT
    from wan_core.vae import WanVAE

    from wan_core.vae22 import WanVAE22

    built = {WanDiT: tiny.TINY_DIT_T2V, WanVAE: tiny.TINY_VAE, UMT5Encoder: tiny.TINY_T5, CLIPVisionTower: tiny.TINY_CLIP}
    assert any("checkpoint_report" in vars(k).get("__annotations__", {}) for k in WanVAE22.__mro__)
    for cls, cfg in built.items():
        declared = any("checkpoint_report" in vars(k).get("__annotations__", {}) for k in cls.__mro__)
        assert declared, cls      # declared data (on the class or a base), not patched on
        with torch.device("meta"):
            assert cls(cfg).checkpoint_report is None
    assert issubclass(WanVaceDiT, WanDiT)
    vae = load_vae(factory.write_checkpoint(tmp_path, "vae", "official"))
    assert isinstance(vae.checkpoint_report, LoadReport) and vae.checkpoint_report.kind == "vae"

    class Undeclared(torch.nn.Module):      # a network outside the contract is refused before any read
        def __init__(self, cfg) -> None:
            super().__init__()

    with pytest.raises(TypeError, match="checkpoint_report"):
        load_module(factory.write_checkpoint(tmp_path, "vae", "diffusers"), "vae", Undeclared)
