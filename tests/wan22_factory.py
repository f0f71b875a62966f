"""Tiny Wan 2.2 models in the published layouts, for tests (helper R's file).

- :func:`vae22_official`: random weights under the official ``Wan2.2_VAE.pth`` / ComfyUI
  ``wan2.2_vae.safetensors`` names, for a :class:`~wan_core.vae22.VAE22Config`.
- :func:`vae22_to_diffusers`: the same tensors under diffusers ``AutoencoderKLWan`` names
  (``is_residual=True``), written here from diffusers' module tree (0.42.1), independently of
  the reverse map in :mod:`wan_core.layouts`.
"""
from __future__ import annotations

import re

import torch

from wan_core.vae22 import VAE22Config, WanVAE22

TINY_VAE22 = VAE22Config(dim=8, dec_dim=12, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2)


def vae22_official(cfg: VAE22Config = TINY_VAE22, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with fan-in scaled convolutions (activations stay O(1)), norm scales
    1 +- 0.2 and small biases, so swapped tensors change the output."""
    with torch.device("meta"):
        model = WanVAE22(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(model.named_parameters()):
        if name.endswith("gamma"):
            t = 1 + 0.2 * torch.randn(p.shape, generator=g)
        elif name.endswith("bias"):
            t = 0.05 * torch.randn(p.shape, generator=g)
        else:
            fan_in = p[0].numel()
            t = torch.randn(p.shape, generator=g) / fan_in ** 0.5
        out[name] = t
    return out


_RES = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
        "shortcut": "conv_shortcut"}


def _res(rest: str) -> str:
    for ours, theirs in _RES.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def vae22_to_diffusers(sd: dict[str, torch.Tensor], cfg: VAE22Config = TINY_VAE22) -> dict[str, torch.Tensor]:
    fixed = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.", "encoder.conv1.": "encoder.conv_in.",
             "decoder.conv1.": "decoder.conv_in.", "encoder.head.0.": "encoder.norm_out.",
             "encoder.head.2.": "encoder.conv_out.", "decoder.head.0.": "decoder.norm_out.",
             "decoder.head.2.": "decoder.conv_out."}
    out = {}
    for k, v in sd.items():
        new = None
        for a, b in fixed.items():
            if k.startswith(a) and "." not in k[len(a):]:   # conv1.weight, not conv1.x.weight
                new = b + k[len(a):]
        m = re.match(r"^(encoder|decoder)\.middle\.(\d)\.(.+)$", k)
        if new is None and m:
            i = int(m[2])
            new = (f"{m[1]}.mid_block.attentions.0.{m[3]}" if i == 1
                   else f"{m[1]}.mid_block.resnets.{i // 2}.{_res(m[3])}")
        m = re.match(r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.+)$", k)
        if new is None and m:
            j = int(m[2])
            new = (f"encoder.down_blocks.{m[1]}.downsampler.{m[3]}" if j == cfg.num_res_blocks
                   else f"encoder.down_blocks.{m[1]}.resnets.{j}.{_res(m[3])}")
        m = re.match(r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(.+)$", k)
        if new is None and m:
            j = int(m[2])
            new = (f"decoder.up_blocks.{m[1]}.upsampler.{m[3]}" if j == cfg.num_res_blocks + 1
                   else f"decoder.up_blocks.{m[1]}.resnets.{j}.{_res(m[3])}")
        if new is None:
            raise KeyError(f"no diffusers name for {k}")
        out[new] = v
    return out


def diffusers_vae22(cfg: VAE22Config, official: dict[str, torch.Tensor]):
    """diffusers ``AutoencoderKLWan`` in its Wan 2.2 configuration, loaded strictly."""
    from diffusers import AutoencoderKLWan

    from wan_core.vae22 import VAE22_LATENT_MEAN, VAE22_LATENT_STD
    ref = AutoencoderKLWan(
        base_dim=cfg.dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks, attn_scales=[], temperal_downsample=list(cfg.temporal_downsample),
        dropout=0.0, is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        scale_factor_temporal=4, scale_factor_spatial=16,
        latents_mean=list(VAE22_LATENT_MEAN), latents_std=list(VAE22_LATENT_STD))
    ref.load_state_dict(vae22_to_diffusers(official, cfg), strict=True)
    return ref.eval()
