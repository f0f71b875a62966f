"""fp8 weight storage: exact dequantisation, exact per-call upcast, measured error vs bf16.

Contract (docs/DEVELOPING.md): an fp8 CastLinear weight means ``weight.float()`` or, with a
``scale_weight``, ``weight.float() * scale_weight``. Only Linear weights outside the float32
policy are ever fp8; norms, biases, modulation, embeddings, patch embedding and head are not.
"""
from __future__ import annotations

import copy
from pathlib import Path

import factory
import pytest
import tiny
import torch

from wan_core import fp8
from wan_core.dit import keeps_fp32
from wan_core.layers import CastLinear, enable_fp8_matmul
from wan_core.loaders import load_dit

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _run(model, cfg):
    x, t, ctx, clip, y = tiny.dit_inputs(cfg)
    with torch.no_grad():
        return model(x, t, ctx, clip, y)


def _fp8_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, CastLinear) and m.weight.dtype in FP8}


def _dequantised_copy(model):
    """The same model with every fp8 weight replaced by its float32 dequantised value."""
    ref = copy.deepcopy(model)
    for m in _fp8_linears(ref).values():
        scale = m._parameters.pop("scale_weight", None)
        m.weight = torch.nn.Parameter(m.weight.float() * (scale if scale is not None else 1.0), requires_grad=False)
    return ref


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fp8")
    out = {layout: factory.write_checkpoint(tmp, "dit", layout, variant="i2v")
           for layout in ("official", "scaled_fp8", "fp8_e4m3fn", "fp8_e5m2")}
    out["bf16"] = factory.write_checkpoint(tmp, "dit", "official", variant="i2v", dtype=torch.bfloat16,
                                           name="dit_i2v_bf16.safetensors")
    return out


@pytest.mark.parametrize("layout", ["scaled_fp8", "fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_file_kept_as_fp8_dequantises_exactly_to_the_reference(files, layout: str) -> None:
    model = load_dit(files[layout], weight_dtype="keep")
    expected = factory.expected_official("dit_i2v", layout)     # factory.dequantize_reference values
    linears = _fp8_linears(model)
    assert linears, "no weight stayed fp8"
    for name, m in linears.items():
        scale = m._parameters.get("scale_weight")
        assert (scale is not None) == (layout == "scaled_fp8")
        real = m.weight.float() * scale if scale is not None else m.weight.float()
        assert torch.equal(real, expected[name + ".weight"]), name
    for name, p in model.named_parameters():
        if p.dtype in FP8:
            assert name.endswith(".weight") and name.rpartition(".")[0] in linears
            assert not keeps_fp32(name)
        elif keeps_fp32(name):
            assert p.dtype == torch.float32, name
    report = model.checkpoint_report.line()
    assert "float8_e" in report and ("scaled" in report) == (layout == "scaled_fp8")


def test_scaled_file_keeps_its_bytes_without_requantising(files) -> None:
    """weight_dtype equal to the file's format: the fp8 bytes and scales are the file's."""
    model = load_dit(files["scaled_fp8"], weight_dtype="fp8_e4m3fn")
    sd = factory.make_checkpoint("dit_i2v", "scaled_fp8")
    for name, m in _fp8_linears(model).items():
        if name.startswith("blocks."):
            assert torch.equal(m.weight.view(torch.uint8), sd[name + ".weight"].view(torch.uint8)), name
            assert torch.equal(m.scale_weight, sd[name + ".scale_weight"]), name


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e5m2"])
def test_bf16_file_quantised_at_load_matches_comfyui_scaled_rule(files, fmt: str) -> None:
    model = load_dit(files["bf16"], weight_dtype=fmt)
    dtype = getattr(torch, "float8_" + fmt[4:])
    bf16 = factory.make_checkpoint("dit_i2v", "official", dtype=torch.bfloat16)
    linears = _fp8_linears(model)
    # every CastLinear outside the fp32 policy: 12 per i2v block (self q,k,v,o; cross q,k,v,o,
    # k_img, v_img; ffn 0, 2) + text_embedding 2 + img_emb MLP 2
    assert len(linears) == 12 * tiny.TINY_DIT_I2V.num_layers + 4
    scaled = factory.to_scaled_fp8({k: v for k, v in bf16.items() if k.startswith("blocks.")}, dtype)
    for name, m in linears.items():
        assert m.weight.dtype == dtype and m.scale_weight.dtype == torch.float32 and m.scale_weight.dim() == 0
        if name + ".weight" in scaled:    # same bits as ComfyUI's own scaled fp8 of that tensor
            assert torch.equal(m.weight.view(torch.uint8), scaled[name + ".weight"].view(torch.uint8)), name
            assert torch.equal(m.scale_weight, scaled[name + ".scale_weight"]), name
    assert model.blocks[0].self_attn.q.bias.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.time_projection[1].weight.dtype == torch.float32
    assert model.patch_embedding.weight.dtype == torch.float32


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source", ["scaled_fp8", "fp8_e4m3fn", "fp8_e5m2", "bf16->e4m3fn", "bf16->e5m2"])
def test_fp8_model_output_equals_dequantised_model_bit_for_bit(files, source: str, compute) -> None:
    if "->" in source:
        model = load_dit(files["bf16"], weight_dtype="fp8_" + source.split("->")[1])
    else:
        model = load_dit(files[source], weight_dtype="keep")
    ref = _dequantised_copy(model)
    assert not _fp8_linears(ref)
    model.compute_dtype = ref.compute_dtype = compute
    cfg = model.cfg
    assert torch.equal(_run(model, cfg), _run(ref, cfg))


# Output error vs the bf16-stored model (float32 compute, tiny i2v DiT, these inputs):
# relative L2 error ||out - ref|| / ||ref||, measured on this machine (torch 2.13 CPU):
#   bf16 storage vs float32 storage                        0.0019  (for scale)
#   scaled e4m3fn, ComfyUI file (block Linears fp8)         0.0256
#   bf16 -> e4m3fn at load (also text / image MLPs fp8)     0.0328
#   plain e4m3fn, Kijai file (block + text Linears fp8)     0.0237
#   bf16 -> e5m2 at load                                    0.0534
#   plain e5m2, Kijai file                                  0.0454
# At the tiny width (fan_in 256, |w| ~ 0.06) plain e4m3fn weights are normal numbers, so the
# scale buys nothing here; see test_scaling_pays_off_at_real_widths for the real widths.
MEASURED = {"scaled_fp8": 0.0256, "bf16->e4m3fn": 0.0328, "fp8_e4m3fn": 0.0237, "bf16->e5m2": 0.0534,
            "fp8_e5m2": 0.0454}


def test_fp8_error_vs_bf16_is_bounded_as_measured(files) -> None:
    cfg = tiny.TINY_DIT_I2V
    ref = load_dit(files["official"], dtype=torch.bfloat16, compute_dtype=torch.float32)
    ref_out = _run(ref, cfg)
    fp32_out = _run(load_dit(files["official"], dtype=torch.float32), cfg)
    errs = {"bf16": float((fp32_out - ref_out).norm() / ref_out.norm())}
    for source in MEASURED:
        if "->" in source:
            model = load_dit(files["bf16"], weight_dtype="fp8_" + source.split("->")[1], compute_dtype=torch.float32)
        else:
            model = load_dit(files[source], weight_dtype="keep", compute_dtype=torch.float32)
        out = _run(model, cfg)
        errs[source] = float((out - ref_out).norm() / ref_out.norm())
    print({k: round(v, 4) for k, v in errs.items()})
    for source, measured in MEASURED.items():
        assert errs[source] <= 1.25 * measured, (source, errs[source])
        assert errs[source] > 5 * errs["bf16"], source          # fp8 really is in use
    assert errs["bf16->e4m3fn"] < errs["bf16->e5m2"]            # 3 mantissa bits beat 2
    assert errs["fp8_e4m3fn"] < errs["fp8_e5m2"]


# Relative L2 error of one weight randn(256, fan_in)/sqrt(fan_in) (Wan's init scale), seed 0:
#   fan_in        plain e4m3fn   scaled e4m3fn   plain e5m2   scaled e5m2
#   256           0.0268         0.0265          0.0530       0.0525
#   5120 (14B d)  0.0418         0.0264          0.0528       0.0527
#   13824 (ffn)   0.0663         0.0265          0.0529       0.0526
def test_scaling_pays_off_at_real_widths() -> None:
    g = torch.Generator().manual_seed(0)
    for fan_in, plain_err in ((5120, 0.0418), (13824, 0.0663)):
        w = torch.randn(256, fan_in, generator=g) / fan_in ** 0.5
        err = {}
        for scaled in (False, True):
            q, s = fp8.quantize(w, torch.float8_e4m3fn, scaled=scaled)
            err[scaled] = float((fp8.dequantize(q, s, torch.float32) - w).norm() / w.norm())
        assert err[True] <= 0.0265 * 1.05 and err[False] >= 0.95 * plain_err and err[True] < 0.7 * err[False]


def test_quantize_and_dequantize_round_trip_and_zero_tensor() -> None:
    w = torch.randn(64, 32) * 0.02
    q, s = fp8.quantize(w, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.dim() == 0
    assert float(q.float().abs().max()) == 448.0                 # the range is used fully
    back = fp8.dequantize(q, s, torch.float32)
    assert torch.equal(back, q.float() * s)
    assert float((back - w).abs().max()) <= float(w.abs().max()) * 2 ** -4
    assert torch.equal(w, w.clone())                             # input untouched (in-place ops on a copy)
    zq, zs = fp8.quantize(torch.zeros(4, 4), torch.float8_e5m2)
    assert float(zs) == 1.0 and not zq.float().any()


def test_fp8_matmul_is_refused_off_cuda_and_on_old_gpus(files, monkeypatch) -> None:
    ok, reason = fp8.fp8_matmul_supported("cpu")
    assert not ok and "CUDA" in reason
    model = load_dit(files["scaled_fp8"], weight_dtype="keep")
    with pytest.raises(RuntimeError, match="fp8 matmul"):
        enable_fp8_matmul(model, "cpu")
    assert not any(m.fp8_matmul for m in _fp8_linears(model).values())   # never the default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    ok, reason = fp8.fp8_matmul_supported("cuda:0")
    assert not ok and "8.6" in reason and "RTX 3090" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert fp8.fp8_matmul_supported("cuda:0")[0]


def test_weight_dtype_none_follows_dtype(files) -> None:
    a = load_dit(files["scaled_fp8"])                        # dtype None: as in the file, fp8 kept
    assert _fp8_linears(a) and a.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    b = load_dit(files["scaled_fp8"], dtype=torch.bfloat16)  # an explicit dtype dequantises
    assert not _fp8_linears(b) and b.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="weight_dtype"):
        load_dit(files["scaled_fp8"], weight_dtype="int4")


def test_text_encoder_scaled_fp8_kept_as_fp8_encodes_like_the_dequantised_one(tmp_path) -> None:
    from wan_core.loaders import load_text_encoder

    path = factory.write_checkpoint(tmp_path, "t5", "hf_scaled_fp8")
    ref = load_text_encoder(path, dtype=torch.float32)
    te = load_text_encoder(path, weight_dtype="keep")
    assert _fp8_linears(te.model) and not _fp8_linears(ref.model)
    te.model.compute_dtype = torch.float32
    assert torch.equal(te.encode(["a cat on a boat"])[0], ref.encode(["a cat on a boat"])[0])
