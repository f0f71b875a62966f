"""Tiny configs for random-weight test models, shared by every test.

Shapes follow the real layouts (head_dim 128 for the DiT, z_dim 16 for the VAE, per-layer
relative position tables for umT5) so every code path of the full models runs, but each
model is small enough to run on two CPU cores in well under a second.
"""
from __future__ import annotations

import torch

from wan_core.configs import CLIPVisionConfig, DiTConfig, T5Config, VAEConfig

TINY_T5 = T5Config(vocab=384, dim=64, dim_attn=64, dim_ffn=96, num_heads=4, num_layers=2,
                   num_buckets=32, max_distance=128)
TINY_CLIP = CLIPVisionConfig(image_size=56, patch_size=14, width=160, mlp_dim=320,
                             num_layers=3, head_dim=80, out_dim=48)
TINY_DIT_T2V = DiTConfig(dim=256, ffn_dim=384, num_layers=2, text_dim=TINY_T5.dim, freq_dim=64)
# Wan 2.2 TI2V-5B shape: 48 latent channels in and out (the Wan 2.2 VAE), per-token timesteps
TINY_DIT_TI2V = DiTConfig(dim=256, ffn_dim=384, num_layers=2, text_dim=TINY_T5.dim, freq_dim=64, in_dim=48,
                          out_dim=48, model_type="ti2v")
TINY_DIT_I2V = DiTConfig(dim=256, ffn_dim=384, num_layers=2, in_dim=36, text_dim=TINY_T5.dim,
                         freq_dim=64, model_type="i2v", clip_dim=TINY_CLIP.width)
TINY_DIT_FLF2V = DiTConfig(dim=256, ffn_dim=384, num_layers=2, in_dim=36, text_dim=TINY_T5.dim,
                           freq_dim=64, model_type="flf2v", clip_dim=TINY_CLIP.width,
                           image_pos_len=2 * TINY_CLIP.num_tokens)
TINY_VAE = VAEConfig(dim=8, z_dim=16)
# Wan2.1-Fun (VideoX-Fun): Control (in 48 = noise + control + start latents; V1.1 adds ref_conv),
# InP (the I2V shapes)
TINY_DIT_FUN_CONTROL = DiTConfig(dim=256, ffn_dim=384, num_layers=2, in_dim=48, text_dim=TINY_T5.dim,
                                 freq_dim=64, model_type="i2v", clip_dim=TINY_CLIP.width, fun="control")
TINY_DIT_FUN_CONTROL_REF = DiTConfig(dim=256, ffn_dim=384, num_layers=2, in_dim=48, text_dim=TINY_T5.dim,
                                     freq_dim=64, model_type="i2v", clip_dim=TINY_CLIP.width, fun="control",
                                     ref_in_dim=16)


def dit_inputs(cfg: DiTConfig, seed: int = 0) -> tuple:
    """Random arguments of one ``WanDiT(cfg)`` call at a tiny size: ``(x [1, 16, 2, 4, 4],
    t [1] = 700, context [1, 7, text_dim], clip_fea [1, 9, clip_dim] or None, y [1, in_dim - 16,
    2, 4, 4] or None)``, the same for the same ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    y = torch.randn(1, cfg.in_dim - 16, 2, 4, 4, generator=g) if cfg.in_dim > 16 else None
    ctx = torch.randn(1, 7, cfg.text_dim, generator=g)
    clip = torch.randn(1, 9, cfg.clip_dim, generator=g) if cfg.has_image_input else None
    return x, torch.tensor([700.0]), ctx, clip, y


def built(model_class, cfg, state_dict: dict) -> torch.nn.Module:
    """``model_class(cfg)`` built on meta and given ``state_dict`` (strict, assigned), in eval mode."""
    with torch.device("meta"):
        model = model_class(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()
