"""Wan 2.2 layouts: what a Wan 2.2 checkpoint holds, from its keys and shapes (helper to
:mod:`wan_core.layouts`, which calls in here before its Wan 2.1 rules).

The Wan 2.2 VAE (TI2V-5B) comes in two layouts:

- official ``Wan2.2_VAE.pth`` = ComfyUI ``wan2.2_vae.safetensors`` (same names, optionally
  prefixed): ``encoder.downsamples.<stage>.downsamples.<j>.residual.2.weight``, ...;
- diffusers ``AutoencoderKLWan`` with ``is_residual=True``:
  ``encoder.down_blocks.<stage>.resnets.<j>.conv1.weight``, ``...downsampler.resample.1``,
  ``decoder.up_blocks.<stage>.resnets.<j>...``, ``...upsampler.time_conv``.

Both map to the official names, which :class:`wan_core.vae22.WanVAE22` uses.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from .files import CheckpointError, TensorFile

__all__ = ["is_vae22", "detect_vae22", "vae22_key_from_diffusers"]

_OFFICIAL_MARK = "decoder.upsamples.0.upsamples.0.residual.2.weight"
_DIFFUSERS_MARK = "encoder.down_blocks.0.resnets.0.conv1.weight"


def is_vae22(keys: Iterable[str]) -> bool:
    """True when the keys (any prefix) are those of a Wan 2.2 VAE in a known layout."""
    return any(k.endswith(_OFFICIAL_MARK) or k.endswith(_DIFFUSERS_MARK) for k in keys)


def vae22_key_from_diffusers(k: str, num_res_blocks: int) -> str:
    """Official name of a diffusers Wan 2.2 ``AutoencoderKLWan`` key (unknown keys unchanged)."""
    from .layouts import _VAE_RES_NAMES, _vae_common_key_from_diffusers   # at call time: layouts imports this module

    common = _vae_common_key_from_diffusers(k)
    if common is not None:
        return common
    m = re.match(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)$", k)
    if m:
        return f"{m[1]}.{m[2]}samples.{m[3]}.{m[2]}samples.{m[4]}.{_VAE_RES_NAMES.get(m[5], m[5])}.{m[6]}"
    m = re.match(r"^encoder\.down_blocks\.(\d+)\.downsampler\.(.+)$", k)
    if m:
        return f"encoder.downsamples.{m[1]}.downsamples.{num_res_blocks}.{m[2]}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.upsampler\.(.+)$", k)
    if m:
        return f"decoder.upsamples.{m[1]}.upsamples.{num_res_blocks + 1}.{m[2]}"
    return k


def detect_vae22(tf: TensorFile, keys: list[str]):
    """:class:`~wan_core.layouts.Detected` for a Wan 2.2 VAE file. ``keys``: the file's tensor
    keys without extras."""
    from . import layouts as helpers   # at call time: layouts imports this module
    from .vae22 import VAE22Config

    name = tf.path.name
    prefix = ""
    for p in ("model.", "vae.", "first_stage_model."):
        if keys and all(k.startswith(p) for k in keys):
            prefix = p
            break
    bare = {k[len(prefix):]: k for k in keys}
    diffusers = _DIFFUSERS_MARK in bare
    if diffusers:
        nrb = helpers._layer_count(name, bare, "encoder.down_blocks.0.resnets.", helpers.MAX_VAE_DOWNSAMPLES,
                                   "VAE down-block resnet")
        official = {vae22_key_from_diffusers(b, nrb): f for b, f in bare.items()}
    else:
        official = dict(bare)

    def shape(key: str, rank: int) -> tuple[int, ...]:
        return helpers._official_dims(tf, official, key, rank, "the Wan 2.2 VAE")

    dim, in_ch = shape("encoder.conv1.weight", 5)[:2]
    dec_dim4, z_dim = shape("decoder.conv1.weight", 5)[:2]
    if in_ch != 12 or shape("decoder.head.2.weight", 5)[0] != 12:
        raise CheckpointError(f"{name}: looks like the Wan 2.2 VAE but its encoder input / decoder output has "
                              f"{in_ch} channels instead of 12 (3 colours x 2x2 patches); the file is corrupt.")
    stages = helpers._layer_count(name, official, "encoder.downsamples.", helpers.MAX_VAE_STAGES, "VAE stage")
    if stages < 2:
        raise CheckpointError(f"{name}: the Wan 2.2 VAE encoder has {stages} stages; the file is incomplete.")
    mults: list[int] = []
    temporal: list[bool] = []
    nrb = 0
    for i in range(stages):
        p = f"encoder.downsamples.{i}.downsamples."
        entries = helpers._layer_count(name, official, p, helpers.MAX_VAE_DOWNSAMPLES, "VAE stage entry")
        down = f"{p}{entries - 1}.resample.1.weight" in official
        blocks = entries - 1 if down else entries
        if blocks < 1 or (nrb and blocks != nrb) or down != (i < stages - 1):
            raise CheckpointError(f"{name}: Wan 2.2 VAE encoder stage {i} has an unexpected structure "
                                  f"({blocks} residual blocks, downsample={down}); the file is corrupt.")
        nrb = blocks
        width = shape(f"{p}0.residual.2.weight", 5)[0]
        if width % dim:
            raise CheckpointError(f"{name}: VAE stage width {width} is not a multiple of the base width {dim}.")
        mults.append(width // dim)
        if down:
            temporal.append(f"{p}{entries - 1}.time_conv.weight" in official)
    if dec_dim4 % mults[-1]:
        raise CheckpointError(f"{name}: decoder width {dec_dim4} does not fit the stage multipliers {mults}.")
    cfg = VAE22Config(dim=dim, dec_dim=dec_dim4 // mults[-1], z_dim=z_dim, dim_mult=tuple(mults),
                      num_res_blocks=nrb, temporal_downsample=tuple(temporal))
    quant, scales = helpers._quant_and_scales(tf)
    return helpers.Detected("vae", "diffusers" if diffusers else "official", cfg,
                            {o: helpers.Recipe((f,)) for o, f in official.items()}, quant, scales)
