"""GGUF files (ComfyUI-GGUF / llama.cpp) as a :class:`~wan_core.files.TensorFile`.

The container is parsed by the maintained ``gguf`` package (``gguf.GGUFReader``): only its
header and tensor table are used, then the memory map is dropped and each tensor is read
with plain ``readinto``, like a safetensors file (one copy in RAM, no mapped pages).

What a GGUF holds, and how it is presented:

- names: kept as in the file. Wan DiT files keep the official names; umT5 files use the
  llama.cpp T5 names (``enc.blk.N.attn_q.weight``, ``token_embd.weight``), which
  :mod:`wan_core.layouts` maps (the one place keys are converted);
- shapes: GGUF stores them innermost first; :meth:`GGUFFile.shape` gives torch order, or the
  true shape ComfyUI-GGUF's converter records in ``comfy.gguf.orig_shape.<name>`` for a
  tensor it stored reshaped (GGUF tensors have at most 4 dims in ggml);
- data: F32 / F16 / BF16 tensors read as those dtypes; the GGML block formats of
  :data:`wan_core.quant.FORMATS` read dequantized to float32 by :meth:`GGUFFile.read` (what
  generic tools see) or as raw blocks by :meth:`GGUFFile.read_blocks` (what the loader keeps:
  :func:`place_quantized` builds :class:`~wan_core.quant.QuantLinear` /
  :class:`~wan_core.quant.QuantEmbedding` layers around them);
- tokenizer: a umT5 file made by llama.cpp carries its sentencepiece vocabulary in
  ``tokenizer.ggml.*`` (pieces, scores, types, normalizer flags, the precompiled charsmap).
  It is rebuilt into a sentencepiece ``ModelProto`` (needs ``protobuf``) and exposed as the
  uint8 tensor ``spiece_model``, the key ComfyUI's own text-encoder files use.

Refused with a :class:`~wan_core.files.CheckpointError` at open time, before any weight is
read: a file the reader cannot parse (truncated, corrupt), another architecture (Flux,
HunyuanVideo, an LLM, ...), a tensor type outside the supported list (IQ*, TQ*, ...), a
shape record that does not match its tensor, and a tokenizer whose vocabulary size differs
from the token table.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .files import MAX_DIM, MAX_RANK, MAX_TENSORS, CheckpointError, TensorFile, TensorInfo, shown
from .quant import FLOAT_TYPES, FORMATS, QuantEmbedding, QuantLinear, blocks_finite, dequantize

__all__ = ["GGUFFile", "GGUFTensor", "open_gguf", "place_quantized", "ACCEPTED_ARCHITECTURES"]

log = logging.getLogger("wan_core")

#: ``general.architecture`` values loaded here (``None``: files without one are judged by their keys).
ACCEPTED_ARCHITECTURES = ("wan", "t5", "t5encoder")
_OTHER_FAMILIES = {
    "flux": "Flux", "hyvid": "HunyuanVideo", "sd1": "Stable Diffusion 1.x", "sdxl": "SDXL",
    "sd3": "Stable Diffusion 3", "aura": "AuraFlow", "ltxv": "LTX-Video", "hidream": "HiDream",
    "cosmos": "Cosmos", "lumina2": "Lumina 2", "qwen_image": "Qwen-Image", "chroma": "Chroma",
}
_ORIG_SHAPE = "comfy.gguf.orig_shape."
# Wan tensors with a leading size-1 dim ([1, 6, dim] modulation, [1, 514, 1280] FLF2V emb_pos).
_LEADING_ONE = ("modulation", "img_emb.emb_pos")
_PAD_PIECE = re.compile(r"^\[PAD\d+\]$")   # llama.cpp pads the vocabulary to the table size with these
_SPM_UNUSED = 5                            # sentencepiece / gguf token type UNUSED
_SPM_BYTE = 6
TOKENIZER_KEY = "spiece_model"


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its GGML type and where its bytes are."""

    name: str
    ggml_type: str                 # "Q4_K", "F16", ...
    shape: tuple[int, ...]         # torch order (true shape)
    row: int                       # GGML row length (innermost stored dim)
    offset: int                    # absolute byte offset
    nbytes: int

    @property
    def quantized(self) -> bool:
        return self.ggml_type in FORMATS


class GGUFFile(TensorFile):
    """A GGUF file opened for reading; see the module docstring. Use :func:`open_gguf`."""

    def __init__(self, path: Path, tensors: dict[str, GGUFTensor], metadata: dict[str, str],
                 spiece: bytes | None = None) -> None:
        infos = {}
        for t in tensors.values():
            dtype = FLOAT_TYPES[t.ggml_type][1] if t.ggml_type in FLOAT_TYPES else torch.float32
            infos[t.name] = TensorInfo(t.name, dtype, t.shape, t.offset, t.nbytes, path)
        if spiece is not None:
            infos[TOKENIZER_KEY] = TensorInfo(TOKENIZER_KEY, torch.uint8, (len(spiece),), 0, len(spiece), None)
        super().__init__(path, infos, metadata)
        self.tensors = tensors
        self._spiece = spiece
        self._fh = None

    # -- GGUF specifics ------------------------------------------------------------------
    def ggml_type(self, name: str) -> str:
        """GGML type of ``name`` ("Q4_K", "F32", ...; "U8" for the rebuilt tokenizer)."""
        return self.tensors[name].ggml_type if name in self.tensors else "U8"

    def is_quantized(self, name: str) -> bool:
        return name in self.tensors and self.tensors[name].quantized

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _raw(self, t: GGUFTensor) -> torch.Tensor:
        out = torch.empty(t.nbytes, dtype=torch.uint8)
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._fh.seek(t.offset)
        got = self._fh.readinto(memoryview(out.numpy()))
        if got != t.nbytes:
            raise CheckpointError(f"{self.path.name}: the file ended while reading '{shown(t.name)}' ({got} of "
                                  f"{t.nbytes} bytes). The file is truncated; download it again.")
        return out

    def read_blocks(self, name: str) -> tuple[torch.Tensor, str, int]:
        """Raw blocks of a quantized tensor: (uint8 ``[rows, row_bytes]``, GGML type, row length)."""
        t = self.tensors[name]
        fmt = FORMATS[t.ggml_type]
        return self._raw(t).view(-1, fmt.row_bytes(t.row)), t.ggml_type, t.row

    def read(self, name: str) -> torch.Tensor:
        """One tensor as a CPU tensor of its true shape: F32/F16/BF16 as stored, quantized
        ones dequantized to float32, ``spiece_model`` as uint8 bytes."""
        if name == TOKENIZER_KEY and self._spiece is not None:
            return torch.frombuffer(bytearray(self._spiece), dtype=torch.uint8)
        t = self.tensors[name]
        raw = self._raw(t)
        if t.quantized:
            return dequantize(raw.view(-1, FORMATS[t.ggml_type].row_bytes(t.row)), t.ggml_type, t.shape)
        return raw.view(FLOAT_TYPES[t.ggml_type][1]).reshape(t.shape)

    def quant_groups(self) -> dict[str, dict[str, int]]:
        """GGML types per tensor group: ``{"attention": {"Q4_K": 60, "Q6_K": 20, "F32": 80}, ...}``."""
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors.values():
            group = _group(t.name)
            out.setdefault(group, {})
            out[group][t.ggml_type] = out[group].get(t.ggml_type, 0) + 1
        return out

    def quant_summary(self) -> str:
        """One line for reports: ``gguf Q4_K_M (attention Q4_K/Q6_K/F32, ffn ..., ...)``."""
        ftype = self.metadata.get("general.file_type", "")
        found = self.quant_groups()
        order = [g for g, _ in _GROUPS] + ["other"]
        groups = ", ".join(f"{g} {'/'.join(sorted(found[g], key=lambda k: (k not in FORMATS, -found[g][k])))}"
                           for g in order if g in found)
        return f"gguf{' ' + ftype if ftype else ''} ({groups})"

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        super().close()


_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("self_attn.", "cross_attn.", ".attn_")),
    ("ffn", ("ffn",)),
    ("embeddings", ("token_embd", "text_embedding", "time_embedding", "time_projection", "patch_embedding",
                    "img_emb")),
    ("head", ("head.",)),
    ("norms", ("norm",)),
)


def _group(name: str) -> str:
    for group, fragments in _GROUPS:
        if any(f in name for f in fragments):
            return group
    return "other"


# --------------------------------------------------------------------------- opening


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading .gguf files needs the 'gguf' package (the one ComfyUI-GGUF uses): "
                              "pip install gguf") from None
    return gguf


def _field(reader, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file and index its tensors without reading their data (checks above)."""
    gguf = _import_gguf()
    p = Path(path)
    size = p.stat().st_size
    try:
        reader = gguf.GGUFReader(p)
    except ValueError as err:
        if "GGMLQuantizationType" in str(err):
            raise CheckpointError(f"{p.name}: a tensor uses a GGML type this gguf package does not know "
                                  f"({str(err)[:80]}); the file was made for a newer llama.cpp. Use a file with "
                                  f"one of: {', '.join((*FORMATS, *FLOAT_TYPES))}.") from None
        raise CheckpointError(f"{p.name}: not a readable GGUF file ({type(err).__name__}): the file is truncated "
                              "or corrupt. Download it again.") from None
    except (KeyError, IndexError, TypeError, OverflowError, OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{p.name}: not a readable GGUF file ({type(err).__name__}): the header is "
                              "truncated or corrupt. Download it again.") from None
    try:
        return _index(reader, p, size, gguf)
    except CheckpointError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, UnicodeDecodeError) as err:   # metadata of the wrong type
        raise CheckpointError(f"{p.name}: the GGUF metadata is malformed ({type(err).__name__}); the file is "
                              "corrupt.") from None
    finally:
        del reader   # drops the memory map


def _index(reader, p: Path, size: int, gguf) -> GGUFFile:
    arch = _field(reader, "general.architecture")
    if arch is not None and not isinstance(arch, str):
        raise TypeError("general.architecture is not a string")
    if arch is not None and arch not in ACCEPTED_ARCHITECTURES:
        family = _OTHER_FAMILIES.get(arch, f"architecture '{shown(arch)}'" + (
            ", a language model" if arch in gguf.MODEL_ARCH_NAMES.values() else ""))
        raise CheckpointError(f"{p.name} is a GGUF of {family}, not Wan 2.1. Wan Core loads GGUF files of the "
                              "Wan 2.1 DiT ('wan', models/diffusion_models or unet) and of the umT5-XXL "
                              "encoder ('t5encoder', models/text_encoders or clip).")
    metadata = {"general.architecture": str(arch or "")}
    ftype = _field(reader, "general.file_type")
    if ftype is not None:
        try:
            metadata["general.file_type"] = gguf.LlamaFileType(int(ftype)).name.replace("MOSTLY_", "")
        except ValueError:
            pass
    if len(reader.tensors) > MAX_TENSORS:
        raise CheckpointError(f"{p.name}: declares {len(reader.tensors)} tensors (limit {MAX_TENSORS}); the file "
                              "is corrupt or hostile.")
    tensors: dict[str, GGUFTensor] = {}
    for rt in reader.tensors:
        type_name = getattr(rt.tensor_type, "name", str(rt.tensor_type))
        if type_name not in FORMATS and type_name not in FLOAT_TYPES:
            raise CheckpointError(f"{p.name}: tensor '{shown(rt.name)}' is stored as {type_name}, which Wan Core does not "
                                  f"dequantize (supported: {', '.join((*FORMATS, *FLOAT_TYPES))}). Use a Q*_0/Q*_1/"
                                  "Q*_K or F16 file of this model.")
        dims = [int(d) for d in rt.shape]
        if len(dims) > MAX_RANK or any(not 0 < d <= MAX_DIM for d in dims):
            raise CheckpointError(f"{p.name}: tensor '{shown(rt.name)}' has an impossible shape {dims[:MAX_RANK]}; "
                                  "the file is corrupt or hostile.")
        shape = tuple(reversed(dims)) or (1,)
        if len(shape) == 2 and rt.name.endswith(_LEADING_ONE):
            shape = (1, *shape)      # llama.cpp drops the leading 1; ComfyUI-GGUF's quantizer patch restores it
        orig = reader.fields.get(_ORIG_SHAPE + rt.name)
        if orig is not None:
            types = [getattr(t, "name", str(t)) for t in orig.types]
            if types != ["ARRAY", "INT32"]:
                raise CheckpointError(f"{p.name}: the shape record of '{shown(rt.name)}' is not an array of int32; "
                                      "the file is corrupt.")
            shape = tuple(int(v) for v in orig.contents())
        n = 1
        for s in shape:
            n *= s
        if n != int(rt.n_elements) or any(s <= 0 for s in shape):
            raise CheckpointError(f"{p.name}: tensor '{shown(rt.name)}' has {int(rt.n_elements)} values but its recorded "
                                  f"shape {list(shape)} needs {n}; the file is corrupt.")
        if int(rt.data_offset) + int(rt.n_bytes) > size:
            raise CheckpointError(f"{p.name}: the file is truncated: tensor '{shown(rt.name)}' ends at byte "
                                  f"{int(rt.data_offset) + int(rt.n_bytes)} but the file has {size}. "
                                  "Download it again.")
        tensors[rt.name] = GGUFTensor(rt.name, type_name, shape, dims[0] if dims else 1, int(rt.data_offset),
                                      int(rt.n_bytes))
    spiece = _tokenizer(reader, p, tensors)
    return GGUFFile(p, tensors, metadata, spiece)


# --------------------------------------------------------------------------- tokenizer


def _tokenizer(reader, p: Path, tensors: dict[str, GGUFTensor]) -> bytes | None:
    """The sentencepiece model rebuilt from ``tokenizer.ggml.*``, or None (no tokenizer, or
    one that cannot be rebuilt: then the usual ``spiece.model`` rules apply; logged)."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        return None
    embd = tensors.get("token_embd.weight")
    if embd is not None and len(tokens) != embd.shape[0]:
        raise CheckpointError(f"{p.name}: its tokenizer lists {len(tokens)} tokens but the token table "
                              f"'token_embd.weight' has {embd.shape[0]} rows: tokenizer and weights do not "
                              "belong together. Download the file again or use another quantization of it.")
    model = _field(reader, "tokenizer.ggml.model")
    if model != "t5":
        log.warning("wan_core: %s: embedded tokenizer of type %r is not a T5 sentencepiece (unigram) "
                    "vocabulary; looking for spiece.model instead", p.name, model)
        return None
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    except ImportError:
        log.warning("wan_core: %s embeds its tokenizer, but rebuilding it needs the 'protobuf' package "
                    "(pip install protobuf); looking for spiece.model instead", p.name)
        return None
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if scores is None or types is None or not len(scores) == len(types) == len(tokens):
        raise CheckpointError(f"{p.name}: its embedded tokenizer is incomplete (tokens, scores and types "
                              "differ in length); the file is corrupt.")
    return _build_spm(spm_pb2, reader, tokens, scores, types)


def _build_spm(spm_pb2, reader, tokens: list, scores: list, types: list) -> bytes:
    """Serialized unigram ``ModelProto`` equivalent to the one llama.cpp converted from."""
    n = len(tokens)
    while n and types[n - 1] == _SPM_UNUSED and _PAD_PIECE.match(tokens[n - 1]):
        n -= 1                       # the converter's padding up to the embedding size
    proto = spm_pb2.ModelProto()
    for piece, score, kind in zip(tokens[:n], scores[:n], types[:n]):
        proto.pieces.add(piece=piece, score=float(score), type=int(kind))
    spec = proto.trainer_spec
    spec.model_type = spm_pb2.TrainerSpec.UNIGRAM
    spec.vocab_size = n
    spec.byte_fallback = any(t == _SPM_BYTE for t in types[:n])
    for role, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        idx = -1 if idx is None or not 0 <= int(idx) < n else int(idx)
        setattr(spec, f"{role}_id", idx)
        if idx >= 0:
            setattr(spec, f"{role}_piece", tokens[idx])
    norm = proto.normalizer_spec
    charsmap = _field(reader, "tokenizer.ggml.precompiled_charsmap")
    norm.name = "user_defined" if charsmap else "identity"
    if charsmap:
        norm.precompiled_charsmap = bytes(int(b) & 0xFF for b in charsmap)
    prefix = _field(reader, "tokenizer.ggml.add_space_prefix")
    norm.add_dummy_prefix = True if prefix is None else bool(prefix)
    ws = _field(reader, "tokenizer.ggml.remove_extra_whitespaces")
    norm.remove_extra_whitespaces = True if ws is None else bool(ws)
    norm.escape_whitespaces = True
    return proto.SerializeToString()


# --------------------------------------------------------------------------- loading


def place_quantized(model: nn.Module, name: str, tf: GGUFFile, key: str, device: torch.device,
                    keep_fp32: Callable[[str], bool] | None = None) -> tuple[str, bool] | None:
    """Keep file tensor ``key`` quantized as parameter ``name`` of ``model`` (on ``device``).

    Applies when ``key`` is GGML-quantized and ``name`` is the weight of a CastLinear (then
    replaced by a :class:`QuantLinear`, the bias carried over) or of an ``nn.Embedding``
    (replaced by a :class:`QuantEmbedding`) whose rows are the file's GGML rows. Returns
    (GGML type stored, whether its values are all finite), or None when the tensor must go
    the ordinary way (dequantized to its
    storage dtype): not quantized, float32 by the precision policy, or another kind of
    parameter (a convolution, a norm).
    """
    from .layers import CastLinear

    if not tf.is_quantized(key) or (keep_fp32 is not None and keep_fp32(name)):
        return None
    owner_name, _, leaf = name.rpartition(".")
    if leaf != "weight" or not owner_name:
        return None
    owner = model.get_submodule(owner_name)
    t = tf.tensors[key]
    if isinstance(owner, CastLinear) and not isinstance(owner, QuantLinear):
        if t.shape != (owner.out_features, owner.in_features) or t.row != owner.in_features:
            return None
        with torch.device("meta"):
            new: nn.Module = QuantLinear(owner.in_features, owner.out_features, t.ggml_type,
                                         bias=owner.bias is not None)
        if owner.bias is not None:
            new.bias = owner.bias            # meta, or already loaded
    elif type(owner) is nn.Embedding:
        if t.shape != (owner.num_embeddings, owner.embedding_dim) or t.row != owner.embedding_dim:
            return None
        with torch.device("meta"):
            new = QuantEmbedding(owner.num_embeddings, owner.embedding_dim, t.ggml_type)
    else:
        return None
    blocks, qtype, _ = tf.read_blocks(key)
    new.weight = nn.Parameter(blocks.to(device), requires_grad=False)
    parent_name, _, child = owner_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return qtype, blocks_finite(blocks, qtype)
