"""CLIP ViT-H/14 visual tower: official names, penultimate features equal to transformers'
``CLIPVisionModel`` ``hidden_states[-2]``, and the official I2V preprocessing.

Reference: transformers ``CLIPVisionModelWithProjection`` (``hidden_act="gelu"``, eps 1e-5,
SDPA attention) loaded with ``factory.clip_to_hf`` of the same random official weights
(ComfyUI's ``clip_vision_h`` layout). Measured max abs error on the tiny model: 0.0 against
SDPA, 1.7e-6 against the eager attention path (features of magnitude ~5). The official
``wan/modules/clip.py`` tower (``use_31_block=True``) and ``CLIPModel.visual`` preprocessing
were also checked by hand: both 0.0.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig as HFCLIPVisionConfig
from transformers import CLIPVisionModelWithProjection

from factory import clip_official, clip_to_hf
from tiny import TINY_CLIP
from wan_core.clip_vision import FP32_PARAMS, CLIPVisionTower, encode_image, preprocess
from wan_core.configs import CLIPVisionConfig

ATOL = 1e-5   # measured 0.0 (same kernels); margin for BLAS differences


def _visual(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}


def _ours(seed: int = 0) -> CLIPVisionTower:
    model = CLIPVisionTower(TINY_CLIP).eval()
    model.load_state_dict(_visual(clip_official(TINY_CLIP, seed)), strict=True)
    return model


def _hf_penultimate(hf_sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    c = TINY_CLIP
    hc = HFCLIPVisionConfig(hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
                            num_attention_heads=c.num_heads, image_size=c.image_size, patch_size=c.patch_size,
                            hidden_act="gelu", layer_norm_eps=c.eps, projection_dim=c.out_dim)
    hc._attn_implementation = "sdpa"
    model = CLIPVisionModelWithProjection(hc).eval()
    model.load_state_dict(hf_sd, strict=True)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    assert len(out.hidden_states) == c.num_layers + 1          # embeddings (after pre-LN) + each block
    return out.hidden_states[-2]


def _pixels(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, TINY_CLIP.image_size, TINY_CLIP.image_size, generator=g)


def test_parameter_names_are_the_official_visual_tower_without_prefix() -> None:
    sd = _visual(clip_official(TINY_CLIP))
    with torch.device("meta"):
        model = CLIPVisionTower(TINY_CLIP)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_builds_on_meta_without_buffers() -> None:
    with torch.device("meta"):
        model = CLIPVisionTower(CLIPVisionConfig())                   # full ViT-H/14
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())
    # the visual.* tensors of the official models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
    # (Wan-AI/Wan2.1-I2V-*): ViT-H/14, width 1280, 32 layers, 257 tokens (official wan/modules/clip.py)
    assert sum(p.numel() for p in model.parameters()) == 632_076_800
    assert model.config.num_heads == 16 and model.config.num_tokens == 257
    fp32 = sum(p.numel() for n, p in model.named_parameters() if any(f in n for f in FP32_PARAMS))
    assert fp32 / 632_076_800 < 0.005


def test_penultimate_features_match_transformers_hidden_states() -> None:
    sd = clip_official(TINY_CLIP)
    pixels = _pixels()
    with torch.no_grad():
        ours = _ours()(pixels)
    ref = _hf_penultimate(clip_to_hf(sd), pixels)
    assert ours.shape == (2, TINY_CLIP.num_tokens, TINY_CLIP.width)
    err = (ours - ref).abs().max().item()
    assert err <= ATOL, f"max abs error {err:.3g} vs transformers CLIPVisionModel hidden_states[-2]"


@pytest.mark.parametrize("wrong", ["q_k_swapped", "class_and_position_swapped_tokens"])
def test_one_wrong_key_mapping_breaks_parity(wrong: str) -> None:
    hf = clip_to_hf(clip_official(TINY_CLIP))
    if wrong == "q_k_swapped":   # to_qkv split in k, q, v order instead of q, k, v
        for i in range(TINY_CLIP.num_layers):
            for leaf in ("weight", "bias"):
                q, k = (f"vision_model.encoder.layers.{i}.self_attn.{n}_proj.{leaf}" for n in "qk")
                hf[q], hf[k] = hf[k], hf[q]
    else:                        # position rows rolled by one (class token position misplaced)
        key = "vision_model.embeddings.position_embedding.weight"
        hf[key] = hf[key].roll(1, dims=0)
    pixels = _pixels()
    with torch.no_grad():
        ours = _ours()(pixels)
    err = (ours - _hf_penultimate(hf, pixels)).abs().max().item()
    assert err > 1000 * ATOL, f"{wrong} went unnoticed (error {err:.3g})"


def test_last_block_post_norm_and_head_do_not_affect_features() -> None:
    model = _ours()
    pixels = _pixels()
    with torch.no_grad():
        before = model(pixels)
        for p in [*model.transformer[-1].parameters(), *model.post_norm.parameters(), model.head]:
            p.fill_(float("nan"))
        assert torch.equal(model(pixels), before)


def test_preprocess_is_bicubic_resize_without_crop_then_clip_normalisation() -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, 48, 80, generator=g) * 2 - 1            # -1..1, wide, not square
    x = preprocess(images, TINY_CLIP)
    assert x.shape == (1, 3, TINY_CLIP.image_size, TINY_CLIP.image_size) and x.dtype == torch.float32
    resized = F.interpolate(images, size=(TINY_CLIP.image_size,) * 2, mode="bicubic", align_corners=False)
    for c in range(3):
        want = (resized[:, c] * 0.5 + 0.5 - TINY_CLIP.mean[c]) / TINY_CLIP.std[c]
        assert torch.allclose(x[:, c], want, atol=1e-6, rtol=0)
    # A flat mid-grey image (0 in -1..1) maps to (0.5 - mean) / std in every pixel: no crop, no pad.
    flat = preprocess(torch.zeros(2, 3, 33, 70), TINY_CLIP)
    for c in range(3):
        assert torch.allclose(flat[:, c], torch.full_like(flat[:, c], (0.5 - TINY_CLIP.mean[c]) / TINY_CLIP.std[c]))
    # OpenAI CLIP's normalisation, which the official wan/modules/clip.py applies (T.Normalize(mean, std))
    assert TINY_CLIP.mean == (0.48145466, 0.4578275, 0.40821073)
    assert TINY_CLIP.std == (0.26862954, 0.26130258, 0.27577711)


def test_encode_image_is_preprocess_then_tower() -> None:
    model = _ours()
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 40, 64, generator=g) * 2 - 1
    with torch.no_grad():
        want = model(preprocess(images, TINY_CLIP))
    got = encode_image(model, images)
    assert torch.equal(got, want)
    assert got.shape == (2, (TINY_CLIP.image_size // TINY_CLIP.patch_size) ** 2 + 1, TINY_CLIP.width)


def test_half_precision_storage_runs_in_its_own_dtype() -> None:
    model = _ours()
    pixels = _pixels()
    with torch.no_grad():
        want = model(pixels)
        model.to(torch.bfloat16)
        got = model(pixels)
        model.compute_dtype = torch.float32
        got32 = model(pixels)
    assert got.dtype == torch.bfloat16 and got32.dtype == torch.float32
    cos = F.cosine_similarity(got.float().flatten(), want.flatten(), dim=0).item()
    assert cos > 0.999 and math.isfinite(cos)


def test_wrong_pixel_size_is_explained() -> None:
    with pytest.raises(ValueError, match="preprocess"):
        _ours()(torch.zeros(1, 3, 30, 30))
