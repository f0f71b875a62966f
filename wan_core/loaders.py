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

from .attention import BACKENDS
from .checkpoint import find_tokenizer, inspect_checkpoint, load_module
from .clip_vision import CLIPVisionTower
from .dit import WanDiT
from .files import CheckpointError
from .text_encoder import UMT5Encoder, encode_text
from .tokenizer import UMT5Tokenizer
from .vace import WanVaceDiT
from .vae import WanVAE
from .vae22 import VAE22Config, WanVAE22

__all__ = ["load_dit", "load_vae", "load_text_encoder", "load_clip_vision", "TextEncoder"]

PathLike = str | os.PathLike


def load_dit(path: PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             compute_dtype: torch.dtype | None = None, weight_dtype: str | torch.dtype | None = None,
             attention: str = "sdpa") -> WanDiT:
    """Wan 2.1 DiT (T2V, I2V or FLF2V, decided by the tensors) -> :class:`wan_core.dit.WanDiT`;
    a VACE file (1.3B / 14B) -> :class:`wan_core.vace.WanVaceDiT`.

    ``dtype``: storage dtype of the Linear weights (None keeps the file's, fp8 included: an
    fp8 file stays fp8 and is upcast per call; give bf16 to dequantise it). Norms, modulation, time MLPs, patch embedding and head are
    always float32 (:data:`wan_core.dit.FP32_PARAMS`). ``compute_dtype``: dtype the Linears
    run in (None: their storage dtype; bf16 on CUDA and float32 on CPU for fp8).
    ``weight_dtype``: fp8 storage of the attention / FFN / text / image-MLP Linear weights:
    None (default: "keep" when ``dtype`` is None, else no fp8), "keep" (fp8 weights of the file stay fp8, scaled ones with their
    scales), "fp8_e4m3fn" or "fp8_e5m2" (bf16/fp16/fp32 weights are quantised at load time
    to scaled fp8, absmax/fp8-max per tensor). Biases and the float32-policy parameters
    follow ``dtype`` as above. See :mod:`wan_core.fp8`.
    ``attention``: the attention kernel, one of :data:`wan_core.attention.BACKENDS` ("sdpa",
    the default, runs everywhere; "auto", "sage", "flash" fall back to it with one warning);
    it becomes ``WanDiT.attention_backend``. An unknown name fails before the file is read.
    GGUF files (ComfyUI-GGUF, :mod:`wan_core.gguf`): the quantized block Linears stay
    quantized whatever ``dtype`` says (:class:`wan_core.quant.QuantLinear`, dequantized per
    call); ``dtype`` and ``weight_dtype`` apply to the file's unquantized tensors.
    """
    if attention not in BACKENDS:
        raise ValueError(f"unknown attention backend {attention!r}; choose one of {', '.join(BACKENDS)}")

    def build(cfg) -> WanDiT:
        # a VACE file (vace_blocks.N in the tensors) gives the VACE DiT, a WanDiT subclass
        model_class = WanVaceDiT if cfg.vace_layers else WanDiT
        return model_class(cfg, compute_dtype=compute_dtype, attention_backend=attention)

    model, _ = load_module(path, "dit", build, dtype=dtype, device=device,
                           keep_fp32=WanDiT.precision.keeps_fp32, weight_dtype=weight_dtype)
    return model


def load_vae(path: PathLike, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> WanVAE | WanVAE22:
    """Wan 2.1 VAE (official .pth/.safetensors or diffusers) -> :class:`wan_core.vae.WanVAE`;
    the Wan 2.2 VAE (TI2V-5B; official, ComfyUI or diffusers) -> :class:`wan_core.vae22.WanVAE22`,
    decided by the tensors. Both have the same methods; ``vae.config.z_dim`` (16 / 48) and
    ``vae_strides(vae)`` tell them apart.

    The official pipeline runs the VAE in float32, the default here.
    """
    def build(cfg) -> WanVAE | WanVAE22:
        return WanVAE22(cfg) if isinstance(cfg, VAE22Config) else WanVAE(cfg)

    model, _ = load_module(path, "vae", build, dtype=dtype, device=device)
    return model


@dataclass
class TextEncoder:
    """umT5 encoder plus its tokenizer: ``encode(prompts)`` -> per-prompt ``[L_i, dim]`` tensors."""

    model: UMT5Encoder
    tokenizer: UMT5Tokenizer

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
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
    path = Path(path)
    det = inspect_checkpoint(path)
    tokenizer = UMT5Tokenizer.from_bytes(find_tokenizer(path, det, tokenizer_path)) if det.kind == "t5" else None
    # another kind is refused here, naming the loader the file belongs to
    model, det = load_module(path, "t5", UMT5Encoder, dtype=dtype, device=device,
                             keep_fp32=UMT5Encoder.precision.keeps_fp32, weight_dtype=weight_dtype)
    assert tokenizer is not None  # load_module accepted a umT5 file
    if tokenizer.vocab_size > det.config.vocab:
        raise CheckpointError(f"{path.name}: the tokenizer has {tokenizer.vocab_size} pieces but the "
                              f"encoder's embedding only {det.config.vocab}: tokenizer and weights do not match.")
    return TextEncoder(model, tokenizer)


def load_clip_vision(path: PathLike, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu") -> CLIPVisionTower:
    """CLIP ViT-H/14 vision tower (official open-clip .pth or ComfyUI clip_vision_h) ->
    :class:`wan_core.clip_vision.CLIPVisionTower`. The text tower of the official file is
    skipped without being read."""
    model, _ = load_module(path, "clip_vision", CLIPVisionTower, dtype=dtype, device=device,
                           keep_fp32=CLIPVisionTower.precision.keeps_fp32)
    return model
