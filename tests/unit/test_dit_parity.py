"""WanDiT reproduces diffusers' WanTransformer3DModel (itself checked against the official
Wan 2.1 model) for t2v, i2v and flf2v, fp32 on CPU, with random non-symmetric weights in the
official layout (``factory.dit_official``) converted by diffusers' own
``convert_wan_transformer_to_diffusers`` (``factory.dit_to_diffusers``).

Measured here (tiny configs, latent [1, 16, 3, 8, 8], 7 real text tokens, outputs ~|4|):
max abs error vs diffusers 1.2e-5 (t2v), 1.4e-5 (i2v), 1.3e-5 (flf2v), relative <= 3e-6;
odd sizes [1, 16, 1, 6, 10] / [1, 16, 2, 2, 6]: <= 9.3e-6.
The whole residual is the timestep sinusoid: diffusers builds it in fp32, the official code
(and we) in fp64; with diffusers' fp32 sinusoid swapped in, t2v matches bit for bit.
A side-by-side run against the official Wan 2.1 model (flash_attn stubbed with SDPA, not
committed) gave <= 1.8e-6 max abs with float32 RoPE and exactly 0.0 with
``rope_dtype=float64`` (batch 1, all three model types and all latent sizes above).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny
from factory import dit_official, dit_to_diffusers
from wan_core.configs import KNOWN_DIT, DiTConfig
from wan_core.dit import FP32_PARAMS, WanDiT, keeps_fp32, rope_axis_dims

ATOL = 1e-4      # measured <= 1.4e-5 max abs (see module docstring): 7x margin
WRONG = 1e-3     # each wrong mapping below measured >= 0.024 (t2v norm3 swap), 0.12-1.9 others

CONFIGS = {"t2v": tiny.TINY_DIT_T2V, "i2v": tiny.TINY_DIT_I2V, "flf2v": tiny.TINY_DIT_FLF2V}
CLIP_TOKENS = tiny.TINY_CLIP.num_tokens


# ---- helpers -----------------------------------------------------------------------------

def ours(cfg: DiTConfig, sd: dict[str, torch.Tensor]) -> WanDiT:
    model = WanDiT(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def diffusers_model(cfg: DiTConfig, sd: dict[str, torch.Tensor]):
    from diffusers import WanTransformer3DModel

    image = cfg.has_image_input
    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=cfg.clip_dim if image else None,
        added_kv_proj_dim=cfg.dim if image else None, rope_max_seq_len=1024,
        pos_embed_seq_len=cfg.image_pos_len if cfg.model_type == "flf2v" else None)
    model.load_state_dict(dit_to_diffusers(sd), strict=True)
    return model.eval()


def make_inputs(cfg: DiTConfig, b: int = 1, f: int = 3, h: int = 8, w: int = 8, text: int = 7,
                seed: int = 1) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(b, 16, f, h, w, generator=g),
              "t": torch.rand(b, generator=g) * 1000,
              "context": torch.randn(b, text, cfg.text_dim, generator=g),
              "clip_fea": None, "y": None}
    if cfg.has_image_input:
        n = cfg.image_pos_len if cfg.model_type == "flf2v" else CLIP_TOKENS
        inputs["clip_fea"] = torch.randn(b, n, cfg.clip_dim, generator=g)
        inputs["y"] = torch.randn(b, cfg.in_dim - 16, f, h, w, generator=g)
    return inputs


def run_diffusers(model, cfg: DiTConfig, x, t, context, clip_fea, y) -> torch.Tensor:
    # diffusers does not pad the text itself, takes x and y concatenated, and wants the two
    # flf2v images as separate rows of 257 tokens (it re-joins pairs of rows).
    context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
    if y is not None:
        x = torch.cat([x, y], dim=1)
    if clip_fea is not None and cfg.model_type == "flf2v":
        clip_fea = clip_fea.reshape(2 * x.shape[0], -1, clip_fea.shape[-1])
    return model(x, t, context, encoder_hidden_states_image=clip_fea, return_dict=False)[0]


@pytest.fixture(scope="module")
def models():
    """Per model type: (official state dict, our model, diffusers model)."""
    out = {}
    for name, cfg in CONFIGS.items():
        sd = dit_official(cfg, seed=0)
        out[name] = (sd, ours(cfg, sd), diffusers_model(cfg, sd))
    return out


# ---- parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CONFIGS))
@torch.no_grad()
def test_matches_diffusers(models, kind):
    cfg = CONFIGS[kind]
    _, model, ref = models[kind]
    inputs = make_inputs(cfg)
    expected = run_diffusers(ref, cfg, **inputs)
    torch.testing.assert_close(model(**inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind,f,h,w", [("t2v", 1, 6, 10), ("i2v", 2, 2, 6)])
@torch.no_grad()
def test_matches_diffusers_on_odd_latent_sizes(models, kind, f, h, w):
    cfg = CONFIGS[kind]
    _, model, ref = models[kind]
    inputs = make_inputs(cfg, f=f, h=h, w=w, text=1)
    out = model(**inputs)
    assert out.shape == (1, cfg.out_dim, f, h, w)
    torch.testing.assert_close(out, run_diffusers(ref, cfg, **inputs), atol=ATOL, rtol=0)


def _swap(sd, a, b):
    sd = dict(sd)
    sd[a], sd[b] = sd[b], sd[a]
    return sd


@pytest.mark.parametrize("kind,key_a,key_b", [
    ("t2v", "blocks.0.norm3.weight", "blocks.1.norm3.weight"),
    ("t2v", "blocks.0.self_attn.k.weight", "blocks.0.self_attn.v.weight"),
    ("i2v", "blocks.1.cross_attn.k_img.weight", "blocks.1.cross_attn.v_img.weight"),
    # In t2v this swap is invisible by design (both weights multiply inside q.k); with
    # image tokens norm_q also meets norm_k_img, so flf2v must catch it.
    ("flf2v", "blocks.0.cross_attn.norm_q.weight", "blocks.0.cross_attn.norm_k.weight"),
])
@torch.no_grad()
def test_one_wrong_key_mapping_breaks_parity(models, kind, key_a, key_b):
    cfg = CONFIGS[kind]
    sd, _, ref = models[kind]
    inputs = make_inputs(cfg)
    wrong = ours(cfg, _swap(sd, key_a, key_b))(**inputs)
    assert (wrong - run_diffusers(ref, cfg, **inputs)).abs().max() > WRONG


# ---- behaviour ---------------------------------------------------------------------------

@torch.no_grad()
def test_output_is_float32_velocity_of_latent_shape(models):
    cfg = CONFIGS["i2v"]
    out = models["i2v"][1](**make_inputs(cfg, b=2, f=2, h=4, w=6))
    assert out.shape == (2, cfg.out_dim, 2, 4, 6) and out.dtype == torch.float32


@torch.no_grad()
def test_short_context_equals_context_zero_padded_to_text_len(models):
    cfg = CONFIGS["t2v"]
    model = models["t2v"][1]
    inputs = make_inputs(cfg)
    padded = dict(inputs, context=F.pad(inputs["context"], (0, 0, 0, cfg.text_len - 7)))
    assert torch.equal(model(**inputs), model(**padded))


@pytest.mark.parametrize("kind", ["t2v", "flf2v"])
@torch.no_grad()
def test_batch_of_two_equals_two_single_calls(models, kind):
    cfg = CONFIGS[kind]
    model = models[kind][1]
    inputs = make_inputs(cfg, b=2)
    both = model(**inputs)
    singles = [model(**{k: None if v is None else v[i:i + 1] for k, v in inputs.items()}) for i in range(2)]
    # measured <= 1.9e-6: batched and single matmuls accumulate in a different order
    torch.testing.assert_close(both, torch.cat(singles), atol=1e-5, rtol=0)


@torch.no_grad()
def test_prepare_blocks_finish_is_bit_identical_to_forward(models):
    cfg = CONFIGS["i2v"]
    model = models["i2v"][1]
    inputs = make_inputs(cfg)
    x, block_inputs = model.prepare(**inputs)
    for i in range(len(model.blocks)):
        x = model.blocks[i](x, block_inputs)
    assert torch.equal(model.finish(x, block_inputs), model(**inputs))


@torch.no_grad()
def test_float32_rope_matches_official_float64_rope(models):
    cfg = CONFIGS["t2v"]
    model = models["t2v"][1]
    inputs = make_inputs(cfg)
    out32 = model(**inputs)
    model.rope_dtype = torch.float64
    try:
        out64 = model(**inputs)
    finally:
        model.rope_dtype = torch.float32
    # measured <= 1.7e-6 max abs, 3e-7 relative (float64 RoPE = the official model bit for bit)
    torch.testing.assert_close(out32, out64, atol=1e-5, rtol=0)


def test_rope_axis_split_is_official_for_head_dim_128():
    assert rope_axis_dims(128) == (44, 42, 42)


@pytest.mark.parametrize("name", list(KNOWN_DIT))
def test_builds_on_meta_device_with_official_parameter_count_and_no_buffers(name):
    expected = {"T2V-1.3B": (1_418_996_800, 825), "T2V-14B": (14_288_491_584, 1095),
                "I2V-14B": (16_394_878_784, 1303), "FLF2V-14B": (16_394_878_784 + 514 * 1280, 1304),
                # Wan 2.2 (computed: T2V-14B + 20 more patch-embedding input channels; "5B")
                "I2V-A14B": (14_288_491_584 + 20 * 4 * 5120, 1095), "TI2V-5B": (4_999_787_712, 825),
                # Wan2.1-Fun (computed): T2V-1.3B + 20 (InP) / 32 (Control) patch-embedding input channels +
                # the image branch (k_img, v_img, norm_k_img per block; img_emb); Control-14B = I2V-14B + 12
                "Fun-InP-1.3B": (1_418_996_800 + 20 * 4 * 1536 + 145_308_928, 983),
                "Fun-Control-1.3B": (1_418_996_800 + 32 * 4 * 1536 + 145_308_928, 983),
                "Fun-Control-14B": (16_394_878_784 + 12 * 4 * 5120, 1303)}
    with torch.device("meta"):
        model = WanDiT(KNOWN_DIT[name])
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    assert (params, len(model.state_dict())) == expected[name]


@torch.no_grad()
def test_bf16_storage_keeps_fp32_params_and_stays_close(models):
    cfg = CONFIGS["t2v"]
    sd, model, _ = models["t2v"]
    inputs = make_inputs(cfg)
    reference = model(**inputs)
    half = ours(cfg, sd).cast_storage(torch.bfloat16)
    for name, p in half.named_parameters():
        assert p.dtype == (torch.float32 if keeps_fp32(name) else torch.bfloat16), name
    assert half.resolved_compute_dtype() == torch.bfloat16
    assert {"modulation", "norm", "time_embedding"} <= set(FP32_PARAMS)
    out = half(**inputs)
    assert out.dtype == torch.float32
    # measured 1.5e-3 relative (t2v; 3.3e-3 i2v): bf16 Linears, fp32 residual/modulation/norms/head
    assert ((out - reference).norm() / reference.norm()) < 1e-2


@pytest.mark.parametrize("kind,change,message", [
    ("t2v", {"clip_fea": torch.zeros(1, CLIP_TOKENS, tiny.TINY_CLIP.width)}, "takes no clip_fea"),
    ("i2v", {"clip_fea": None}, "clip_fea"),
    ("i2v", {"y": None}, "36 input channels"),
    ("t2v", {"context": torch.zeros(1, 513, tiny.TINY_DIT_T2V.text_dim)}, "text_len=512"),
    ("t2v", {"x": torch.zeros(1, 16, 1, 5, 8)}, "multiple of the patch"),
])
def test_bad_inputs_raise_clear_errors(models, kind, change, message):
    cfg = CONFIGS[kind]
    with pytest.raises(ValueError, match=message):
        models[kind][1](**dict(make_inputs(cfg), **change))
