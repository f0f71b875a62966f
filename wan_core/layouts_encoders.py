"""Checkpoint layouts of the two encoders: the umT5-XXL text encoder and the CLIP ViT-H/14
vision tower (kind, layout, config from shapes, and the key mapping to official names).

umT5: official Wan 2.1 names (``models_t5_umt5-xxl-enc-bf16.pth``, ComfyUI's fp8 files),
Hugging Face / ComfyUI ``encoder.block.N.layer.*`` names, and llama.cpp GGUF names
(``enc.blk.N.*``). CLIP: the official open-clip file (``visual.*``, the text tower ignored)
or a bare visual tower, and Hugging Face ``CLIPVisionModel(WithProjection)`` names.

Part of :mod:`wan_core.layouts`: ``layouts.detect`` is the single entry (it calls
:func:`detect_encoder`); this module, ``layouts.py`` (DiT, VAE) and ``layouts22.py`` (the Wan
2.2 VAE) are the only places checkpoint keys are converted. The helpers, limits and result
types are layouts.py's.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .configs import CLIPVisionConfig, T5Config
from .files import CheckpointError, TensorFile, shown
from .layouts import (MAX_CLIP_LAYERS, MAX_T5_BLOCKS, Detected, Recipe, _dims, _is_extra, _layer_count,
                      _official_dims, _quant_and_scales)

__all__ = ["detect_encoder"]

# ---------------------------------------------------------------------------------------
# umT5


def _t5_config(tf: TensorFile, official: dict[str, str]) -> T5Config:
    def shape(name: str) -> tuple[int, ...]:
        return _official_dims(tf, official, name, 2, "a umT5 encoder")

    vocab, dim = shape("token_embedding.weight")
    layers = _layer_count(tf.path.name, official, "blocks.", MAX_T5_BLOCKS, "umT5 block")
    if layers == 0:
        raise CheckpointError(f"{tf.path.name}: looks like a umT5 encoder but has no blocks; the file is incomplete.")
    if "blocks.1.pos_embedding.embedding.weight" not in official and layers > 1:
        raise CheckpointError(
            f"{tf.path.name} is a T5 encoder with one shared position table (e.g. the T5-XXL used by "
            "Flux/SD3), not umT5-XXL. Wan 2.1 needs umt5_xxl (vocab 256384) in models/text_encoders.")
    buckets, heads = shape("blocks.0.pos_embedding.embedding.weight")
    if shape("blocks.0.attn.q.weight")[0] % heads:
        raise CheckpointError(f"{tf.path.name}: umT5 attention width {shape('blocks.0.attn.q.weight')[0]} is "
                              f"not a multiple of its {heads} heads; the file is corrupt.")
    return T5Config(vocab=vocab, dim=dim, dim_attn=shape("blocks.0.attn.q.weight")[0],
                    dim_ffn=shape("blocks.0.ffn.fc1.weight")[0], num_heads=heads, num_layers=layers,
                    num_buckets=buckets)


def _t5_detected(tf: TensorFile, layout: str, official: dict[str, str], ignored: Sequence[str] = (),
                 unknown: Sequence[str] = (), what: str = "keys for a umT5 encoder") -> Detected:
    """The umT5 :class:`Detected` of ``tf`` read through ``official`` (official name -> file
    key); refuses the file when it holds ``unknown`` keys (``what`` names them in the error)."""
    if unknown:
        raise CheckpointError(f"{tf.path.name}: unexpected {what}: {', '.join(shown(k) for k in unknown[:8])}.")
    cfg = _t5_config(tf, official)
    quant, scales = _quant_and_scales(tf)
    tok = "spiece_model" if "spiece_model" in tf else None
    return Detected("t5", layout, cfg, {o: Recipe((f,)) for o, f in official.items()}, quant, scales,
                    tok, tuple(ignored))


def _detect_t5_official(tf: TensorFile) -> Detected:
    return _t5_detected(tf, "official", {k: k for k in tf.keys() if not _is_extra(k) and k != "spiece_model"})


_T5_HF_LAYER = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight", "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight", "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def _detect_t5_hf(tf: TensorFile) -> Detected:
    keys = set(tf.keys())
    official: dict[str, str] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for k in sorted(keys):
        if _is_extra(k) or k == "spiece_model":
            continue
        if k in ("shared.weight", "encoder.embed_tokens.weight"):
            official.setdefault("token_embedding.weight", k)
        elif k == "encoder.final_layer_norm.weight":
            official["norm.weight"] = k
        elif k.startswith(("decoder.", "lm_head.")):
            ignored.append(k)      # a full seq2seq checkpoint: Wan uses the encoder only
        else:
            m = re.match(r"^encoder\.block\.(\d+)\.(.+)$", k)
            if m and m[2] in _T5_HF_LAYER:
                official[f"blocks.{m[1]}.{_T5_HF_LAYER[m[2]]}"] = k
            else:
                unknown.append(k)
    return _t5_detected(tf, "hf", official, ignored, unknown)


# llama.cpp T5 names (umT5 GGUF files): "enc.blk.N.<name>" -> official "blocks.N.<name>".
_T5_GGUF_LAYER = {
    "attn_norm.weight": "norm1.weight", "attn_q.weight": "attn.q.weight", "attn_k.weight": "attn.k.weight",
    "attn_v.weight": "attn.v.weight", "attn_o.weight": "attn.o.weight",
    "attn_rel_b.weight": "pos_embedding.embedding.weight", "ffn_norm.weight": "norm2.weight",
    "ffn_gate.weight": "ffn.gate.0.weight",      # HF wi_0, the GELU branch
    "ffn_up.weight": "ffn.fc1.weight",           # HF wi_1
    "ffn_down.weight": "ffn.fc2.weight",         # HF wo
}


def _detect_t5_gguf(tf: TensorFile) -> Detected:
    official: dict[str, str] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for k in sorted(tf.keys()):
        if k == "spiece_model":
            continue
        if k == "token_embd.weight":
            official["token_embedding.weight"] = k
        elif k == "enc.output_norm.weight":
            official["norm.weight"] = k
        elif k.startswith(("dec.", "output.")):
            ignored.append(k)      # a full seq2seq file: Wan uses the encoder only
        elif (m := re.match(r"^enc\.blk\.(\d+)\.(.+)$", k)) and m[2] in _T5_GGUF_LAYER:
            official[f"blocks.{m[1]}.{_T5_GGUF_LAYER[m[2]]}"] = k
        else:
            unknown.append(k)
    return _t5_detected(tf, "gguf", official, ignored, unknown, "tensors for a umT5 GGUF encoder")


# ---------------------------------------------------------------------------------------
# CLIP vision

_NOT_VIT_H = {768: "ViT-B", 1024: "ViT-L/14 (clip_vision_l)", 1664: "ViT-bigG (clip_vision_g)"}


def _clip_config(tf: TensorFile, name: str, width: int, num_tokens: int, patch: int, layers: int,
                 mlp_dim: int, out_dim: int) -> CLIPVisionConfig:
    if width in _NOT_VIT_H:
        raise CheckpointError(f"{name} is a CLIP {_NOT_VIT_H[width]} vision model; Wan 2.1 image-to-video "
                              "needs CLIP ViT-H/14 (clip_vision_h.safetensors) in models/clip_vision.")
    grid = math.isqrt(num_tokens - 1)
    if num_tokens < 2 or grid * grid != num_tokens - 1:
        raise CheckpointError(f"{name}: CLIP position table of {num_tokens} rows is not 1 + a square grid; "
                              "the file is corrupt.")
    if width % CLIPVisionConfig.head_dim:
        raise CheckpointError(f"{name}: CLIP width {width} is not a multiple of the head width "
                              f"{CLIPVisionConfig.head_dim}; not a ViT-H/14 model.")
    return CLIPVisionConfig(image_size=grid * patch, patch_size=patch, width=width, mlp_dim=mlp_dim,
                            num_layers=layers, out_dim=out_dim)


def _detect_clip_official(tf: TensorFile) -> Detected:
    keys = set(tf.keys())
    pre = "visual." if "visual.cls_embedding" in keys else ""
    official = {k[len(pre):]: k for k in keys if k.startswith(pre) and not _is_extra(k)} if pre else \
        {k: k for k in keys if not _is_extra(k)}
    ignored = tuple(sorted(k for k in keys if pre and not k.startswith(pre)))
    layers = _layer_count(tf.path.name, official, "transformer.", MAX_CLIP_LAYERS, "CLIP layer")

    def shape(key: str, rank: int) -> tuple[int, ...]:
        return _dims(tf, official.get(key, pre + key), rank, "a CLIP vision model")

    if layers == 0:
        raise CheckpointError(f"{tf.path.name}: looks like a CLIP vision model but has no layers; "
                              "the file is incomplete.")
    width = shape("cls_embedding", 3)[-1]
    cfg = _clip_config(tf, tf.path.name, width, shape("pos_embedding", 3)[-2],
                       shape("patch_embedding.weight", 4)[-1], layers,
                       shape("transformer.0.mlp.0.weight", 2)[0],
                       shape("head", 2)[-1] if "head" in official else 1024)
    quant, scales = _quant_and_scales(tf)
    return Detected("clip_vision", "official", cfg, {o: Recipe((f,)) for o, f in official.items()},
                    quant, scales, ignored=ignored)


def _detect_clip_hf(tf: TensorFile) -> Detected:
    keys = set(tf.keys())
    v = "vision_model."
    width = _dims(tf, v + "embeddings.class_embedding", 1, "an HF CLIP vision model")[-1]
    n_pos = _dims(tf, v + "embeddings.position_embedding.weight", 2, "an HF CLIP vision model")[0]
    rec: dict[str, Recipe] = {
        "cls_embedding": Recipe((v + "embeddings.class_embedding",), "reshape", (1, 1, width)),
        "patch_embedding.weight": Recipe((v + "embeddings.patch_embedding.weight",)),
        "pos_embedding": Recipe((v + "embeddings.position_embedding.weight",), "reshape", (1, n_pos, width)),
    }
    for ours, hf in (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")):
        for leaf in ("weight", "bias"):
            rec[f"{ours}.{leaf}"] = Recipe((f"{v}{hf}.{leaf}",))
    layers = _layer_count(tf.path.name, keys, v + "encoder.layers.", MAX_CLIP_LAYERS, "CLIP layer")
    if layers == 0:
        raise CheckpointError(f"{tf.path.name}: looks like an HF CLIP vision model but has no layers; "
                              "the file is incomplete.")
    for n in range(layers):
        src = f"{v}encoder.layers.{n}."
        dst = f"transformer.{n}."
        for leaf in ("weight", "bias"):
            rec[dst + "attn.to_qkv." + leaf] = Recipe(tuple(f"{src}self_attn.{p}_proj.{leaf}" for p in "qkv"), "cat")
            for ours, hf in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                             ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
                rec[f"{dst}{ours}.{leaf}"] = Recipe((f"{src}{hf}.{leaf}",))
    if "visual_projection.weight" in keys:
        rec["head"] = Recipe(("visual_projection.weight",), "transpose")
    used = {k for r in rec.values() for k in r.keys}
    missing = sorted(k for k in used if k not in keys and not k.startswith(v + "post_layernorm"))
    if missing:
        raise CheckpointError(f"{tf.path.name}: looks like an HF CLIP vision model but lacks: "
                              f"{', '.join(shown(k) for k in missing[:6])}.")
    rec = {o: r for o, r in rec.items() if all(k in keys for k in r.keys)}
    unknown = sorted(k for k in keys - used if not _is_extra(k) and not k.endswith("position_ids")
                     and not k.startswith(("text_model.", "text_projection", "logit_scale")))
    if unknown:
        raise CheckpointError(f"{tf.path.name}: unexpected keys for a CLIP vision model: "
                              f"{', '.join(shown(k) for k in unknown[:8])}.")
    hf = "an HF CLIP vision model"
    out_dim = _dims(tf, "visual_projection.weight", 2, hf)[0] if "visual_projection.weight" in keys else 1024
    cfg = _clip_config(tf, tf.path.name, width, n_pos,
                       _dims(tf, v + "embeddings.patch_embedding.weight", 4, hf)[-1], layers,
                       _dims(tf, f"{v}encoder.layers.0.mlp.fc1.weight", 2, hf)[0], out_dim)
    quant, scales = _quant_and_scales(tf)
    ignored = tuple(sorted(k for k in keys if k.startswith(("text_model.", "text_projection", "logit_scale"))))
    return Detected("clip_vision", "hf", cfg, rec, quant, scales, ignored=ignored)


# ---------------------------------------------------------------------------------------
# dispatch


def detect_encoder(tf: TensorFile, keys: set[str]) -> Detected | None:
    """The umT5 / CLIP vision :class:`~wan_core.layouts.Detected` of ``tf`` (``keys``: its
    tensor names), or None when it is neither (``layouts.detect`` then tries no other kind)."""
    if "token_embedding.weight" in keys and "blocks.0.attn.q.weight" in keys:
        return _detect_t5_official(tf)
    if any(k.startswith("encoder.block.") for k in keys) and (
            "shared.weight" in keys or "encoder.embed_tokens.weight" in keys):
        return _detect_t5_hf(tf)
    if "token_embd.weight" in keys and any(k.startswith("enc.blk.") for k in keys):
        return _detect_t5_gguf(tf)
    if "visual.cls_embedding" in keys or "cls_embedding" in keys and "transformer.0.attn.to_qkv.weight" in keys:
        return _detect_clip_official(tf)
    if "vision_model.embeddings.class_embedding" in keys:
        return _detect_clip_hf(tf)
    return None
