"""The Fun Control DiT forward against diffusers' WanTransformer3DModel, fp32 on CPU.

V1.0 (in_dim 48, img_emb): diffusers runs it as an I2V model with 48 input channels
(``in_channels=48``): noise, control latents and start latents concatenated, exactly as
VideoX-Fun's ``WanTransformer3DModel.forward`` does ``torch.cat([x, y])``.

V1.1 (``ref_conv``): diffusers has no reference input, so the reference is built independently
around it, following VideoX-Fun's forward: the video gets one extra leading frame whose patch
embedding is replaced (forward hook) by ``ref_conv(full_ref)``, so diffusers' RoPE covers F'+1
frames with the reference at frame 0, and that frame is cut from its output.

Measured (tiny config, latent [1, 16, 3, 8, 8], 7 text tokens, 17 CLIP tokens, outputs ~|4|):
max abs vs diffusers 1.5e-5 (V1.0), 1.5e-5 (V1.1 with a reference), 1.5e-5 (V1.1, zero
reference); the residual is diffusers' fp32 timestep sinusoid (see test_dit_parity.py). Wrong
constructions: reference appended instead of prepended 0.068, the reference conv's kernel
transposed 0.29, no reference tokens 0.29.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny
from factory import dit_official, dit_to_diffusers
from wan_core.dit import WanDiT

ATOL = 1e-4     # measured <= 1.5e-5 (module docstring): 6x margin
WRONG = 1e-2    # every wrong construction below measured >= 0.068

CONTROL, CONTROL_REF = tiny.TINY_DIT_FUN_CONTROL, tiny.TINY_DIT_FUN_CONTROL_REF


def _diffusers(cfg, sd):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim, rope_max_seq_len=1024)
    model.load_state_dict(dit_to_diffusers({k: v for k, v in sd.items() if not k.startswith("ref_conv.")}), strict=True)
    return model.eval()


def _inputs(cfg, seed=1, f=3, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(1, 16, f, h, w, generator=g), "t": torch.rand(1, generator=g) * 1000,
            "context": torch.randn(1, 7, cfg.text_dim, generator=g),
            "clip_fea": torch.randn(1, tiny.TINY_CLIP.num_tokens, cfg.clip_dim, generator=g),
            "y": torch.randn(1, 32, f, h, w, generator=g)}, torch.randn(1, 16, h, w, generator=g)


def _run_diffusers(model, cfg, x, t, context, clip_fea, y, ref=None, ref_w=None, ref_b=None, at="first"):
    """diffusers' forward; with ``ref``: one more frame whose patch tokens are ``ref_conv(ref)``
    (at the start as VideoX-Fun, or at the end: a wrong construction), cut from the output."""
    context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
    video = torch.cat([x, y], dim=1)
    if ref is None:
        return model(video, t, context, encoder_hidden_states_image=clip_fea, return_dict=False)[0]
    idx = 0 if at == "first" else video.shape[2]
    pad = torch.zeros_like(video[:, :, :1])
    video = torch.cat([pad, video] if at == "first" else [video, pad], dim=2)
    tokens = F.conv2d(ref, ref_w, ref_b, stride=2)

    def hook(_module, _args, out):
        out = out.clone()
        out[:, :, idx] = tokens
        return out

    handle = model.patch_embedding.register_forward_hook(hook)
    try:
        out = model(video, t, context, encoder_hidden_states_image=clip_fea, return_dict=False)[0]
    finally:
        handle.remove()
    return out[:, :, 1:] if at == "first" else out[:, :, :-1]


@pytest.fixture(scope="module")
def pair():
    # each tensor draws from its own (seed, name) generator: V1.0 is V1.1 without ref_conv, so one
    # diffusers model serves both
    sd = dit_official(CONTROL_REF, seed=3)
    ref = _diffusers(CONTROL_REF, sd)
    out = {}
    for name, cfg in (("v1.0", CONTROL), ("v1.1", CONTROL_REF)):
        ours = WanDiT(cfg).eval()
        ours.load_state_dict({k: v for k, v in sd.items() if cfg.ref_in_dim or not k.startswith("ref_conv.")},
                             strict=True)
        out[name] = (sd, ours, ref)
    return out


@torch.no_grad()
def test_fun_control_v1_0_matches_diffusers_with_48_input_channels(pair):
    _, ours, ref = pair["v1.0"]
    inputs, _ = _inputs(CONTROL)
    expected = _run_diffusers(ref, CONTROL, **inputs)
    torch.testing.assert_close(ours(**inputs), expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_fun_control_v1_1_reference_tokens_match_the_independent_construction(pair):
    sd, ours, ref_model = pair["v1.1"]
    inputs, full_ref = _inputs(CONTROL_REF)
    got = ours(**inputs, full_ref=full_ref)
    w, b = sd["ref_conv.weight"], sd["ref_conv.bias"]
    torch.testing.assert_close(got, _run_diffusers(ref_model, CONTROL_REF, **inputs, ref=full_ref, ref_w=w, ref_b=b),
                               atol=ATOL, rtol=0)
    # zeros (VideoX-Fun without a reference image) still add ref_conv's bias tokens
    zero = ours(**inputs, full_ref=torch.zeros_like(full_ref))
    torch.testing.assert_close(zero, _run_diffusers(ref_model, CONTROL_REF, **inputs, ref=torch.zeros_like(full_ref),
                                                    ref_w=w, ref_b=b), atol=ATOL, rtol=0)


@torch.no_grad()
def test_wrong_reference_constructions_are_far_off(pair):
    sd, ours, ref_model = pair["v1.1"]
    inputs, full_ref = _inputs(CONTROL_REF)
    got = ours(**inputs, full_ref=full_ref)
    w, b = sd["ref_conv.weight"], sd["ref_conv.bias"]
    wrong = {
        "appended": _run_diffusers(ref_model, CONTROL_REF, **inputs, ref=full_ref, ref_w=w, ref_b=b, at="last"),
        "kernel transposed": _run_diffusers(ref_model, CONTROL_REF, **inputs, ref=full_ref,
                                            ref_w=w.transpose(2, 3).contiguous(), ref_b=b),
        "no reference": ours(**inputs),
    }
    for name, out in wrong.items():
        assert (out - got).abs().max() > WRONG, name


@torch.no_grad()
def test_reference_needs_a_v1_1_model_and_the_latent_size(pair):
    _, v10, _ = pair["v1.0"]
    _, v11, _ = pair["v1.1"]
    inputs, full_ref = _inputs(CONTROL)
    with pytest.raises(ValueError, match="Fun V1.1 Control"):
        v10(**inputs, full_ref=full_ref)
    with pytest.raises(ValueError, match=r"reference latent \[1, 16, 8, 8\]"):
        v11(**inputs, full_ref=full_ref[:, :, :4])
