"""Tiny random-weight Wan 2.1 checkpoints in every real key layout: the spec the loader obeys.

Independent of ``wan_core`` model code: every official name and shape was written from the
official modules (wan/modules/{model,vae,t5,clip,xlm_roberta}.py of the Wan 2.1 repository,
github.com/Wan-Video/Wan2.1), and
``test_factory.py`` checks full-size key / parameter counts against the published ones and
loads the foreign layouts strictly into diffusers / transformers. Each tensor draws from
its own generator seeded by (seed, name), so a name has the same values in every layout;
nothing is symmetric: Linear / conv weights ~ randn/sqrt(fan_in), biases ~ 0.05 randn, norm
weights and VAE gammas ~ 1 + 0.1 randn, norm biases ~ 0.1 randn, modulation ~ 0.2 randn.

``*_official`` build float32 dicts with bare official names (``official_shapes``: names and
shapes only, cheap at full size); the other layouts are pure functions of that dict;
``dequantize_reference`` gives the float32 values a loader must produce from an fp8 dict.
``write_checkpoint(tmp_path, kind, layout, **opts)`` writes one file, ``make_checkpoint``
returns its dict, ``expected_official`` the float32 dict a correct loader produces from it
(module-contract names: bare official; CLIP = visual tower without ``visual.``):

  kind             layout          file          content
  dit (variant     official        .safetensors  bare official names
   t2v/i2v/flf2v,  comfy_prefixed  .safetensors  ``model.diffusion_model.`` + official
   or dit_t2v,     diffusers       .safetensors  diffusers WanTransformer3DModel names
   dit_i2v,        fp8_e4m3fn      .safetensors  Kijai rule: KIJAI_KEEP bf16, rest e4m3fn
   dit_flf2v)      fp8_e5m2        .safetensors  same, e5m2
                   scaled_fp8      .safetensors  ComfyUI scaled fp8 (scale_weight, scaled_fp8)
  vae              official        .pth          Wan2.1_VAE.pth names (ext=".safetensors"
                                                 gives wan_2.1_vae.safetensors)
                   diffusers       .safetensors  AutoencoderKLWan names
  t5               official        .pth          models_t5_umt5-xxl-enc names (or .safetensors)
                   fp8_e4m3fn      .safetensors  official names, T5_KEEP bf16, rest e4m3fn
                   hf              .safetensors  HF UMT5 names, no tokenizer
                   hf_with_spiece  .safetensors  HF UMT5 names + ``spiece_model`` (uint8)
                   hf_scaled_fp8   .safetensors  hf_with_spiece, 7 Linears/layer scaled fp8
  clip             official        .pth          full file: log_scale, visual.*, textual.*
                   hf              .safetensors  CLIPVisionModelWithProjection (clip_vision_h)

Options: ``cfg`` (default: the tiny config), ``seed`` (0), ``dtype`` (float32; cast of the
float tensors of non-fp8 layouts), ``prefix`` (dit official / fp8 / scaled: add
``model.diffusion_model.``), ``with_scale_input``, ``keep`` (fp8 keep fragments), ``spiece``
(bytes; TINY_SPIECE), ``with_textual`` (clip), ``ext``, ``name``, ``metadata`` (safetensors).
"""
from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from wan_core.configs import CLIPVisionConfig, DiTConfig, T5Config, VAEConfig

TINY_SPIECE = Path(__file__).resolve().parent / "data" / "tiny_spiece.model"
PREFIX = "model.diffusion_model."
KIJAI_KEEP: tuple[str, ...] = ("norm", "head", "bias", "time_in", "vector_in",
                               "patch_embedding", "time_", "img_emb", "modulation")
T5_KEEP: tuple[str, ...] = ("norm", "pos_embedding", "token_embedding")

Tensors = dict[str, torch.Tensor]
Shape = tuple[int, ...]
# (name, shape, (mean, std)); std None means 1/sqrt(fan_in) with fan_in = prod(shape[1:]).
Spec = list[tuple[str, Shape, tuple[float, float | None]]]
FAN: tuple[float, float | None] = (0.0, None)
BIAS = (0.0, 0.05)
NORM_W = (1.0, 0.1)
NORM_B = (0.0, 0.1)


def _one_thread(fn: Callable) -> Callable:
    """One intra-op thread: on tiny tensors a busy 2-core pool is 10-50x slower than none."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)
    return wrapper


# ---------------------------------------------------------------- official specs

def _linear(name: str, n_in: int, n_out: int, bias: bool = True) -> Spec:
    out: Spec = [(f"{name}.weight", (n_out, n_in), FAN)]
    return out + [(f"{name}.bias", (n_out,), BIAS)] if bias else out


def _layernorm(name: str, dim: int, bias: bool = True) -> Spec:
    out: Spec = [(f"{name}.weight", (dim,), NORM_W)]
    return out + [(f"{name}.bias", (dim,), NORM_B)] if bias else out


def _conv(name: str, n_in: int, n_out: int, kernel: Shape) -> Spec:
    return [(f"{name}.weight", (n_out, n_in, *kernel), FAN), (f"{name}.bias", (n_out,), BIAS)]


def _dit_spec(cfg: DiTConfig) -> Spec:
    """WanModel state dict: parameters of a module before its children, as torch orders it."""
    d, image = cfg.dim, cfg.model_type in ("i2v", "flf2v")
    if cfg.model_type == "flf2v" and cfg.image_pos_len <= 0:
        raise ValueError("flf2v needs cfg.image_pos_len > 0 (514 in the published model)")
    s: Spec = [("patch_embedding.weight", (d, cfg.in_dim, *cfg.patch_size), FAN),
               ("patch_embedding.bias", (d,), BIAS)]
    s += _linear("text_embedding.0", cfg.text_dim, d) + _linear("text_embedding.2", d, d)
    s += _linear("time_embedding.0", cfg.freq_dim, d) + _linear("time_embedding.2", d, d)
    s += _linear("time_projection.1", d, 6 * d)
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        s.append((p + "modulation", (1, 6, d), (0.0, 0.2)))
        for attn in ("self_attn", "cross_attn"):
            for n in "qkvo":
                s += _linear(f"{p}{attn}.{n}", d, d)
            s += _layernorm(f"{p}{attn}.norm_q", d, bias=False)   # WanRMSNorm: weight only
            s += _layernorm(f"{p}{attn}.norm_k", d, bias=False)
            if attn == "cross_attn" and image:
                s += _linear(f"{p}cross_attn.k_img", d, d) + _linear(f"{p}cross_attn.v_img", d, d)
                s += _layernorm(f"{p}cross_attn.norm_k_img", d, bias=False)
            if attn == "self_attn":
                s += _layernorm(f"{p}norm3", d)                   # the only affine block norm
        s += _linear(f"{p}ffn.0", d, cfg.ffn_dim) + _linear(f"{p}ffn.2", cfg.ffn_dim, d)
    s.append(("head.modulation", (1, 2, d), (0.0, 0.2)))
    s += _linear("head.head", d, cfg.out_dim * math.prod(cfg.patch_size))
    if image:
        c = cfg.clip_dim
        if cfg.model_type == "flf2v":
            s.append(("img_emb.emb_pos", (1, cfg.image_pos_len, c), (0.0, 0.1)))
        s += _layernorm("img_emb.proj.0", c) + _linear("img_emb.proj.1", c, c)
        s += _linear("img_emb.proj.3", c, d) + _layernorm("img_emb.proj.4", d)
    if getattr(cfg, "ref_in_dim", 0):   # Fun V1.1 Control (VideoX-Fun wan_transformer3d.py: Conv2d, 2x2 patch)
        s += _conv("ref_conv", cfg.ref_in_dim, d, tuple(cfg.patch_size[1:]))
    return s


def _vae_res(p: str, cin: int, cout: int) -> Spec:
    s: Spec = [(p + "residual.0.gamma", (cin, 1, 1, 1), NORM_W)]
    s += _conv(p + "residual.2", cin, cout, (3, 3, 3))
    s += [(p + "residual.3.gamma", (cout, 1, 1, 1), NORM_W)]
    s += _conv(p + "residual.6", cout, cout, (3, 3, 3))
    return s + (_conv(p + "shortcut", cin, cout, (1, 1, 1)) if cin != cout else [])


def _vae_attn(p: str, c: int) -> Spec:
    return ([(p + "norm.gamma", (c, 1, 1), NORM_W)] + _conv(p + "to_qkv", c, 3 * c, (1, 1))
            + _conv(p + "proj", c, c, (1, 1)))


def _vae_resample(p: str, c: int, mode: str) -> Spec:
    if mode.startswith("up"):
        s = _conv(p + "resample.1", c, c // 2, (3, 3))            # nearest x2 then conv C -> C/2
        return s + (_conv(p + "time_conv", c, 2 * c, (3, 1, 1)) if mode == "up3d" else [])
    s = _conv(p + "resample.1", c, c, (3, 3))                     # zero-pad then stride-2 conv
    return s + (_conv(p + "time_conv", c, c, (3, 1, 1)) if mode == "down3d" else [])


def _vae_spec(cfg: VAEConfig) -> Spec:
    mult, z, nres = tuple(cfg.dim_mult), cfg.z_dim, cfg.num_res_blocks
    last = len(mult) - 1
    dims = [cfg.dim * u for u in (1, *mult)]
    s: Spec = _conv("encoder.conv1", 3, dims[0], (3, 3, 3))
    idx = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(nres):
            s += _vae_res(f"encoder.downsamples.{idx}.", cin, cout)
            cin, idx = cout, idx + 1
        if i != last:
            s += _vae_resample(f"encoder.downsamples.{idx}.", cout,
                               "down3d" if cfg.temporal_downsample[i] else "down2d")
            idx += 1
    c = dims[-1]
    s += _vae_res("encoder.middle.0.", c, c) + _vae_attn("encoder.middle.1.", c)
    s += _vae_res("encoder.middle.2.", c, c)
    s += [("encoder.head.0.gamma", (c, 1, 1, 1), NORM_W)] + _conv("encoder.head.2", c, 2 * z, (3, 3, 3))
    s += _conv("conv1", 2 * z, 2 * z, (1, 1, 1)) + _conv("conv2", z, z, (1, 1, 1))
    dims = [cfg.dim * u for u in (mult[-1], *mult[::-1])]
    up_t = tuple(cfg.temporal_downsample)[::-1]
    c = dims[0]
    s += _conv("decoder.conv1", z, c, (3, 3, 3))
    s += _vae_res("decoder.middle.0.", c, c) + _vae_attn("decoder.middle.1.", c)
    s += _vae_res("decoder.middle.2.", c, c)
    idx = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:        # the previous stage ended in an upsampler that halved the channels
            cin //= 2
        for _ in range(nres + 1):
            s += _vae_res(f"decoder.upsamples.{idx}.", cin, cout)
            cin, idx = cout, idx + 1
        if i != last:
            s += _vae_resample(f"decoder.upsamples.{idx}.", cout, "up3d" if up_t[i] else "up2d")
            idx += 1
    c = dims[-1]
    s += [("decoder.head.0.gamma", (c, 1, 1, 1), NORM_W)] + _conv("decoder.head.2", c, 3, (3, 3, 3))
    return s


def _t5_spec(cfg: T5Config) -> Spec:
    head_dim = cfg.dim_attn // cfg.num_heads
    rel = (cfg.num_buckets, cfg.num_heads)
    s: Spec = [("token_embedding.weight", (cfg.vocab, cfg.dim), (0.0, 1.0))]
    if cfg.shared_pos:
        s.append(("pos_embedding.embedding.weight", rel, (0.0, 0.5)))
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        s += _layernorm(p + "norm1", cfg.dim, bias=False)
        # T5 attention has no 1/sqrt(d) scaling; q carries it so the logits stay O(1).
        s.append((p + "attn.q.weight", (cfg.dim_attn, cfg.dim), (0.0, (cfg.dim * head_dim) ** -0.5)))
        for n in "kv":
            s += _linear(f"{p}attn.{n}", cfg.dim, cfg.dim_attn, bias=False)
        s += _linear(p + "attn.o", cfg.dim_attn, cfg.dim, bias=False)
        s += _layernorm(p + "norm2", cfg.dim, bias=False)
        s += _linear(p + "ffn.gate.0", cfg.dim, cfg.dim_ffn, bias=False)
        s += _linear(p + "ffn.fc1", cfg.dim, cfg.dim_ffn, bias=False)
        s += _linear(p + "ffn.fc2", cfg.dim_ffn, cfg.dim, bias=False)
        if not cfg.shared_pos:
            s.append((p + "pos_embedding.embedding.weight", rel, (0.0, 0.5)))
    return s + _layernorm("norm", cfg.dim, bias=False)


def _clip_visual_spec(cfg: CLIPVisionConfig) -> Spec:
    w, p = cfg.width, cfg.patch_size
    s: Spec = [("visual.cls_embedding", (1, 1, w), (0.0, 0.5)),
               ("visual.pos_embedding", (1, cfg.num_tokens, w), (0.0, 0.5)),
               ("visual.head", (w, cfg.out_dim), (0.0, w ** -0.5)),   # used as x @ head
               ("visual.patch_embedding.weight", (w, 3, p, p), FAN)]  # no bias (pre_norm)
    s += _layernorm("visual.pre_norm", w)
    for i in range(cfg.num_layers):
        b = f"visual.transformer.{i}."
        s += _layernorm(b + "norm1", w) + _linear(b + "attn.to_qkv", w, 3 * w)
        s += _linear(b + "attn.proj", w, w) + _layernorm(b + "norm2", w)
        s += _linear(b + "mlp.0", w, cfg.mlp_dim) + _linear(b + "mlp.2", cfg.mlp_dim, w)
    return s + _layernorm("visual.post_norm", w)


def _clip_textual_spec(out_dim: int, dim: int = 32) -> Spec:
    """A few XLM-R tensors (real names, tiny shapes): the loader must ignore ``textual.*``."""
    s: Spec = [("textual.token_embedding.weight", (64, dim), (0.0, 1.0)),
               ("textual.pos_embedding.weight", (16, dim), (0.0, 1.0))]
    s += _linear("textual.blocks.0.attn.q", dim, dim) + _layernorm("textual.blocks.0.norm1", dim)
    return s + _linear("textual.head.0", dim, out_dim, bias=False)


def _clip_spec(cfg: CLIPVisionConfig, with_textual: bool = True) -> Spec:
    s: Spec = [("log_scale", (), (math.log(1 / 0.07), 0.1))]
    return s + _clip_visual_spec(cfg) + (_clip_textual_spec(cfg.out_dim) if with_textual else [])


_SPECS: dict[str, Callable[..., Spec]] = {"dit": _dit_spec, "vae": _vae_spec, "t5": _t5_spec,
                                          "clip": _clip_spec}


def official_shapes(kind: str, cfg, **kw) -> dict[str, Shape]:
    """Official names and shapes without allocating (fine for full-size configs)."""
    return {name: shape for name, shape, _ in _SPECS[kind](cfg, **kw)}


@_one_thread
def _materialize(spec: Spec, seed: int) -> Tensors:
    out = {}
    for name, shape, (mean, std) in spec:
        g = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**62)
        if std is None:
            std = math.prod(shape[1:]) ** -0.5
        t = torch.randn(shape, generator=g).mul_(std)    # in place: allocation dominates on CPU
        out[name] = t.add_(mean) if mean else t
    return out


def dit_official(cfg: DiTConfig, seed: int = 0) -> Tensors:
    """WanModel state dict (t2v; i2v adds img_emb.proj.* and k_img/v_img/norm_k_img; flf2v
    adds img_emb.emb_pos ``[1, image_pos_len, clip_dim]``), float32, bare names."""
    return _materialize(_dit_spec(cfg), seed)


def vae_official(cfg: VAEConfig, seed: int = 0) -> Tensors:
    """``Wan2.1_VAE.pth`` layout (encoder.*, conv1.*, conv2.*, decoder.*), float32."""
    return _materialize(_vae_spec(cfg), seed)


def t5_official(cfg: T5Config, seed: int = 0) -> Tensors:
    """``models_t5_umt5-xxl-enc-*.pth`` layout, float32."""
    return _materialize(_t5_spec(cfg), seed)


def clip_official(cfg: CLIPVisionConfig, seed: int = 0, with_textual: bool = True) -> Tensors:
    """Full official CLIP file: 0-d ``log_scale``, ``visual.*``, optionally a tiny ``textual.*``."""
    return _materialize(_clip_spec(cfg, with_textual), seed)


# ---------------------------------------------------------------- layouts (pure renames)

def with_prefix(sd: Tensors, prefix: str = PREFIX) -> Tensors:
    """ComfyUI full-checkpoint naming (``model.diffusion_model.blocks.0...``)."""
    return {prefix + k: v for k, v in sd.items()}


def dit_to_diffusers(sd: Tensors) -> Tensors:
    """diffusers WanTransformer3DModel names via diffusers' own single-file converter.

    diffusers 0.42 leaves ``img_emb.emb_pos`` (FLF2V) unconverted; its model calls it
    ``condition_embedder.image_embedder.pos_embed``, so that one key is renamed here.
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    out = convert_wan_transformer_to_diffusers(dict(sd))        # it pops from its argument
    if "img_emb.emb_pos" in out:
        out["condition_embedder.image_embedder.pos_embed"] = out.pop("img_emb.emb_pos")
    return out


def vae_to_diffusers(sd: Tensors) -> Tensors:
    """diffusers AutoencoderKLWan names via ``convert_wan_vae_to_diffusers``."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers(dict(sd))


def _rename(key: str, table: list[tuple[str, str]], what: str) -> str:
    """First (regex prefix, template) of ``table`` matching ``key``; the rest is kept."""
    for pat, tpl in table:
        if m := re.match(pat, key):
            return m.expand(tpl) + key[m.end():]
    raise KeyError(f"not an official {what} key: {key}")


_T5_HF = [
    (r"token_embedding\.", "shared."),
    (r"norm\.", "encoder.final_layer_norm."),
    (r"pos_embedding\.embedding\.",             # shared_pos=True (T5, not umT5): block 0 only
     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias."),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"blocks\.(\d+)\.attn\.", r"encoder.block.\1.layer.0.SelfAttention."),
    (r"blocks\.(\d+)\.pos_embedding\.embedding\.",
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (r"blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
]


def t5_to_hf(sd: Tensors, spiece: bytes | None = None) -> Tensors:
    """ComfyUI / HF UMT5 names; HF ``wi_0`` is the GELU branch (official ``ffn.gate.0``).

    With ``spiece``, adds ``spiece_model``: uint8 tensor of the serialized sentencepiece model.
    """
    out = {_rename(k, _T5_HF, "umT5"): v for k, v in sd.items()}
    if spiece is not None:
        out["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    return out


_CLIP_HF = [
    (r"patch_embedding\.", "vision_model.embeddings.patch_embedding."),
    (r"pre_norm\.", "vision_model.pre_layrnorm."),                        # sic
    (r"post_norm\.", "vision_model.post_layernorm."),
    (r"transformer\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"transformer\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"transformer\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.out_proj."),
    (r"transformer\.(\d+)\.mlp\.0\.", r"vision_model.encoder.layers.\1.mlp.fc1."),
    (r"transformer\.(\d+)\.mlp\.2\.", r"vision_model.encoder.layers.\1.mlp.fc2."),
]


def clip_to_hf(sd: Tensors) -> Tensors:
    """HF CLIPVisionModelWithProjection names (ComfyUI ``clip_vision_h``) from the official
    file (``visual.*``; ``log_scale`` / ``textual.*`` dropped) or a bare visual-tower dict."""
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    out = {}
    for k, v in sd.items():
        if k == "cls_embedding":
            out["vision_model.embeddings.class_embedding"] = v.reshape(-1).clone()
        elif k == "pos_embedding":
            out["vision_model.embeddings.position_embedding.weight"] = v[0].clone()
        elif k == "head":
            out["visual_projection.weight"] = v.t().contiguous()
        elif m := re.fullmatch(r"transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)", k):
            for name, part in zip("qkv", v.chunk(3, dim=0)):   # view(b,s,3,n,d): q rows first
                out[f"vision_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part.clone()
        else:
            out[_rename(k, _CLIP_HF, "CLIP visual")] = v
    return out


# ---------------------------------------------------------------- fp8

def _cast(sd: Tensors, dtype: torch.dtype) -> Tensors:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _fp8(x: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    big = torch.finfo(fmt).max     # fp8 casts do not saturate: clamp first
    return x.float().clamp(-big, big).to(fmt)


@_one_thread
def to_fp8(sd: Tensors, fmt: torch.dtype = torch.float8_e4m3fn,
           keep: tuple[str, ...] = KIJAI_KEEP) -> Tensors:
    """Plain fp8 (Kijai / Comfy-Org ``*_fp8_e4m3fn``): float tensors whose name contains a
    ``keep`` fragment go to bf16, the rest to ``fmt``; non-float tensors pass unchanged."""
    return {k: v if not v.is_floating_point() else
            v.to(torch.bfloat16) if any(f in k for f in keep) else _fp8(v, fmt)
            for k, v in sd.items()}


_BLOCK = re.compile(r"(^|\.)(blocks|block)\.\d+\.")
_NOT_LINEAR = ("norm", "embedding", "relative_attention_bias", "modulation", "scale_shift")


def is_scaled_linear(name: str, t: torch.Tensor) -> bool:
    """The ComfyUI scaled-fp8 rule on names: 2-D ``.weight`` inside ``blocks.N`` /
    ``block.N`` that is no norm or embedding. DiT: self/cross_attn q,k,v,o,k_img,v_img and
    ffn.0/2 (any layout); umT5: the 7 Linears per layer (official or HF names)."""
    return (name.endswith(".weight") and t.dim() == 2 and t.is_floating_point()
            and _BLOCK.search(name) is not None and not any(f in name for f in _NOT_LINEAR))


@_one_thread
def to_scaled_fp8(sd: Tensors, fmt: torch.dtype = torch.float8_e4m3fn,
                  with_scale_input: bool = False) -> Tensors:
    """ComfyUI scaled fp8: each block Linear weight -> ``(W / s).to(fmt)`` with float32 0-d
    ``<layer>.scale_weight`` = absmax / fp8 max (and ``<layer>.scale_input`` = 1.0 when
    asked); marker ``scaled_fp8`` = empty ``fmt`` tensor; other float tensors bf16. Apply
    ``with_prefix`` afterwards for a prefixed file (the marker is prefix-relative)."""
    big = torch.finfo(fmt).max
    out: Tensors = {}
    for k, v in sd.items():
        if is_scaled_linear(k, v):
            layer = k[: -len(".weight")]
            amax = v.float().abs().max()
            scale = (amax / big if amax > 0 else torch.tensor(1.0)).to(torch.float32).reshape(())
            out[k] = _fp8(v.float() / scale, fmt)
            out[layer + ".scale_weight"] = scale
            if with_scale_input:
                out[layer + ".scale_input"] = torch.tensor(1.0, dtype=torch.float32)
        else:
            out[k] = v.to(torch.bfloat16) if v.is_floating_point() else v
    out["scaled_fp8"] = torch.empty(0, dtype=fmt)
    return out


@_one_thread
def dequantize_reference(sd: Tensors) -> Tensors:
    """Float32 values a correct loader produces, names unchanged: ``W.float() * scale_weight``
    for scaled weights, ``.float()`` for other float tensors; ``scale_*`` and ``scaled_fp8``
    keys dropped; non-float tensors (``spiece_model``) kept as they are."""
    out = {}
    for k, v in sd.items():
        if k == "scaled_fp8" or k.endswith((".scaled_fp8", ".scale_weight", ".scale_input")):
            continue
        if not v.is_floating_point():
            out[k] = v
            continue
        scale = sd.get(k[: -len("weight")] + "scale_weight") if k.endswith(".weight") else None
        out[k] = v.float() * scale.float() if scale is not None else v.float()
    return out


# ---------------------------------------------------------------- files

def save_safetensors(sd: Tensors, path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (views, tied weights)
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def save_pth(sd: Tensors, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)       # zip format (torch default)
    return path


Step = Callable[[Tensors], Tensors]

# (kind, layout) -> default extension; write_checkpoint covers exactly these.
LAYOUTS: dict[tuple[str, str], str] = {
    ("dit", "official"): ".safetensors", ("dit", "comfy_prefixed"): ".safetensors",
    ("dit", "diffusers"): ".safetensors", ("dit", "fp8_e4m3fn"): ".safetensors",
    ("dit", "fp8_e5m2"): ".safetensors", ("dit", "scaled_fp8"): ".safetensors",
    ("vae", "official"): ".pth", ("vae", "diffusers"): ".safetensors",
    ("t5", "official"): ".pth", ("t5", "fp8_e4m3fn"): ".safetensors", ("t5", "hf"): ".safetensors",
    ("t5", "hf_with_spiece"): ".safetensors", ("t5", "hf_scaled_fp8"): ".safetensors",
    ("clip", "official"): ".pth", ("clip", "hf"): ".safetensors",
}


def _steps(kind: str, layout: str, opts: dict) -> tuple[Step, Step, Step]:
    """(rename, lossy, post-rename) of one layout; renames keep the tensor objects."""
    if (kind, layout) not in LAYOUTS:
        raise ValueError(f"unknown checkpoint {kind!r} / {layout!r}; known: {sorted(LAYOUTS)}")
    same: Step = dict
    pre: Step = with_prefix if opts.get("prefix") else same
    dtype = opts.get("dtype", torch.float32)
    spiece = opts.get("spiece") or TINY_SPIECE.read_bytes()
    keep = opts.get("keep", T5_KEEP if kind == "t5" else KIJAI_KEEP)
    scale_in = opts.get("with_scale_input", False)
    rename = {("dit", "official"): pre, ("dit", "comfy_prefixed"): with_prefix,
              ("dit", "diffusers"): dit_to_diffusers, ("dit", "fp8_e4m3fn"): pre,
              ("dit", "fp8_e5m2"): pre, ("vae", "diffusers"): vae_to_diffusers,
              ("t5", "hf"): t5_to_hf, ("t5", "hf_with_spiece"): lambda sd: t5_to_hf(sd, spiece),
              ("t5", "hf_scaled_fp8"): lambda sd: t5_to_hf(sd, spiece),
              ("clip", "hf"): clip_to_hf}.get((kind, layout), same)
    if layout.startswith("fp8_"):
        fmt = getattr(torch, "float8_" + layout[4:])
        return rename, lambda sd: to_fp8(sd, fmt, keep), same
    if layout.endswith("scaled_fp8"):
        post = pre if kind == "dit" else same       # the scaled_fp8 marker is prefix-relative
        return rename, lambda sd: to_scaled_fp8(sd, with_scale_input=scale_in), post
    return rename, lambda sd: _cast(sd, dtype), same


def _kind_variant(kind: str, opts: dict) -> tuple[str, str]:
    if kind.startswith("dit_"):
        return "dit", kind[4:]
    return kind, (opts.get("variant", "t2v") if kind == "dit" else "")


def _official(kind: str, variant: str, opts: dict) -> Tensors:
    import tiny

    default = {"t2v": tiny.TINY_DIT_T2V, "i2v": tiny.TINY_DIT_I2V, "flf2v": tiny.TINY_DIT_FLF2V,
               "vae": tiny.TINY_VAE, "t5": tiny.TINY_T5, "clip": tiny.TINY_CLIP}
    cfg = opts.get("cfg") or default[variant or kind]
    seed = opts.get("seed", 0)
    if kind == "clip":
        return clip_official(cfg, seed, opts.get("with_textual", True))
    return {"dit": dit_official, "vae": vae_official, "t5": t5_official}[kind](cfg, seed)


@_one_thread
def make_checkpoint(kind: str, layout: str, **opts) -> Tensors:
    """The state dict ``write_checkpoint`` would write (see the module docstring)."""
    kind, variant = _kind_variant(kind, opts)
    rename, lossy, post = _steps(kind, layout, opts)
    return post(lossy(rename(_official(kind, variant, opts))))


@_one_thread
def expected_official(kind: str, layout: str, **opts) -> Tensors:
    """Float32 state dict a correct loader produces from that checkpoint, in module-contract
    names: bare official names; for CLIP the visual tower without ``visual.``."""
    kind, variant = _kind_variant(kind, opts)
    official = _official(kind, variant, opts)
    if kind == "clip":
        # clip_to_hf splits / transposes, so no name map; the only loss is an elementwise cast
        dtype = opts.get("dtype", torch.float32)
        return {k[7:]: v.to(dtype).float() for k, v in official.items() if k.startswith("visual.")}
    rename, lossy, post = _steps(kind, layout, opts)
    renamed = rename(official)
    by_id = {id(v): k for k, v in official.items()}
    names = post({k: by_id[id(v)] for k, v in renamed.items() if id(v) in by_id})
    deq = dequantize_reference(post(lossy(renamed)))
    return {names[k]: v for k, v in deq.items() if k in names}


def write_checkpoint(tmp_path: str | Path, kind: str, layout: str, **opts) -> Path:
    """Write one tiny checkpoint file under ``tmp_path`` and return its path."""
    sd = make_checkpoint(kind, layout, **opts)      # raises on an unknown (kind, layout)
    kind_, variant = _kind_variant(kind, opts)
    ext = opts.get("ext", LAYOUTS[(kind_, layout)])
    name = opts.get("name") or f"{kind_}{'_' + variant if variant else ''}_{layout}{ext}"
    path = Path(tmp_path) / name
    if path.suffix == ".safetensors":
        return save_safetensors(sd, path, opts.get("metadata"))
    return save_pth(sd, path)


__all__ = ["TINY_SPIECE", "PREFIX", "KIJAI_KEEP", "T5_KEEP", "LAYOUTS", "official_shapes",
           "dit_official", "vae_official", "t5_official", "clip_official", "with_prefix",
           "dit_to_diffusers", "vae_to_diffusers", "t5_to_hf", "clip_to_hf", "to_fp8",
           "to_scaled_fp8", "is_scaled_linear", "dequantize_reference", "save_safetensors",
           "save_pth", "make_checkpoint", "expected_official", "write_checkpoint"]


# ---------------------------------------------------------------- hostile files

def raw_safetensors(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """The bytes of a safetensors file with any header, valid or not (tests of hostile files).

    ``header``: a dict (serialised as JSON) or raw bytes; ``header_len``: the length written
    in the 8-byte prefix (default: the real one).
    """
    import json
    import struct

    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if header_len is None else header_len
    return struct.pack("<Q", n) + body + data


__all__ += ["raw_safetensors"]
