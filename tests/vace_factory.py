"""Tiny random-weight Wan 2.1 VACE DiT checkpoints in the published layouts.

Names and shapes written from the official ``wan/modules/vace_model.py`` (Wan-Video/Wan2.1):
``VaceWanModel`` = the T2V ``WanModel`` + ``vace_patch_embedding`` (Conv3d vace_in_dim -> dim,
kernel = stride = patch) + ``vace_blocks.N`` (a ``WanAttentionBlock`` with ``after_proj``
Linear(dim, dim), and ``before_proj`` Linear(dim, dim) on block 0). The official init zeroes
before/after_proj; here they are random like every other weight, so a test notices them.

Layouts: "official" (bare names), "comfy_prefixed" (``model.diffusion_model.``), "diffusers"
(``WanVACETransformer3DModel`` names via diffusers' own single-file converter, which maps
before_proj -> proj_in and after_proj -> proj_out), "scaled_fp8" (ComfyUI scaled fp8 with the
prefix: every block Linear weight of ``blocks.N`` and ``vace_blocks.N``, before/after_proj
included, as e4m3fn with a ``scale_weight``; the rest bf16). Options as :mod:`factory`: ``cfg``,
``seed``, ``dtype``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from factory import (BIAS, FAN, _dit_spec, _fp8, _linear, _materialize, dit_to_diffusers, is_scaled_linear,
                     save_safetensors, to_scaled_fp8, with_prefix)
from wan_core.configs import DiTConfig

import tiny

# 4 base blocks, hints after layers 0 and 2 (= range(0, 4, 4 // 2), the published rule)
TINY_VACE = dataclasses.replace(tiny.TINY_DIT_T2V, num_layers=4, vace_layers=(0, 2), vace_in_dim=96)

VACE_LAYOUTS = ("official", "comfy_prefixed", "diffusers", "scaled_fp8")


def _vace_spec(cfg: DiTConfig) -> list:
    d, n = cfg.dim, len(cfg.vace_layers)
    spec = list(_dit_spec(dataclasses.replace(cfg, vace_layers=())))
    spec += [("vace_patch_embedding.weight", (d, cfg.vace_in_dim, *cfg.patch_size), FAN),
             ("vace_patch_embedding.bias", (d,), BIAS)]
    # a vace block is a base block: take the block entries of an n-block DiT and rename them
    blocks = _dit_spec(dataclasses.replace(cfg, num_layers=n, vace_layers=()))
    for j in range(n):
        p = f"blocks.{j}."
        spec += [("vace_" + name, shape, init) for name, shape, init in blocks if name.startswith(p)]
        if j == 0:
            spec += _linear("vace_blocks.0.before_proj", d, d)
        spec += _linear(f"vace_blocks.{j}.after_proj", d, d)
    return spec


def vace_official(cfg: DiTConfig = TINY_VACE, seed: int = 0) -> dict[str, torch.Tensor]:
    """VaceWanModel state dict, float32, bare official names."""
    if not cfg.vace_layers:
        raise ValueError("a VACE config needs vace_layers")
    return _materialize(_vace_spec(cfg), seed)


def _scaled_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """factory.to_scaled_fp8 (base blocks) extended to the vace block Linears by the same rule."""
    vace = {k[len("vace_"):]: v for k, v in sd.items() if k.startswith("vace_blocks.")}
    out = to_scaled_fp8({k: v for k, v in sd.items() if not k.startswith("vace_blocks.")})
    big = torch.finfo(torch.float8_e4m3fn).max
    for k, v in vace.items():
        if is_scaled_linear(k, v):
            scale = (v.float().abs().max() / big).to(torch.float32).reshape(())
            out["vace_" + k] = _fp8(v.float() / scale, torch.float8_e4m3fn)
            out["vace_" + k[: -len(".weight")] + ".scale_weight"] = scale
        else:
            out["vace_" + k] = v.to(torch.bfloat16)
    return out


def vace_in_layout(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "official":
        return dict(sd)
    if layout == "comfy_prefixed":
        return with_prefix(sd)
    if layout == "diffusers":
        return dit_to_diffusers(sd)
    if layout == "scaled_fp8":
        return with_prefix(_scaled_fp8(sd))
    raise ValueError(f"unknown VACE layout {layout!r}; known: {VACE_LAYOUTS}")


def write_vace(tmp_path: str | Path, layout: str = "official", cfg: DiTConfig = TINY_VACE, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny VACE DiT file in ``layout`` and return its path (``dtype``: float tensors of
    the non-fp8 layouts)."""
    sd = vace_in_layout(vace_official(cfg, seed), layout)
    if layout != "scaled_fp8":
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return save_safetensors(sd, Path(tmp_path) / f"dit_vace_{layout}.safetensors")


__all__ = ["TINY_VACE", "VACE_LAYOUTS", "vace_official", "vace_in_layout", "write_vace"]
