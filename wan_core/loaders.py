"""Public loaders: one function per network, from a file path to a ready module.

Each accepts every published layout of its kind (see :mod:`wan_core.layouts`), infers the
config from tensor shapes, streams the weights in (:mod:`wan_core.checkpoint`) and prints
one line naming the variant, layout and dtypes. A file of another kind raises
:class:`~wan_core.files.CheckpointError` naming the loader it belongs to.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import find_tokenizer, inspect_checkpoint, load_module
from .files import CheckpointError

__all__ = ["load_dit", "load_vae", "load_text_encoder", "load_clip_vision", "TextEncoder"]

PathLike = str | os.PathLike


def load_dit(path: PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             compute_dtype: torch.dtype | None = None, weight_dtype: str | torch.dtype | None = None):
    """Wan 2.1 DiT (T2V, I2V or FLF2V, decided by the tensors) -> :class:`wan_core.dit.WanDiT`.

    ``dtype``: storage dtype of the Linear weights (None keeps the file's, fp8 included: an
    fp8 file stays fp8 and is upcast per call; give bf16 to dequantise it). Norms, modulation, time MLPs, patch embedding and head are
    always float32 (:data:`wan_core.dit.FP32_PARAMS`). ``compute_dtype``: dtype the Linears
    run in (None: their storage dtype; bf16 on CUDA and float32 on CPU for fp8).
    ``weight_dtype``: fp8 storage of the attention / FFN / text / image-MLP Linear weights:
    None (default: "keep" when ``dtype`` is None, else no fp8), "keep" (fp8 weights of the file stay fp8, scaled ones with their
    scales), "fp8_e4m3fn" or "fp8_e5m2" (bf16/fp16/fp32 weights are quantised at load time
    to scaled fp8, absmax/fp8-max per tensor). Biases and the float32-policy parameters
    follow ``dtype`` as above. See :mod:`wan_core.fp8`.
    """
    from .dit import WanDiT, keeps_fp32

    model, _ = load_module(path, "dit", lambda cfg: WanDiT(cfg, compute_dtype=compute_dtype), dtype=dtype,
                           device=device, keep_fp32=keeps_fp32, weight_dtype=weight_dtype)
    return model


def load_vae(path: PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Wan 2.1 VAE (official .pth/.safetensors or diffusers) -> :class:`wan_core.vae.WanVAE`.

    The official pipeline runs the VAE in float32, the default here.
    """
    from .vae import WanVAE

    model, _ = load_module(path, "vae", WanVAE, dtype=dtype, device=device)
    return model


@dataclass
class TextEncoder:
    """umT5 encoder plus its tokenizer: ``encode(prompts)`` -> per-prompt ``[L_i, dim]`` tensors."""

    model: torch.nn.Module
    tokenizer: object

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        from .text_encoder import encode_text

        device = next(self.model.parameters()).device
        return encode_text(self.model, self.tokenizer, prompts, device)


def load_text_encoder(path: PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                      tokenizer_path: PathLike | None = None,
                      weight_dtype: str | torch.dtype | None = None) -> TextEncoder:
    """umT5-XXL text encoder (official names or ComfyUI/HF, bf16/fp16/fp8/scaled fp8).

    The tokenizer comes from ``tokenizer_path``, the ``spiece_model`` tensor ComfyUI embeds,
    or a ``spiece.model`` beside the file; when none is found this fails before reading any
    weight, saying where to put it. ``weight_dtype``: fp8 storage of the Linear weights, as
    in :func:`load_dit` (None: no fp8).
    """
    from .text_encoder import UMT5Encoder, keeps_fp32
    from .tokenizer import UMT5Tokenizer

    path = Path(path)
    det = inspect_checkpoint(path)
    if det.kind == "t5":
        spm = find_tokenizer(path, det, tokenizer_path)
        tokenizer = UMT5Tokenizer.from_bytes(spm)
    model, det = load_module(path, "t5", UMT5Encoder, dtype=dtype, device=device, keep_fp32=keeps_fp32,
                             weight_dtype=weight_dtype)
    if tokenizer.vocab_size > det.config.vocab:  # type: ignore[union-attr]
        raise CheckpointError(f"{path.name}: the tokenizer has {tokenizer.vocab_size} pieces but the "
                              f"encoder's embedding only {det.config.vocab}: tokenizer and weights do not match.")
    return TextEncoder(model, tokenizer)


def load_clip_vision(path: PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """CLIP ViT-H/14 vision tower (official open-clip .pth or ComfyUI clip_vision_h) ->
    :class:`wan_core.clip_vision.CLIPVisionTower`. The text tower of the official file is
    skipped without being read."""
    from .clip_vision import CLIPVisionTower, keeps_fp32

    model, _ = load_module(path, "clip_vision", CLIPVisionTower, dtype=dtype, device=device,
                           keep_fp32=keeps_fp32)
    return model
