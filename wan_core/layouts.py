"""What a checkpoint holds, from its keys and shapes alone, and how its keys map to ours.

This module (with :mod:`wan_core.layouts_encoders` for umT5 and CLIP vision, and
:mod:`wan_core.layouts22` for the Wan 2.2 VAE) is the one place where key names are
converted; :func:`detect` is the single entry. Internally every network uses the
official Wan 2.1 names (``blocks.0.self_attn.q.weight``); each published layout (official,
ComfyUI ``model.diffusion_model.``-prefixed, ComfyUI/HF text encoder, HF CLIP vision,
diffusers) is mapped to them by a :class:`Recipe` per internal tensor. Configs are inferred
from tensor shapes, never from file names.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

import torch

from .configs import CLIPVisionConfig, DiTConfig, T5Config, VAEConfig
from .files import CheckpointError, TensorFile, shown
from .fp8 import is_fp8
from .layouts22 import detect_vae22, is_vae22

__all__ = ["Recipe", "Detected", "detect", "KIND_NAMES", "Config", "MAX_DIT_BLOCKS", "MAX_T5_BLOCKS",
           "MAX_CLIP_LAYERS", "MAX_VAE_DOWNSAMPLES", "MAX_VAE_STAGES", "MAX_CONFIG_SIZE"]

# Limits on what shapes and key names may imply, checked before any module is built (a 0-byte
# tensor named ``blocks.10000000.x`` must not build ten million blocks). Published models:
# 30 / 40 DiT blocks (1.3B / 14B), 24 umT5 blocks, 32 CLIP layers, 11 VAE encoder
# downsample entries in 4 stages, no inferred size above 256,384 (the umT5 vocabulary).
MAX_DIT_BLOCKS = 64
MAX_T5_BLOCKS = 64
MAX_CLIP_LAYERS = 64
MAX_VAE_DOWNSAMPLES = 64          # entries of encoder.downsamples (residuals + resamples)
MAX_VAE_STAGES = 8
MAX_CONFIG_SIZE = 2**20           # any width, vocabulary or length read from a shape

Config = Union[DiTConfig, VAEConfig, T5Config, CLIPVisionConfig]

KIND_NAMES = {
    "dit": ("a Wan 2.1 diffusion model (DiT)", "models/diffusion_models"),
    "vae": ("a Wan 2.1 VAE", "models/vae"),
    "t5": ("a umT5-XXL text encoder", "models/text_encoders"),
    "clip_vision": ("a CLIP ViT-H/14 vision encoder", "models/clip_vision"),
}


@dataclass(frozen=True)
class Recipe:
    """How to build one internal tensor from file tensors.

    ``op``: "copy" (one key), "cat" (concatenate keys on dim 0: HF q/k/v -> to_qkv),
    "transpose" (one 2-D key, transposed: HF visual_projection -> head), "reshape" (one key,
    reshaped to the parameter's shape: HF class/position embeddings).
    """

    keys: tuple[str, ...]
    op: str = "copy"
    shape: tuple[int, ...] | None = None   # target shape of "reshape"


@dataclass(frozen=True)
class Detected:
    """The result of :func:`detect`: kind, layout, config and the key recipes."""

    kind: str                      # "dit" | "vae" | "t5" | "clip_vision"
    layout: str                    # "official" | "comfy" (prefixed) | "diffusers" | "hf" | "gguf"
    config: Config
    recipes: dict[str, Recipe]     # internal name -> how to read it
    quant: str = "none"            # "none" | "fp8_e4m3fn" | "fp8_e5m2" | "scaled_fp8_e4m3fn" | ...
    scales: tuple[tuple[str, str], ...] = ()   # (file weight key, file scale_weight key)
    tokenizer_key: str | None = None           # ComfyUI text encoders embed the spm model
    ignored: tuple[str, ...] = ()              # keys deliberately unused (e.g. CLIP textual.*)

    @property
    def description(self) -> str:
        return f"{self.config.variant} [{self.kind}, layout={self.layout}, weights={self.quant}]"


# ---------------------------------------------------------------------------------------
# entry point


def detect(tf: TensorFile) -> Detected:
    """Identify ``tf``'s kind and layout, infer its config and map its keys.

    Raises :class:`CheckpointError` naming the file for anything that is not a Wan 2.1
    network we can load (LoRA, Wan 2.2, other model families, unknown layouts, malformed
    or inconsistent shapes and layer numbers).
    """
    try:
        return _detect(tf)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, AttributeError, NameError) as err:
        # A check below missed a malformed file: still a CheckpointError naming it.
        raise CheckpointError(f"{tf.path.name}: the tensors do not form a consistent Wan 2.1 network "
                              f"({type(err).__name__} while reading shapes); the file is corrupt or "
                              "of an unsupported variant.") from err


def _detect(tf: TensorFile) -> Detected:
    keys = set(tf.keys())
    name = tf.path.name
    if not keys:
        raise CheckpointError(f"{name}: the file holds no tensors.")
    _refuse_known_others(name, keys)
    stripped, prefix = _strip_prefix(keys, ("model.diffusion_model.", "diffusion_model.", "model."))
    if "head.modulation" in stripped or "scale_shift_table" in stripped and any(
            k.startswith("condition_embedder.") for k in stripped):
        return _detect_dit(tf, prefix)
    if is_vae22(keys):   # the Wan 2.2 (TI2V-5B) VAE: wan_core.layouts22
        return detect_vae22(tf, [k for k in tf.keys() if not _is_extra(k)])
    vae_keys, vprefix = _strip_prefix(keys, ("model.", "vae.", "first_stage_model."))
    if "decoder.middle.0.residual.0.gamma" in vae_keys or "decoder.mid_block.resnets.0.norm1.gamma" in vae_keys:
        return _detect_vae(tf, vprefix)
    encoder = layouts_encoders.detect_encoder(tf, keys)   # umT5 / CLIP vision
    if encoder is not None:
        return encoder
    sample = ", ".join(shown(k) for k in sorted(keys)[:8])
    raise CheckpointError(
        f"{name}: unknown checkpoint layout: it is not a Wan 2.1 DiT, VAE, umT5 text encoder or "
        f"CLIP vision model in any layout this loader knows. First keys: {sample}.")


def _strip_prefix(keys: set[str], prefixes: tuple[str, ...]) -> tuple[set[str], str]:
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys - {"scaled_fp8"}):
            return {k[len(p):] if k.startswith(p) else k for k in keys}, p
    return keys, ""


def _refuse_known_others(name: str, keys: set[str]) -> None:
    if any(".lora_up." in k or ".lora_down." in k or ".lora_A." in k or ".lora_B." in k for k in keys):
        raise CheckpointError(f"{name} is a LoRA, not a base model. Load a Wan 2.1 model here and "
                              "apply the LoRA with a LoRA node.")
    flux = ("double_blocks.0.img_attn.qkv.weight", "joint_blocks.0.x_block.attn.qkv.weight",
            "input_blocks.0.0.weight", "transformer_blocks.0.attn.to_q.weight")
    for k in keys:
        for marker in flux:
            if k.endswith(marker):
                raise CheckpointError(f"{name} is a diffusion model of another family (key '{shown(k)}'), "
                                      "not Wan 2.1.")


def _dims(tf: TensorFile, key: str, rank: int, what: str = "") -> tuple[int, ...]:
    """Shape of ``key``: exactly ``rank`` sizes, each in 1..MAX_CONFIG_SIZE, else a CheckpointError."""
    if key not in tf:
        raise CheckpointError(f"{tf.path.name}: looks like {what or 'a Wan 2.1 network'} but lacks "
                              f"'{shown(key)}'; the file is incomplete or of an unsupported variant.")
    s = tf.shape(key)
    if len(s) != rank or not all(1 <= d <= MAX_CONFIG_SIZE for d in s):
        raise CheckpointError(f"{tf.path.name}: tensor '{shown(key)}' has shape {list(s)}; expected {rank} "
                              f"sizes, each 1..{MAX_CONFIG_SIZE}. The file is corrupt or not Wan 2.1.")
    return s


def _official_dims(tf: TensorFile, official: dict[str, str], key: str, rank: int, what: str,
                   missing: str = "incomplete") -> tuple[int, ...]:
    """:func:`_dims` of the file tensor that ``official`` (official name -> file key) maps the
    official name ``key`` to; a file without it "looks like ``what``" but is ``missing``."""
    if key not in official:
        raise CheckpointError(f"{tf.path.name}: looks like {what} but lacks '{key}'; the file is {missing}.")
    return _dims(tf, official[key], rank, what)


def _layer_count(file: str, names: Iterable[str], prefix: str, limit: int, what: str) -> int:
    """Number of layers named ``<prefix><N>.``: N decimal, contiguous from 0, at most ``limit``."""
    found: set[int] = set()
    for k in names:
        if not k.startswith(prefix):
            continue
        idx, dot, _ = k[len(prefix):].partition(".")
        if not dot or not (idx.isascii() and idx.isdigit()) or len(idx) > 12 or str(int(idx)) != idx:
            raise CheckpointError(f"{file}: tensor '{shown(k)}' has a malformed {what} number; "
                                  "the file is corrupt or not Wan 2.1.")
        found.add(int(idx))
    if not found:
        return 0
    n = max(found) + 1
    if n > limit:
        raise CheckpointError(f"{file}: {what}s are numbered up to {n - 1}; at most {limit} are "
                              "supported (the published models have fewer). The file is corrupt or hostile.")
    if len(found) != n:
        gaps = sorted(set(range(n)) - found)
        raise CheckpointError(f"{file}: {what}s are not numbered contiguously from 0 (missing "
                              f"{', '.join(map(str, gaps[:5]))}{' ...' if len(gaps) > 5 else ''}); "
                              "the file is incomplete or corrupt.")
    return n


def _quant_and_scales(tf: TensorFile) -> tuple[str, tuple[tuple[str, str], ...]]:
    """fp8 flavour of the file and the (weight key, scale key) pairs of ComfyUI scaled fp8
    (GGUF: its GGML types per tensor group, see :meth:`wan_core.gguf.GGUFFile.quant_summary`)."""
    from .gguf import GGUFFile

    if isinstance(tf, GGUFFile):
        return tf.quant_summary(), ()
    keys = tf.keys()
    fp8 = {tf.dtype(k) for k in keys if is_fp8(tf.dtype(k))}
    marker = next((k for k in keys if k == "scaled_fp8" or k.endswith(".scaled_fp8")), None)
    scales = []
    for k in keys:
        if k.endswith(".scale_weight"):
            w = k[: -len(".scale_weight")] + ".weight"
            if w in tf:
                scales.append((w, k))
    if marker is not None or scales:
        fmt = tf.dtype(marker) if marker is not None else torch.float8_e4m3fn
        fmt_name = "fp8_e5m2" if fmt == torch.float8_e5m2 else "fp8_e4m3fn"
        return f"scaled_{fmt_name}", tuple(sorted(scales))
    if not fp8:
        return "none", ()
    return ("fp8_e5m2" if fp8 == {torch.float8_e5m2} else "fp8_e4m3fn"), ()


_EXTRA_SUFFIXES = (".scale_weight", ".scale_input")


def _is_extra(k: str) -> bool:
    return k == "scaled_fp8" or k.endswith(".scaled_fp8") or k.endswith(_EXTRA_SUFFIXES)


# ---------------------------------------------------------------------------------------
# DiT

_DIT_DIFFUSERS_RULES: tuple[tuple[str, str], ...] = (
    # top level (applied to whole names, first match wins)
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
)
_DIT_DIFFUSERS_BLOCK: dict[str, str] = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",            # diffusers' norm2 is the official (affine) norm3
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "proj_in": "before_proj", "proj_out": "after_proj",    # VACE blocks (WanVACETransformer3DModel)
}


def dit_key_from_diffusers(k: str) -> str:
    """Official name of a diffusers ``WanTransformer3DModel`` key (unchanged if not renamed)."""
    for pat, rep in _DIT_DIFFUSERS_RULES:
        if re.search(pat, k):
            return re.sub(pat, rep, k)
    m = re.match(r"^(vace_blocks|blocks)\.(\d+)\.(.+)$", k)   # VACE blocks are base blocks + 2 Linears
    if m:
        block, rest = f"{m[1]}.{m[2]}", m[3]
        if rest == "scale_shift_table":
            return f"{block}.modulation"
        for src, dst in _DIT_DIFFUSERS_BLOCK.items():
            if rest.startswith(src + "."):
                return f"{block}.{dst}{rest[len(src):]}"
    return k


def _detect_dit(tf: TensorFile, prefix: str) -> Detected:
    file_keys = [k for k in tf.keys() if not _is_extra(k)]
    bare = {k[len(prefix):] if k.startswith(prefix) else k: k for k in file_keys}
    diffusers = "head.modulation" not in bare
    official = {dit_key_from_diffusers(b) if diffusers else b: f for b, f in bare.items()}
    layout = "diffusers" if diffusers else ("comfy" if prefix else "official")

    def shape(name: str, rank: int) -> tuple[int, ...]:
        return _official_dims(tf, official, name, rank, "a Wan DiT", "incomplete or of an unsupported variant")

    def mismatch(name: str, what: str) -> CheckpointError:
        return CheckpointError(f"{tf.path.name}: DiT tensor '{shown(official[name])}' has shape "
                               f"{list(tf.shape(official[name]))}, inconsistent with {what}; the file is corrupt.")

    num_layers = _layer_count(tf.path.name, official, "blocks.", MAX_DIT_BLOCKS, "DiT block")
    if num_layers == 0:
        raise CheckpointError(f"{tf.path.name}: looks like a Wan DiT but has no blocks; the file is incomplete.")
    dim = shape("head.modulation", 3)[-1]
    pe = shape("patch_embedding.weight", 5)
    patch = tuple(pe[2:])
    in_dim = pe[1]
    if pe[0] != dim:
        raise mismatch("patch_embedding.weight", f"the model width {dim} of head.modulation")
    head_rows, head_cols = shape("head.head.weight", 2)
    if head_rows % math.prod(patch) or head_cols != dim:
        raise mismatch("head.head.weight", f"width {dim} and patch size {list(patch)}")
    out_dim = head_rows // math.prod(patch)
    ffn_dim, ffn_in = shape("blocks.0.ffn.0.weight", 2)
    text_out, text_dim = shape("text_embedding.0.weight", 2)
    time_out, freq_dim = shape("time_embedding.0.weight", 2)
    for name, got in (("blocks.0.ffn.0.weight", ffn_in), ("text_embedding.0.weight", text_out),
                      ("time_embedding.0.weight", time_out)):
        if got != dim:
            raise mismatch(name, f"the model width {dim}")
    if dim % 128:
        raise CheckpointError(f"{tf.path.name}: DiT width {dim} is not a multiple of 128 (head_dim); "
                              "not a Wan 2.1 model.")
    ti2v = in_dim == 48 and out_dim == 48 and "img_emb.proj.0.weight" not in official
    fun_control = in_dim == 48 and out_dim == 16 and "img_emb.proj.0.weight" in official   # wan_core.fun
    if (out_dim == 48 or in_dim == 48) and not (ti2v or fun_control):
        raise CheckpointError(f"{tf.path.name}: a DiT with {in_dim} input and {out_dim} output channels is "
                              "neither Wan 2.1 (16) nor Wan 2.2 TI2V-5B (48 in and out, no image embedder).")
    model_type = "t2v"
    clip_dim, image_pos_len = 1280, 0
    if "img_emb.proj.0.weight" in official:
        model_type = "i2v"
        clip_dim = shape("img_emb.proj.0.weight", 1)[0]
        if "img_emb.emb_pos" in official:
            model_type = "flf2v"
            image_pos_len = shape("img_emb.emb_pos", 3)[1]
    if ti2v:
        model_type = "ti2v"         # Wan 2.2 TI2V-5B: 48-channel latents of the Wan 2.2 VAE
    if model_type == "t2v" and in_dim == 36 and out_dim == 16:
        model_type = "i2v_noclip"   # Wan 2.2 I2V-A14B: mask + image latents, no CLIP branch
    if any(k.startswith("control_adapter.") for k in official):
        raise CheckpointError(f"{tf.path.name}: a Wan2.1-Fun Control-Camera DiT (control_adapter, {in_dim} input "
                              "channels) is not supported yet; Fun Control (48) and Fun InP (36) are.")
    if model_type == "t2v" and in_dim != 16:
        raise CheckpointError(f"{tf.path.name}: a DiT with {in_dim} input channels and no image "
                              "embedder is not a Wan 2.1 T2V, VACE or Fun model this loader knows.")
    if model_type not in ("t2v", "ti2v") and in_dim != 36 and not fun_control:
        raise CheckpointError(f"{tf.path.name}: an image-conditioned DiT with {in_dim} input channels "
                              "is not supported; Wan 2.1 I2V/FLF2V and Fun InP have 36, Fun Control 48.")
    ref_in_dim = _ref_conv_width(tf, official, shape, dim, patch) if fun_control else 0
    if not fun_control and "ref_conv.weight" in official:
        raise CheckpointError(f"{tf.path.name}: ref_conv (a Fun V1.1 Control reference input) in a DiT with "
                              f"{in_dim} input channels; only Fun Control (48) has it. The file is not supported.")
    vace_layers, vace_in_dim = _vace_config(tf, official, shape, model_type, num_layers, dim, patch)
    cfg = DiTConfig(dim=dim, ffn_dim=ffn_dim, num_layers=num_layers,
                    in_dim=in_dim, out_dim=out_dim, text_dim=text_dim,
                    freq_dim=freq_dim, model_type=model_type,
                    clip_dim=clip_dim, image_pos_len=image_pos_len, patch_size=patch,  # type: ignore[arg-type]
                    vace_layers=vace_layers, vace_in_dim=vace_in_dim,
                    fun="control" if fun_control else "", ref_in_dim=ref_in_dim)
    quant, scales = _quant_and_scales(tf)
    recipes = {o: Recipe((f,)) for o, f in official.items()}
    return Detected("dit", layout, cfg, recipes, quant, scales)


def _ref_conv_width(tf: TensorFile, official: dict[str, str], shape, dim: int, patch: tuple[int, ...]) -> int:
    """Input width of a Fun V1.1 Control ``ref_conv`` (Conv2d, kernel = stride = the spatial
    patch; 16 published), 0 when the file has none (Fun Control V1.0)."""
    if "ref_conv.weight" not in official:
        return 0
    w = shape("ref_conv.weight", 4)
    if w[0] != dim or tuple(w[2:]) != tuple(patch[1:]) or "ref_conv.bias" not in official:
        raise CheckpointError(f"{tf.path.name}: ref_conv.weight has shape {list(w)}; a Fun Control reference conv "
                              f"is [{dim}, 16, {patch[1]}, {patch[2]}] with a bias. The file is corrupt.")
    return w[1]


def _vace_config(tf: TensorFile, official: dict[str, str], shape, model_type: str, num_layers: int, dim: int,
                 patch: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(vace_layers, vace_in_dim) of a VACE DiT, ``((), 96)`` for any other: the layers follow
    from the count of ``vace_blocks.N`` (:func:`wan_core.vace.vace_layers_for`), the input
    width from ``vace_patch_embedding`` (96 published)."""
    from .vace import vace_layers_for

    n = _layer_count(tf.path.name, official, "vace_blocks.", MAX_DIT_BLOCKS, "VACE block")
    if not n and "vace_patch_embedding.weight" not in official:
        return (), 96
    name = tf.path.name
    pe = shape("vace_patch_embedding.weight", 5)
    if not n or model_type != "t2v" or pe[0] != dim or tuple(pe[2:]) != tuple(patch):
        raise CheckpointError(f"{name}: a VACE DiT needs vace_blocks.N, a text-to-video base and a "
                              f"vace_patch_embedding of width {dim} and patch {list(patch)}; found {n} VACE blocks, "
                              f"base {model_type}, vace_patch_embedding {list(pe)}. The file is incomplete or corrupt.")
    try:
        return vace_layers_for(num_layers, n), pe[1]
    except ValueError as err:
        raise CheckpointError(f"{name}: {err}.") from err


# ---------------------------------------------------------------------------------------
# VAE


# diffusers AutoencoderKLWan -> official names: residual-block leaves, and the convs / norms
# outside the stages (the same in the Wan 2.1 and Wan 2.2 VAEs)
_VAE_RES_NAMES = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                  "conv_shortcut": "shortcut"}
_VAE_FIXED_NAMES = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
                    "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0",
                    "encoder.conv_out": "encoder.head.2", "decoder.norm_out": "decoder.head.0",
                    "decoder.conv_out": "decoder.head.2"}


def _vae_common_key_from_diffusers(k: str) -> str | None:
    """Official name of a diffusers Wan VAE key outside the down / up stages (the fixed convs
    and norms, the middle blocks), named alike in Wan 2.1 and Wan 2.2; None for other keys."""
    head, _, leaf = k.rpartition(".")
    if head in _VAE_FIXED_NAMES:
        return f"{_VAE_FIXED_NAMES[head]}.{leaf}"
    m = re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(\w+)\.(.+)$", k)
    if m:
        if m[2] == "attentions":
            return f"{m[1]}.middle.1.{m[4]}.{m[5]}"
        return f"{m[1]}.middle.{2 * int(m[3])}.{_VAE_RES_NAMES.get(m[4], m[4])}.{m[5]}"
    return None


def _vae_key_from_diffusers(k: str, nrb: int) -> str:
    """Official name of a diffusers ``AutoencoderKLWan`` key."""
    common = _vae_common_key_from_diffusers(k)
    if common is not None:
        return common
    res = _VAE_RES_NAMES
    m = re.match(r"^encoder\.down_blocks\.(\d+)\.(\w+)\.(.+)$", k)
    if m:
        return f"encoder.downsamples.{m[1]}.{res.get(m[2], m[2])}.{m[3]}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)$", k)
    if m:
        idx = int(m[1]) * (nrb + 2) + int(m[2])
        return f"decoder.upsamples.{idx}.{res.get(m[3], m[3])}.{m[4]}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", k)
    if m:
        return f"decoder.upsamples.{int(m[1]) * (nrb + 2) + nrb + 1}.{m[2]}"
    return k


def _detect_vae(tf: TensorFile, prefix: str) -> Detected:
    file_keys = [k for k in tf.keys() if not _is_extra(k)]
    bare = {k[len(prefix):] if k.startswith(prefix) else k: k for k in file_keys}
    name = tf.path.name
    diffusers = "decoder.mid_block.resnets.0.norm1.gamma" in bare
    if diffusers:
        # The decoder has num_res_blocks + 1 resnets per up block.
        nrb = _layer_count(name, bare, "decoder.up_blocks.0.resnets.", MAX_VAE_DOWNSAMPLES, "VAE up-block resnet") - 1
        if nrb < 1:
            raise CheckpointError(f"{name}: looks like a diffusers Wan VAE but its first up block has "
                                  "fewer than 2 resnets; the file is incomplete or corrupt.")
        official = {_vae_key_from_diffusers(b, nrb): f for b, f in bare.items()}
    else:
        official = dict(bare)

    def shape(key: str, rank: int) -> tuple[int, ...]:
        return _official_dims(tf, official, key, rank, "a Wan VAE")

    dim = shape("encoder.conv1.weight", 5)[0]
    z_dim = shape("conv2.weight", 5)[0]
    # Walk the encoder: residual blocks give the stage widths, resamples the stage ends.
    entries = _layer_count(name, official, "encoder.downsamples.", MAX_VAE_DOWNSAMPLES, "VAE encoder downsample")
    if entries == 0:
        raise CheckpointError(f"{name}: looks like a Wan VAE but has no encoder.downsamples.* tensors; "
                              "the file is incomplete or corrupt.")
    mults: list[int] = []
    temporal: list[bool] = []
    per_stage = 0
    nrb = 0
    width = 0
    for i in range(entries):
        if f"encoder.downsamples.{i}.residual.2.weight" in official:
            per_stage += 1
            width = shape(f"encoder.downsamples.{i}.residual.2.weight", 5)[0]
            if width % dim:
                raise CheckpointError(f"{name}: VAE stage width {width} is not a multiple of the base "
                                      f"width {dim}; the file is corrupt.")
        elif f"encoder.downsamples.{i}.resample.1.weight" in official and per_stage:
            mults.append(width // dim)
            temporal.append(f"encoder.downsamples.{i}.time_conv.weight" in official)
            nrb, per_stage = per_stage, 0
        else:
            raise CheckpointError(f"{name}: VAE entry encoder.downsamples.{i} is neither a residual block nor "
                                  "a resample after one; the file is incomplete or corrupt.")
    if per_stage == 0:
        raise CheckpointError(f"{name}: the VAE encoder ends in a resample instead of residual blocks; "
                              "the file is incomplete or corrupt.")
    mults.append(width // dim)
    if len(mults) > MAX_VAE_STAGES:
        raise CheckpointError(f"{name}: the VAE encoder has {len(mults)} stages; at most {MAX_VAE_STAGES} "
                              "are supported (Wan 2.1 has 4).")
    cfg = VAEConfig(dim=dim, z_dim=z_dim, dim_mult=tuple(mults), num_res_blocks=nrb or per_stage,
                    temporal_downsample=tuple(temporal))
    quant, scales = _quant_and_scales(tf)
    layout = "diffusers" if diffusers else "official"
    return Detected("vae", layout, cfg, {o: Recipe((f,)) for o, f in official.items()}, quant, scales)


# umT5 / CLIP vision: wan_core.layouts_encoders, imported last because it builds on the
# helpers and types above (used by _detect at call time)
from . import layouts_encoders  # noqa: E402
