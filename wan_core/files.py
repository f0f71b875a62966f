"""Open a checkpoint file safely and read its tensors one at a time.

Two formats:

* ``.safetensors``: the header is parsed here (8-byte little-endian length + JSON) so that a
  truncated or corrupt file is reported *before* any weight is read, and each tensor is read
  with plain ``readinto`` straight into its destination. Nothing is memory-mapped, so the
  process holds exactly one copy of each tensor it keeps (mmap would add the touched file
  pages to the resident set and roughly double peak RSS while loading).
* ``.pth`` / ``.pt`` / ``.ckpt``: only through ``torch.load(weights_only=True, mmap=True)``. A
  pickle that needs arbitrary code is refused, never executed.

The result is a :class:`TensorFile`: names, shapes and dtypes without reading data, and
``read(name)`` to load one tensor.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

__all__ = ["CheckpointError", "TensorInfo", "TensorFile", "open_checkpoint"]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # the format caps the JSON header at 100 MB


class CheckpointError(ValueError):
    """A file that cannot be used as asked; the message names the file and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a file. ``offset``/``nbytes`` are absolute byte positions."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0
    nbytes: int = 0
    path: Path | None = None      # shard holding it (safetensors only)


class TensorFile:
    """Lazily readable tensors of one checkpoint file. Use as a context manager or call close()."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str],
                 state_dict: dict[str, torch.Tensor] | None = None):
        self.path = path
        self.infos = infos
        self.metadata = metadata
        self._state_dict = state_dict  # .pth only: mmap-backed tensors
        self._handles: dict[Path, BinaryIO] = {}

    # -- mapping-like access -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.infos[name].dtype

    @property
    def nbytes(self) -> int:
        return sum(i.dtype.itemsize * _numel(i.shape) for i in self.infos.values())

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into a new CPU tensor of its stored dtype."""
        info = self.infos[name]
        if self._state_dict is not None:
            return self._state_dict[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes == 0:
            return out
        src = info.path or self.path
        fh = self._handles.get(src)
        if fh is None:
            fh = self._handles[src] = open(src, "rb")  # noqa: SIM115 - closed in close()
        fh.seek(info.offset)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        got = fh.readinto(view)
        if got != info.nbytes:
            raise CheckpointError(
                f"{src.name}: the file ended while reading '{name}' "
                f"({got} of {info.nbytes} bytes). The file is truncated; download it again.")
        return out

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        self._state_dict = None

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike) -> TensorFile:
    """Open ``path`` and index its tensors without reading their data.

    Raises :class:`CheckpointError` for a missing, empty, truncated or corrupt file, an
    unknown extension, or a pickle that would need to run code.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file.")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p.name}: the file is empty (0 bytes); download it again.")
    suffix = p.suffix.lower()
    shards = _shard_set(p)
    if shards:
        return _open_shards(p, shards)
    if suffix in SAFETENSORS_SUFFIXES:
        return _open_safetensors(p)
    if suffix in PICKLE_SUFFIXES:
        return _open_pickle(p)
    if suffix == ".gguf":
        raise CheckpointError(f"{p.name}: GGUF files are not supported; use a .safetensors "
                              "(bf16, fp16, fp8 or ComfyUI fp8_scaled) or the official .pth.")
    # Unknown suffix: sniff the content.
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return _open_pickle(p)
    return _open_safetensors(p)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _open_safetensors(p: Path) -> TensorFile:
    size = p.stat().st_size
    with open(p, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{p.name}: too short to be a safetensors file ({size} bytes); "
                                  "the download is incomplete.")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len == 0 or header_len > _MAX_HEADER:
            raise CheckpointError(f"{p.name}: not a valid safetensors file (header length "
                                  f"{header_len}). The file is corrupt or of another format.")
        if 8 + header_len > size:
            raise CheckpointError(f"{p.name}: the file is truncated: its header alone needs "
                                  f"{8 + header_len} bytes but the file has {size}. Download it again.")
        try:
            header = json.loads(fh.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{p.name}: the safetensors header is not valid JSON ({err}); "
                                  "the file is corrupt.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p.name}: the safetensors header is not a JSON object; the file is corrupt.")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    data_end = base
    for name, entry in header.items():
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            start, stop = (int(v) for v in entry["data_offsets"])
        except KeyError as err:
            if isinstance(entry, dict) and entry.get("dtype") not in _ST_DTYPES:
                raise CheckpointError(f"{p.name}: tensor '{name}' has dtype {entry.get('dtype')}, "
                                      "which this loader does not read.") from None
            raise CheckpointError(f"{p.name}: header entry '{name}' lacks {err}; the file is corrupt.") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{p.name}: header entry '{name}' is malformed; the file is corrupt.") from None
        nbytes = _numel(shape) * dtype.itemsize
        if stop - start != nbytes or start < 0:
            raise CheckpointError(f"{p.name}: tensor '{name}' claims {stop - start} bytes but its "
                                  f"shape {list(shape)} of {entry['dtype']} needs {nbytes}; the file is corrupt.")
        infos[name] = TensorInfo(name, dtype, shape, base + start, nbytes, p)
        data_end = max(data_end, base + stop)
    if data_end > size:
        missing = data_end - size
        raise CheckpointError(f"{p.name}: the file is truncated: it has {size} bytes but its tensors "
                              f"need {data_end} ({missing} missing). Download it again.")
    return TensorFile(p, infos, {str(k): str(v) for k, v in metadata.items()})


def _open_pickle(p: Path) -> TensorFile:
    if not zipfile.is_zipfile(p):
        # Legacy (pre-1.6) torch.save format: can't be memory-mapped but weights_only still applies.
        mmap = False
    else:
        mmap = True
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{p.name}: refused: this .pth needs to run arbitrary code to load "
            f"({str(err).splitlines()[0][:200]}). Only plain tensor checkpoints are loaded; "
            "use a .safetensors version of this model.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{p.name}: cannot read this .pth ({str(err).splitlines()[0][:200]}). "
                              "The file is truncated or corrupt; download it again.") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict) and len(obj) <= 4:
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p.name}: this .pth does not hold a flat dictionary of tensors, "
                              "so it is not a model checkpoint this loader understands.")
    infos = {k: TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in obj.items()}
    return TensorFile(p, infos, {}, state_dict=obj)


_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


def _shard_set(p: Path) -> list[Path]:
    """All shards of a sharded checkpoint, given one shard or its ``.index.json``; else []."""
    if p.name.endswith(".safetensors.index.json"):
        try:
            index = json.loads(p.read_text())
            names = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{p.name}: not a valid safetensors index (needs a 'weight_map').") from None
        return [p.parent / n for n in names]
    m = _SHARD_RE.match(p.name)
    if not m:
        return []
    n = int(m["n"])
    return [p.parent / f"{m['stem']}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _open_shards(p: Path, shards: list[Path]) -> TensorFile:
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{p.name} is one part of a sharded checkpoint; these parts are missing "
                              f"next to it: {', '.join(missing)}. Put all parts in the same folder.")
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        part = _open_safetensors(shard)
        infos.update(part.infos)
        metadata.update(part.metadata)
    return TensorFile(shards[0], infos, metadata)
