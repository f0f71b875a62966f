"""LoRA files (every common key layout) applied to the tiny DiT, merged and unmerged.

A LoRA is built here from random low-rank factors (A [r, in], B [out, r], alpha != rank) on
five Linears of different kinds, plus the full deltas distillation LoRAs carry (norm weight
``.diff``, bias ``.diff_b``, modulation ``blocks.N.diff_m``). Merged into a float32 model it
must give exactly ``W + strength * alpha / r * (B @ A)`` in every layout; the diffusers
names are written by hand here (not derived from wan_core), so a wrong mapping fails.

Measured (tiny t2v, latent [1, 16, 2, 4, 4], float32): merged vs unmerged output max abs
difference 7.2e-7 on outputs up to 2.1 that the LoRAs move by 0.65 (the two differ only in
float32 rounding: W + s*BA vs Wx + s*B(Ax));
fp8 merge (round to nearest) equals quantising the exact merged weight directly; relative
rms error vs the exact float32 merge 2.6-2.7 % (e4m3fn, scaled or not) and 5.2-5.3 % (e5m2),
the same as the base weight's own quantisation error. Stochastic rounding: mean over 200
seeds within 1e-4 of the input (values ~N(0, 3)), while round-to-nearest errs by 0.054.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tiny
from wan_core.dit import WanDiT
from wan_core.layers import CastLinear
from wan_core.lora import LoraError, LoraSpec, applied_loras, apply_loras

RANK, ALPHA = 4, 2.0
MERGED_VS_UNMERGED_ATOL = 1e-5   # measured 7.2e-7 max abs (module docstring)

# official module path -> diffusers module path (written from diffusers' WanTransformer3DModel)
TARGETS = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj",
    "blocks.0.cross_attn.o": "blocks.0.attn2.to_out.0",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}


def tiny_dit(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(tiny.TINY_DIT_T2V).eval().requires_grad_(False)
    with torch.no_grad():  # non-zero biases/norms so bias and norm deltas are visible
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = tiny.TINY_DIT_T2V
    return {"x": torch.randn(1, 16, 2, 4, 4, generator=g), "t": torch.tensor([700.0]),
            "context": torch.randn(1, 5, cfg.text_dim, generator=g)}


def factors(model: nn.Module, seed: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in TARGETS:
        w = model.get_submodule(path).weight
        out[path] = (0.1 * torch.randn(RANK, w.shape[1], generator=g), 0.1 * torch.randn(w.shape[0], RANK, generator=g))
    return out


def lora_keys(f: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str, alpha: bool = True) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for path, (a, b) in f.items():
        if layout == "official":
            base, down, up = path, "lora_down.weight", "lora_up.weight"
        elif layout in ("comfy", "comfy_model"):
            base = ("diffusion_model." if layout == "comfy" else "model.diffusion_model.") + path
            down, up = "lora_A.weight", "lora_B.weight"
        elif layout == "diffusers":
            base, down, up = "transformer." + TARGETS[path], "lora_A.weight", "lora_B.weight"
        elif layout in ("kohya", "kohya_fun"):  # musubi-tuner / ComfyUI; Wan-Fun writes "lora_unet__"
            prefix = "lora_unet_" if layout == "kohya" else "lora_unet__"
            base, down, up = prefix + path.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        else:
            raise AssertionError(layout)
        sd[f"{base}.{down}"], sd[f"{base}.{up}"] = a.clone(), b.clone()
        if alpha and layout != "diffusers":
            sd[f"{base}.alpha"] = torch.tensor(ALPHA)
    return sd


def write(tmp_path: Path, name: str, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---- every layout gives exactly W + scale * B @ A -----------------------------------------

@pytest.mark.parametrize("layout", ["official", "comfy", "comfy_model", "diffusers", "kohya", "kohya_fun"])
def test_each_layout_merges_exactly_w_plus_scaled_b_at_a(tmp_path, layout):
    model = tiny_dit()
    before = params(model)
    f = factors(model)
    meta = {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})} if layout == "diffusers" else None
    path = write(tmp_path, layout, lora_keys(f, layout), meta)
    strength = 0.7
    report = apply_loras(model, [LoraSpec(path, strength)], mode="merge")
    scale = strength * ALPHA / RANK
    after = params(model)
    for p, (a, b) in f.items():
        assert torch.equal(after[p + ".weight"], before[p + ".weight"] + scale * (b @ a)), p
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {p + ".weight" for p in TARGETS}
    assert report.matched == tuple(sorted(p + ".weight" for p in TARGETS))
    assert report.unmatched == ()
    assert report.files[0].layout == {"comfy_model": "comfy", "kohya_fun": "kohya"}.get(layout, layout)
    assert report.files[0].rank == RANK


def test_missing_alpha_means_scale_equals_strength(tmp_path):
    model = tiny_dit()
    before = params(model)
    f = factors(model)
    apply_loras(model, [LoraSpec(write(tmp_path, "noalpha", lora_keys(f, "official", alpha=False)), 0.5)])
    a, b = f["blocks.0.self_attn.q"]
    assert torch.equal(model.blocks[0].self_attn.q.weight, before["blocks.0.self_attn.q.weight"] + 0.5 * (b @ a))


def test_full_deltas_diff_diff_b_and_diff_m_are_added_with_strength(tmp_path):
    model = tiny_dit()
    before = params(model)
    g = torch.Generator().manual_seed(5)
    sd = {"diffusion_model.blocks.0.norm3.diff": torch.randn(256, generator=g),
          "diffusion_model.blocks.0.norm3.diff_b": torch.randn(256, generator=g),
          "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(256, generator=g),
          "diffusion_model.blocks.1.diff_m": torch.randn(1, 6, 256, generator=g),
          "diffusion_model.blocks.1.cross_attn.norm_k.diff": torch.randn(256, generator=g)}
    apply_loras(model, [LoraSpec(write(tmp_path, "diffs", sd), 0.8)])
    after = params(model)
    for key, target in (("blocks.0.norm3.diff", "blocks.0.norm3.weight"), ("blocks.0.norm3.diff_b", "blocks.0.norm3.bias"),
                        ("blocks.0.self_attn.q.diff_b", "blocks.0.self_attn.q.bias"),
                        ("blocks.1.diff_m", "blocks.1.modulation"),
                        ("blocks.1.cross_attn.norm_k.diff", "blocks.1.cross_attn.norm_k.weight")):
        assert torch.equal(after[target], before[target] + 0.8 * sd["diffusion_model." + key]), key


# ---- unmatched keys, strength 0 -----------------------------------------------------------

def test_unmatched_keys_are_reported_by_name_and_logged(tmp_path, caplog):
    model = tiny_dit()
    sd = lora_keys(factors(model), "comfy")
    g = torch.Generator().manual_seed(3)
    extra = {"diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": torch.randn(RANK, 256, generator=g),  # i2v only
             "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight": torch.randn(256, RANK, generator=g),
             "diffusion_model.blocks.9.self_attn.q.lora_A.weight": torch.randn(RANK, 256, generator=g),  # no block 9
             "diffusion_model.blocks.9.self_attn.q.lora_B.weight": torch.randn(256, RANK, generator=g),
             "diffusion_model.blocks.9.self_attn.k.lora_A.weight": torch.randn(RANK, 256, generator=g),  # no lora_B
             "diffusion_model.blocks.0.self_attn.k.alpha": torch.tensor(ALPHA),  # alpha of no pair
             "lora_te_text_model_encoder_layers_0_mlp_fc1.weird": torch.randn(3, generator=g)}
    path = write(tmp_path, "extra", {**sd, **extra})
    with caplog.at_level(logging.WARNING, logger="wan_core"):
        report = apply_loras(model, [LoraSpec(path, 1.0)])
    assert set(report.unmatched) == {f"extra.safetensors: {k}" for k in extra}
    assert len(report.matched) == len(TARGETS)
    assert "k_img" in caplog.text and "blocks.9" in caplog.text
    with pytest.raises(LoraError, match="match nothing"):
        apply_loras(tiny_dit(), [LoraSpec(path, 1.0)], strict=True)


def test_a_file_matching_nothing_or_of_another_size_is_refused(tmp_path):
    model = tiny_dit()
    g = torch.Generator().manual_seed(4)
    other = write(tmp_path, "flux", {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 8, generator=g),
                                     "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(8, 4, generator=g)})
    with pytest.raises(LoraError, match="matches nothing"):
        apply_loras(model, [LoraSpec(other, 1.0)])
    bigger = write(tmp_path, "big", {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 512, generator=g),
                                     "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(512, 4, generator=g)})
    with pytest.raises(LoraError, match="another model size"):
        apply_loras(model, [LoraSpec(bigger, 1.0)])
    dora = write(tmp_path, "dora", {**lora_keys(factors(model), "comfy"),
                                    "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(256, 1)})
    with pytest.raises(LoraError, match="DoRA"):
        apply_loras(model, [LoraSpec(dora, 1.0)])


@pytest.mark.parametrize("mode", ["merge", "unmerged"])
def test_strength_zero_is_a_bit_identical_no_op(tmp_path, mode):
    model = tiny_dit()
    x = inputs()
    ref, before = model(**x), params(model)
    path = write(tmp_path, "z", {**lora_keys(factors(model), "official"),
                                 "blocks.0.norm3.diff": torch.ones(256)})
    report = apply_loras(model, [LoraSpec(path, 0.0)], mode=mode)
    assert report.matched == ()
    assert torch.equal(model(**x), ref)
    assert all(torch.equal(v, before[k]) for k, v in params(model).items())


# ---- merged vs unmerged, removal, chaining ------------------------------------------------

def full_lora(tmp_path: Path, model: nn.Module, name: str, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed + 100)
    sd = {**lora_keys(factors(model, seed), "comfy"),
          "diffusion_model.blocks.0.norm3.diff": 0.1 * torch.randn(256, generator=g),
          "diffusion_model.blocks.1.diff_m": 0.1 * torch.randn(1, 6, 256, generator=g),
          "diffusion_model.blocks.0.cross_attn.o.diff_b": 0.1 * torch.randn(256, generator=g),
          "diffusion_model.blocks.1.self_attn.v.diff": 0.01 * torch.randn(256, 256, generator=g),
          "diffusion_model.patch_embedding.diff": 0.01 * torch.randn(256, 16, 1, 2, 2, generator=g),
          "diffusion_model.head.head.diff_b": 0.01 * torch.randn(64, generator=g)}
    return write(tmp_path, name, sd)


def test_merged_and_unmerged_agree_and_removal_restores_bit_identical(tmp_path):
    x = inputs()
    merged, hooked = tiny_dit(), tiny_dit()
    ref, before = hooked(**x), params(hooked)
    specs = [LoraSpec(full_lora(tmp_path, merged, "one", 2), 0.9), LoraSpec(full_lora(tmp_path, merged, "two", 3), -0.6)]
    apply_loras(merged, specs, mode="merge")
    out_merged = merged(**x)
    report = apply_loras(hooked, specs, mode="unmerged")
    out_hooked = hooked(**x)
    assert (out_merged - ref).abs().max() > 1e-2          # the LoRAs do change the output
    assert torch.allclose(out_hooked, out_merged, rtol=0, atol=MERGED_VS_UNMERGED_ATOL)
    hooked_weight = hooked.blocks[0].self_attn.q.weight
    assert torch.equal(hooked_weight, before["blocks.0.self_attn.q.weight"])  # Linear weights untouched
    report.remove()
    report.remove()  # idempotent
    assert torch.equal(hooked(**x), ref)
    assert all(torch.equal(v, before[k]) for k, v in params(hooked).items())
    with applied_loras(hooked, specs):
        assert torch.allclose(hooked(**x), out_merged, rtol=0, atol=MERGED_VS_UNMERGED_ATOL)
    assert torch.equal(hooked(**x), ref)


def test_chained_loras_add_their_deltas_in_order(tmp_path):
    model = tiny_dit()
    before = params(model)
    f1, f2 = factors(model, 2), factors(model, 3)
    p1 = write(tmp_path, "a", lora_keys(f1, "official"))
    p2 = write(tmp_path, "b", lora_keys(f2, "kohya"))
    report = apply_loras(model, [LoraSpec(p1, 1.0), LoraSpec(p2, 0.25)])
    s1, s2 = ALPHA / RANK, 0.25 * ALPHA / RANK
    for p in TARGETS:
        (a1, b1), (a2, b2) = f1[p], f2[p]
        want = before[p + ".weight"] + s1 * (b1 @ a1) + s2 * (b2 @ a2)
        assert torch.equal(model.get_submodule(p).weight, want), p
    assert [f.path.name for f in report.files] == ["a.safetensors", "b.safetensors"]
    with pytest.raises(RuntimeError, match="reload"):
        report.remove()


# ---- fp8 storage ---------------------------------------------------------------------------

class Fp8Holder(nn.Module):
    """One CastLinear stored per the fp8 contract (weight fp8, optional scale_weight)."""

    def __init__(self, w: torch.Tensor, fmt: torch.dtype, scaled: bool) -> None:
        super().__init__()
        self.lin = CastLinear(w.shape[1], w.shape[0])
        fmax = torch.finfo(fmt).max
        s = w.abs().max() / fmax if scaled else torch.tensor(1.0)
        self.lin.weight = nn.Parameter((w / s).to(fmt), requires_grad=False)
        if scaled:
            self.lin.scale_weight = nn.Parameter(s.float(), requires_grad=False)

    def real(self) -> torch.Tensor:
        w = self.lin.weight.float()
        return w * self.lin.scale_weight if hasattr(self.lin, "scale_weight") else w


@pytest.mark.parametrize("fmt,scaled", [(torch.float8_e4m3fn, True), (torch.float8_e4m3fn, False),
                                        (torch.float8_e5m2, False)])
def test_fp8_weights_are_merged_in_float32_and_requantised(tmp_path, fmt, scaled):
    g = torch.Generator().manual_seed(7)
    w = 0.05 * torch.randn(96, 64, generator=g)
    model = Fp8Holder(w, fmt, scaled)
    base = model.real()
    a, b = 0.3 * torch.randn(RANK, 64, generator=g), 0.3 * torch.randn(96, RANK, generator=g)
    path = write(tmp_path, "fp8", {"diffusion_model.lin.lora_down.weight": a, "diffusion_model.lin.lora_up.weight": b,
                                   "diffusion_model.lin.alpha": torch.tensor(ALPHA)})
    exact = base + ALPHA / RANK * (b @ a)
    apply_loras(model, [LoraSpec(path, 1.0)], fp8_rounding="nearest")
    assert model.lin.weight.dtype == fmt
    merged = model.real()
    fmax = torch.finfo(fmt).max
    if scaled:
        assert torch.equal(model.lin.scale_weight, exact.abs().max() / fmax)
        direct = (exact / (exact.abs().max() / fmax)).to(fmt).float() * (exact.abs().max() / fmax)
    else:
        direct = exact.to(fmt).float()
    # merging adds no error beyond one rounding of the exact merged weight to the fp8 format
    assert torch.equal(merged, direct)
    rel = ((merged - exact).norm() / exact.norm()).item()
    assert rel < (0.04 if fmt == torch.float8_e4m3fn else 0.08)  # measured: e4m3 2.6-2.9 %, e5m2 5.2 %


def test_fp8_unmerged_adds_the_lora_at_call_time_without_touching_weights(tmp_path):
    g = torch.Generator().manual_seed(8)
    model = Fp8Holder(0.05 * torch.randn(96, 64, generator=g), torch.float8_e4m3fn, True)
    w0, s0 = model.lin.weight.clone(), model.lin.scale_weight.clone()
    a, b = torch.randn(RANK, 64, generator=g), torch.randn(96, RANK, generator=g)
    path = write(tmp_path, "fp8u", {"lin.lora_A.weight": a, "lin.lora_B.weight": b})
    x = torch.randn(3, 64, generator=g)
    plain = model.lin(x)
    with applied_loras(model, [LoraSpec(path, 0.5)]):
        out = model.lin(x)
    assert torch.allclose(out - plain, 0.5 * (x @ a.T) @ b.T, atol=1e-5)
    assert torch.equal(model.lin.weight.view(torch.uint8), w0.view(torch.uint8))
    assert torch.equal(model.lin.scale_weight, s0)
    assert torch.equal(model.lin(x), plain)


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_stochastic_fp8_rounding_is_unbiased_and_repeatable(tmp_path, fmt):
    from wan_core.fp8 import quantize

    def to_fp8(x: torch.Tensor, seed: int | None) -> torch.Tensor:
        return quantize(x, fmt, scaled=False, stochastic_seed=seed)[0]

    x = 3 * torch.randn(4000, generator=torch.Generator().manual_seed(9))
    mean = sum(to_fp8(x, s).float() for s in range(200)) / 200
    nearest = to_fp8(x, None).float()
    assert (mean - x).mean().abs() < 1e-3 and (mean - x).abs().mean() < 0.2 * (nearest - x).abs().mean()
    assert torch.equal(to_fp8(x, 5).view(torch.uint8), to_fp8(x, 5).view(torch.uint8))
    g = torch.Generator().manual_seed(10)
    model = Fp8Holder(0.05 * torch.randn(32, 16, generator=g), fmt, True)
    path = write(tmp_path, "st", {"lin.lora_A.weight": torch.randn(2, 16, generator=g),
                                  "lin.lora_B.weight": 0.01 * torch.randn(32, 2, generator=g)})
    apply_loras(model, [LoraSpec(path, 1.0)], fp8_rounding="stochastic")
    assert model.lin.weight.dtype == fmt and torch.isfinite(model.real()).all()
