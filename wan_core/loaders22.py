"""Loading Wan 2.2: the two experts of an A14B model in each published layout, and the
check that a DiT and a VAE belong to the same generation.

A14B layouts (the tensors of each expert are detected as usual by :mod:`wan_core.layouts`):

- official ``Wan2.2-T2V-A14B/`` / ``Wan2.2-I2V-A14B/``: ``high_noise_model/`` and
  ``low_noise_model/`` folders, each a sharded safetensors set;
- diffusers ``Wan2.2-*-A14B-Diffusers/``: ``transformer/`` (high-noise) and
  ``transformer_2/`` (low-noise), ``model_index.json`` holding ``boundary_ratio``;
- ComfyUI (Comfy-Org repackaged): one file per expert, e.g.
  ``wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors`` + ``..._low_noise_...``, given as two
  paths (GGUF files per expert the same way).

Nothing here reads a file name to decide what a model is: folders are found by their
published names, the experts' kinds and shapes by their tensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .files import CheckpointError
from .moe import ExpertPair

__all__ = ["expert_paths", "load_expert_pair", "boundary_from_folder", "check_vae_for_dit"]

PathLike = str | os.PathLike
_LAYOUTS = (("high_noise_model", "low_noise_model"), ("transformer", "transformer_2"))


def expert_paths(folder: PathLike) -> tuple[Path, Path]:
    """``(high_noise, low_noise)`` model paths inside an official or diffusers A14B folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder. Give the A14B model folder (with high_noise_model/ and "
                              "low_noise_model/, or transformer/ and transformer_2/), or the two expert files.")
    for high, low in _LAYOUTS:
        if (folder / high).is_dir() and (folder / low).is_dir():
            return folder / high, folder / low
    if (folder / "transformer").is_dir():
        raise CheckpointError(f"{folder} holds one transformer/ only: a single-model pipeline (Wan 2.1 or "
                              "TI2V-5B), not a two-expert Wan 2.2 A14B model; load it with load_dit.")
    raise CheckpointError(f"{folder}: no high_noise_model/ + low_noise_model/ (official) or transformer/ + "
                          "transformer_2/ (diffusers) folders; this is not a Wan 2.2 A14B model folder.")


def boundary_from_folder(folder: PathLike) -> float | None:
    """The ``boundary_ratio`` a diffusers A14B ``model_index.json`` declares (None if absent)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file() or index.stat().st_size > 1 << 20:
        return None
    try:
        value = json.loads(index.read_text(encoding="utf-8")).get("boundary_ratio")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and 0 < value <= 1 else None


def load_expert_pair(high: PathLike, low: PathLike | None = None, **load_kwargs) -> ExpertPair:
    """Load both experts of an A14B model: ``high`` a model folder (see :func:`expert_paths`)
    with ``low`` None, or the two expert files / folders. ``load_kwargs`` go to
    :func:`wan_core.loaders.load_dit` for each (dtype, weight_dtype, attention, device)."""
    from .loaders import load_dit

    if low is None:
        high, low = expert_paths(high)
    first = load_dit(high, **load_kwargs)
    second = load_dit(low, **load_kwargs)
    try:
        return ExpertPair(first, second)
    except ValueError as err:
        raise CheckpointError(f"{Path(high).name} and {Path(low).name} are not the two experts of one "
                              f"Wan 2.2 A14B model: {err}") from err


def check_vae_for_dit(dit_cfg, vae) -> None:
    """Refuse a DiT and a VAE of different Wan generations, before any work: Wan 2.1 models and
    Wan 2.2 A14B take 16-channel latents (the Wan 2.1 VAE); TI2V-5B takes 48 (the Wan 2.2 VAE)."""
    z = vae.config.z_dim
    if dit_cfg.out_dim == z:
        return
    if dit_cfg.out_dim == 48:
        raise CheckpointError(f"{dit_cfg.variant} is a Wan 2.2 TI2V-5B model (48 latent channels) and needs the "
                              f"Wan 2.2 VAE (wan2.2_vae.safetensors); the VAE given has {z} channels "
                              "(the Wan 2.1 VAE).")
    if z == 48:
        raise CheckpointError(f"{dit_cfg.variant} takes 16-channel latents (Wan 2.1, or Wan 2.2 A14B) and needs the "
                              "Wan 2.1 VAE (wan_2.1_vae.safetensors); the VAE given is the Wan 2.2 VAE (48 channels), "
                              "which only TI2V-5B uses.")
    raise CheckpointError(f"{dit_cfg.variant} has {dit_cfg.out_dim} latent channels but the VAE {z}: they do not "
                          "belong together.")
