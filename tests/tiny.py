"""Tiny configs for random-weight test models, shared by every test.

Shapes follow the real layouts (head_dim 128 for the DiT, z_dim 16 for the VAE, per-layer
relative position tables for umT5) so every code path of the full models runs, but each
model is small enough to run on two CPU cores in well under a second.
"""
from __future__ import annotations

from wan_core.configs import CLIPVisionConfig, DiTConfig, T5Config, VAEConfig

TINY_T5 = T5Config(vocab=384, dim=64, dim_attn=64, dim_ffn=96, num_heads=4, num_layers=2,
                   num_buckets=32, max_distance=128)
TINY_CLIP = CLIPVisionConfig(image_size=56, patch_size=14, width=160, mlp_dim=320,
                             num_layers=3, head_dim=80, out_dim=48)
TINY_DIT_T2V = DiTConfig(dim=256, ffn_dim=384, num_layers=2, text_dim=TINY_T5.dim, freq_dim=64)
TINY_DIT_I2V = DiTConfig(dim=256, ffn_dim=384, num_layers=2, in_dim=36, text_dim=TINY_T5.dim,
                         freq_dim=64, model_type="i2v", clip_dim=TINY_CLIP.width)
TINY_DIT_FLF2V = DiTConfig(dim=256, ffn_dim=384, num_layers=2, in_dim=36, text_dim=TINY_T5.dim,
                           freq_dim=64, model_type="flf2v", clip_dim=TINY_CLIP.width,
                           image_pos_len=2 * TINY_CLIP.num_tokens)
TINY_VAE = VAEConfig(dim=8, z_dim=16)
