"""Tiny Wan DiT / umT5 GGUF files in the real conventions, written with ``gguf.GGUFWriter``.

Conventions followed (city96/ComfyUI-GGUF ``tools/convert.py``, ``tools/lcpp.patch``,
``tools/fix_5d_tensors.py``; llama.cpp ``convert_hf_to_gguf.py`` for T5 encoders):

- DiT: architecture ``wan``, official key names. Quantized: the block Linears
  (``self_attn`` / ``cross_attn`` q k v o k_img v_img, ``ffn.0``, ``ffn.2``); kept unquantized:
  ``modulation``, ``patch_embedding``, ``text_embedding``, ``time_*``, ``img_emb``, ``head``.
  1-D tensors F32, other unquantized ones F16. ``patch_embedding.weight`` (5-D) is F32 either
  5-D as written by fix_5d_tensors.py, or flattened with ``comfy.gguf.orig_shape.<name>``.
  ``modulation`` may be stored 2-D (before llama-quantize's ndim fix) or 3-D.
- umT5: architecture ``t5encoder``, llama.cpp names (``enc.blk.N.attn_q.weight`` ...), the
  relative-position tables F32, the sentencepiece vocabulary in ``tokenizer.ggml.*`` padded
  with ``[PADi]`` UNUSED pieces up to the token-table size.

Quantizers: the ``gguf`` package's for Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1; :func:`quantize_q4_k`
here for Q4_K (the package has none; a plain min/max per 32-value sub-block with 6-bit
scales, valid blocks by construction, checked against ``gguf.quants.dequantize``).
"""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

import factory

_DIT_QUANTIZED = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.([qkvo]|k_img|v_img)|ffn\.[02])\.weight$")
_T5_GGUF = {
    "norm1.weight": "attn_norm.weight", "attn.q.weight": "attn_q.weight", "attn.k.weight": "attn_k.weight",
    "attn.v.weight": "attn_v.weight", "attn.o.weight": "attn_o.weight",
    "pos_embedding.embedding.weight": "attn_rel_b.weight", "norm2.weight": "ffn_norm.weight",
    "ffn.gate.0.weight": "ffn_gate.weight", "ffn.fc1.weight": "ffn_up.weight", "ffn.fc2.weight": "ffn_down.weight",
}


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 ``[..., k*256]`` -> Q4_K blocks ``[..., k*144]`` uint8."""
    shape = x.shape
    b = x.astype(np.float32).reshape(-1, 8, 32)
    n = b.shape[0]
    lo = np.minimum(b.min(-1), 0.0)
    s = (b.max(-1) - lo) / 15
    m = -lo
    d = (s.max(-1) / 63).astype(np.float16)
    dmin = (m.max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.clip(np.rint(s / df), 0, 63), 0).astype(np.uint8)
        mn = np.where(dminf > 0, np.clip(np.rint(m / dminf), 0, 63), 0).astype(np.uint8)
        step = (df * sc)[..., None]
        q = np.where(step > 0, np.rint((b + (dminf * mn)[..., None]) / step), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)
    scales = np.empty((n, 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)    # chunk c: sub-blocks 2c (low), 2c+1 (high)
    out = np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), scales, qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // 256 * 144)


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """float32 -> the stored array of ``qtype`` (F32 / F16 / a block format)."""
    if qtype == "Q4_K":
        return quantize_q4_k(x)
    return gguf.quants.quantize(x.astype(np.float32), T[qtype])


def dequantize(stored: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(stored, T[qtype]).astype(np.float32)


def write_gguf(path: Path, arch: str | None, tensors: dict[str, tuple[np.ndarray, str]],
               fields: dict[str, object] | None = None, orig_shapes: dict[str, tuple[int, ...]] | None = None,
               file_type: int | None = None) -> Path:
    """Write ``{name: (float32 array, GGML type)}`` (quantized here) plus metadata ``fields``."""
    path = Path(path)
    w = gguf.GGUFWriter(path=None, arch=arch or "")
    if arch is None:   # sd.cpp-style file without general.architecture
        w.kv_data[0].pop("general.architecture", None)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if file_type is not None:
        w.add_file_type(file_type)
    for key, shape in (orig_shapes or {}).items():
        w.add_array(f"comfy.gguf.orig_shape.{key}", [int(v) for v in shape])
    for key, value in (fields or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)  # type: ignore[arg-type]
    for name, (data, qtype) in tensors.items():
        stored = quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
        w.add_tensor(name, stored, raw_dtype=T[qtype])
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dit_tensors(sd: dict[str, torch.Tensor], mix: dict[str, str], *, flat_patch: bool = False,
                modulation_2d: bool = True) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, tuple[int, ...]]]:
    """A DiT state dict -> GGUF tensors and orig-shape records. ``mix``: GGML type per Linear
    name fragment ("ffn.2": "Q8_0", ...; key "*" for the rest of the block Linears)."""
    out: dict[str, tuple[np.ndarray, str]] = {}
    orig: dict[str, tuple[int, ...]] = {}
    for name, t in sd.items():
        a = t.float().numpy()
        if _DIT_QUANTIZED.match(name):
            qtype = next((q for frag, q in mix.items() if frag != "*" and f".{frag}." in name), mix["*"])
        elif a.ndim <= 1 or "modulation" in name or a.size <= 1024:
            qtype = "F32"
        elif name == "patch_embedding.weight":
            qtype = "F32"
            if flat_patch:
                orig[name] = tuple(a.shape)
                a = a.reshape(a.shape[0], -1)
        else:
            qtype = "F16"
        if "modulation" in name and modulation_2d:
            a = a.reshape(-1, a.shape[-1])
        out[name] = (a, qtype)
    return out, orig


def write_dit(tmp: Path, variant: str, mix: dict[str, str], name: str | None = None, seed: int = 0,
              **kw) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny DiT GGUF and the float32 state dict it was quantized from."""
    sd = factory.make_checkpoint(f"dit_{variant}", "official", seed=seed)
    tensors, orig = dit_tensors(sd, mix, **kw)
    label = "_".join(sorted(set(mix.values())))
    path = write_gguf(Path(tmp) / (name or f"wan_{variant}_{label}.gguf"), "wan", tensors, orig_shapes=orig)
    return path, sd


def spm_fields(spiece: bytes, vocab: int) -> dict[str, object]:
    """``tokenizer.ggml.*`` as llama.cpp's T5 converter writes them, padded to ``vocab`` rows."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    proto.ParseFromString(spiece)
    sp = SentencePieceProcessor(model_proto=spiece)
    n = sp.get_piece_size()
    tokens = [f"[PAD{i}]" for i in range(vocab)]
    scores = [-10000.0] * vocab
    types = [5] * vocab
    for i in range(n):
        tokens[i] = sp.id_to_piece(i)
        scores[i] = sp.get_score(i)
        types[i] = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else \
            6 if sp.is_byte(i) else 1
    fields: dict[str, object] = {
        "tokenizer.ggml.model": "t5", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
        "tokenizer.ggml.remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces,
        "tokenizer.ggml.precompiled_charsmap": list(proto.normalizer_spec.precompiled_charsmap),
        "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.padding_token_id": sp.pad_id(),
    }
    return fields


def t5_tensors(sd: dict[str, torch.Tensor], qtype: str, embd_qtype: str) -> dict[str, tuple[np.ndarray, str]]:
    out: dict[str, tuple[np.ndarray, str]] = {}
    for name, t in sd.items():
        a = t.float().numpy()
        if name == "token_embedding.weight":
            out["token_embd.weight"] = (a, embd_qtype)
        elif name == "norm.weight":
            out["enc.output_norm.weight"] = (a, "F32")
        else:
            m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
            assert m, name
            leaf = _T5_GGUF[m[2]]
            keep = a.ndim == 1 or leaf == "attn_rel_b.weight"   # llama.cpp never quantizes attn_rel_b
            out[f"enc.blk.{m[1]}.{leaf}"] = (a, "F32" if keep else qtype)
    return out


def write_t5(tmp: Path, qtype: str = "Q8_0", embd_qtype: str = "Q8_0", name: str | None = None, tokenizer: bool = True,
             vocab_rows: int | None = None, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny umT5 GGUF (llama.cpp names, embedded tokenizer) and its float32 state dict."""
    import tiny

    sd = factory.make_checkpoint("t5", "official", seed=seed)
    fields = spm_fields(factory.TINY_SPIECE.read_bytes(), vocab_rows or tiny.TINY_T5.vocab) if tokenizer else {}
    path = write_gguf(Path(tmp) / (name or f"umt5_{qtype}.gguf"), "t5encoder", t5_tensors(sd, qtype, embd_qtype),
                      fields)
    return path, sd


__all__ = ["quantize_q4_k", "quantize", "dequantize", "write_gguf", "dit_tensors", "write_dit", "spm_fields",
           "t5_tensors", "write_t5"]
