"""Wan 2.2 TI2V-5B-shaped DiT (48 latent channels in and out, per-token timesteps) reproduces
diffusers' ``WanTransformer3DModel`` (0.42.1, which takes ``timestep`` ``[B, seq]`` for
Wan 2.2 TI2V), fp32 CPU, random official-layout weights (``factory.dit_official``) converted
by diffusers' own ``convert_wan_transformer_to_diffusers``; and the layout detection of a
TI2V file.

Measured max abs error (tiny config dim 256, latent [1, 48, 3, 8, 8], outputs ~|6|): 1.6e-5
with per-token timesteps (first-frame tokens at 0), 1.5e-5 with one timestep; the residual
is the fp32 vs fp64 timestep sinusoid (as in test_dit_parity.py). Tolerance 1e-4.
"""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

import tiny
import torch.nn.functional as F
from factory import dit_official, dit_to_diffusers
from wan_core.checkpoint import inspect_checkpoint
from wan_core.dit import WanDiT
from wan_core.files import CheckpointError

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
TI2V = tiny.TINY_DIT_TI2V


def ours(cfg, sd) -> WanDiT:
    model = WanDiT(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def diffusers_model(cfg, sd):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=1024)
    model.load_state_dict(dit_to_diffusers(sd), strict=True)
    return model.eval()


def run_diffusers(model, cfg, x, t, context):
    context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))   # diffusers does not pad
    return model(x, t, context, return_dict=False)[0]


@pytest.fixture(scope="module")
def pair():
    sd = dit_official(TI2V, 11)
    return sd, ours(TI2V, sd), diffusers_model(TI2V, sd)


def _inputs(f=3, h=8, w=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 48, f, h, w, generator=g)
    context = torch.randn(1, 7, TI2V.text_dim, generator=g)
    return x, context


def _first_frame_zero(t: float, f: int, h: int, w: int) -> torch.Tensor:
    """Official textimage2video.py i2v: mask 0 on latent frame 0, 1 elsewhere, taken at the
    patch grid (``mask[:, :, ::2, ::2]``), flattened, times t -> ``[1, L]``."""
    mask = torch.ones(1, f, h, w)
    mask[:, 0] = 0
    return (mask[:, :, ::2, ::2].flatten() * t)[None]


@torch.no_grad()
@pytest.mark.parametrize("per_token", [True, False])
def test_ti2v_matches_diffusers_with_per_token_timesteps(pair, per_token):
    _, model, ref = pair
    x, context = _inputs()
    t = _first_frame_zero(700.0, 3, 8, 8) if per_token else torch.tensor([700.0])
    got = model(x, t, context)
    want = run_diffusers(ref, TI2V, x, t, context)
    assert got.shape == want.shape == (1, 48, 3, 8, 8)
    assert (got - want).abs().max().item() < ATOL


@torch.no_grad()
def test_per_token_timesteps_all_equal_give_the_scalar_result(pair):
    _, model, _ = pair
    x, context = _inputs(seed=3)
    tokens = 3 * 4 * 4
    scalar = model(x, torch.tensor([500.0]), context)
    per_token = model(x, torch.full((1, tokens), 500.0), context)
    assert (scalar - per_token).abs().max().item() < 1e-5
    first_zero = model(x, _first_frame_zero(500.0, 3, 8, 8), context)
    assert (first_zero - scalar).abs().max().item() > 1e-2   # the first frame's tokens really see t = 0
    with pytest.raises(ValueError, match="per-token"):
        model(x, torch.zeros(1, tokens + 1), context)


def test_ti2v_file_is_detected(tmp_path, pair):
    sd = pair[0]
    path = tmp_path / "wan2.2_ti2v_5B_fp16.safetensors"
    save_file({"model.diffusion_model." + k: v.half() for k, v in sd.items()}, str(path))
    det = inspect_checkpoint(path)
    assert det.kind == "dit" and det.config.model_type == "ti2v" and det.config.in_dim == det.config.out_dim == 48
    bad = {k: v for k, v in sd.items()}
    bad["head.head.weight"] = torch.zeros(4 * 16, TI2V.dim)   # 48 in, 16 out: no such model
    save_file(bad, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="TI2V-5B"):
        inspect_checkpoint(tmp_path / "odd.safetensors")
