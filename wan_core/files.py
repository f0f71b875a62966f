"""Open a checkpoint file safely and read its tensors one at a time.

Formats:

* ``.safetensors``: the header is parsed here (8-byte little-endian length + JSON) so that a
  truncated or corrupt file is reported *before* any weight is read, and each tensor is read
  with plain ``readinto`` straight into its destination. Nothing is memory-mapped, so the
  process holds exactly one copy of each tensor it keeps (mmap would add the touched file
  pages to the resident set and roughly double peak RSS while loading).
* sharded safetensors: a ``*.safetensors.index.json`` or any one ``name-0000i-of-0000n``
  part opens the whole set as one file.
* ``.pth`` / ``.pt`` / ``.ckpt`` / ``.bin``: only through ``torch.load(weights_only=True,
  mmap=True)``. A pickle that needs arbitrary code is refused, never executed.
* a folder (a diffusers ``transformer/`` or ``vae/`` folder, say): its index or its one
  weights file.

Files are untrusted input. Everything a file declares is checked against the limits below
before anything is allocated or any other file is opened: a hostile file gets a
:class:`CheckpointError` that names the file and the problem, and no message ever echoes the
file's bytes (only tensor names, shapes and dtypes, shortened and made printable).

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
from pathlib import Path, PureWindowsPath
from typing import BinaryIO

import numpy as np
import torch

__all__ = ["CheckpointError", "TensorInfo", "TensorFile", "open_checkpoint", "weights_in_folder", "shown",
           "MAX_HEADER_BYTES", "MAX_INDEX_BYTES", "MAX_JSON_DEPTH", "MAX_JSON_ITEMS", "MAX_TENSORS",
           "MAX_RANK", "MAX_DIM", "MAX_SHARDS", "MAX_FOLDER_ENTRIES"]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
GGUF_SUFFIXES = (".gguf",)
INDEX_SUFFIX = ".safetensors.index.json"

# Limits on what a file may declare. Real Wan 2.1 files sit far below each one: the 14B DiT
# has ~1,100 tensors in a ~150 KB header, ranks <= 5 and no dimension above 256,384 (the umT5
# vocabulary); diffusers shard sets have <= 12 parts.
MAX_HEADER_BYTES = 100 * 1024 * 1024   # safetensors JSON header (the format's own cap)
MAX_INDEX_BYTES = 16 * 1024 * 1024     # a *.safetensors.index.json
MAX_JSON_DEPTH = 8                     # nesting of [ / { in a header or index (valid ones: 3)
MAX_JSON_ITEMS = 2_000_000             # containers + members + elements (~15 per tensor entry):
                                       # bounds the Python objects a header parses into
MAX_TENSORS = 100_000                  # tensors in one file or one shard set
MAX_RANK = 8                           # dimensions of one tensor
MAX_DIM = 2**31                        # size of one dimension
MAX_SHARDS = 1_000                     # parts of one sharded checkpoint
MAX_FOLDER_ENTRIES = 10_000            # files looked at when a folder is given

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_KNOWN_DTYPES = frozenset(_ST_DTYPES.values())


class CheckpointError(ValueError):
    """A file that cannot be used as asked; the message names the file and what to do."""


def shown(text: object, limit: int = 80) -> str:
    """A file-provided name made safe to print: printable characters only, at most ``limit``."""
    s = "".join(c if c.isprintable() else "?" for c in str(text)[: limit + 1])
    return s if len(s) <= limit else s[: limit - 3] + "..."


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
        try:
            fh = self._handles.get(src)
            if fh is None:
                fh = self._handles[src] = open(src, "rb")  # noqa: SIM115 - closed in close()
            fh.seek(info.offset)
            got = fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        except OSError as err:
            raise CheckpointError(f"{src.name}: cannot read '{shown(name)}' ({err.strerror or type(err).__name__})."
                                  ) from None
        if got != info.nbytes:
            raise CheckpointError(
                f"{src.name}: the file ended while reading '{shown(name)}' "
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

    ``path`` is a weights file, a ``*.safetensors.index.json``, one part of a shard set, or a
    folder holding one of those (see :func:`weights_in_folder`). Raises
    :class:`CheckpointError` for a missing, empty, truncated, corrupt or hostile file, an
    unknown extension, or a pickle that would need to run code.
    """
    p = Path(path)
    try:
        if p.is_dir():
            p = weights_in_folder(p)
        if not p.is_file():
            raise CheckpointError(f"{shown(p, 300)}: no such file.")
        if p.stat().st_size == 0:
            raise CheckpointError(f"{p.name}: the file is empty (0 bytes); download it again.")
        return _open_by_format(p)
    except OSError as err:
        raise CheckpointError(f"{shown(p.name)}: cannot be read ({err.strerror or type(err).__name__}).") from None


def _open_by_format(p: Path) -> TensorFile:
    """The one dispatch on file format (by name, then by content for unknown suffixes)."""
    suffix = p.suffix.lower()
    if p.name.lower().endswith(INDEX_SUFFIX):
        return _open_index(p)
    if _SHARD_RE.match(p.name):
        return _open_shards(p, _shard_parts(p))
    if suffix in SAFETENSORS_SUFFIXES:
        return _open_safetensors(p)
    if suffix in PICKLE_SUFFIXES:
        return _open_pickle(p)
    if suffix in GGUF_SUFFIXES:
        from .gguf import open_gguf   # GGUF (ComfyUI-GGUF / llama.cpp): wan_core.gguf
        return open_gguf(p)
    # Unknown suffix: sniff the content.
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head[:4] == b"GGUF":
        from .gguf import open_gguf
        return open_gguf(p)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return _open_pickle(p)
    return _open_safetensors(p)


def weights_in_folder(folder: Path) -> Path:
    """The weights file of a model folder (e.g. a diffusers ``transformer/`` or ``vae/``).

    Its one ``*.safetensors.index.json``; else its one safetensors file (or one shard set);
    else its one ``.pth``/``.bin``/``.gguf`` file. Anything else is ambiguous and refused.
    """
    entries: list[Path] = []
    for i, e in enumerate(folder.iterdir()):
        if i >= MAX_FOLDER_ENTRIES:
            raise CheckpointError(f"{folder}: the folder holds more than {MAX_FOLDER_ENTRIES} entries; "
                                  "give the weights file itself.")
        if not e.name.startswith(".") and e.is_file():
            entries.append(e)
    entries.sort()
    names = [e.name.lower() for e in entries]
    indexes = [e for e, n in zip(entries, names) if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: the folder holds several sharded checkpoints "
                              f"({', '.join(shown(e.name) for e in indexes[:4])}); give one index file.")
    if indexes:
        return indexes[0]
    for suffixes in (SAFETENSORS_SUFFIXES, PICKLE_SUFFIXES + GGUF_SUFFIXES):
        found = [e for e in entries if e.suffix.lower() in suffixes]
        if len(found) == 1:
            return found[0]
        sets = {(m["stem"], m["n"]) for e in found if (m := _SHARD_RE.match(e.name))}
        if found and len(sets) == 1 and all(_SHARD_RE.match(e.name) for e in found):
            return found[0]
        if found:
            listed = ", ".join(shown(e.name) for e in found[:6]) + (" ..." if len(found) > 6 else "")
            raise CheckpointError(f"{folder}: the folder holds several weights files ({listed}); "
                                  "give the one to load.")
    if (folder / "model_index.json").is_file():
        subs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        raise CheckpointError(f"{folder} is a diffusers pipeline folder; give the model's own subfolder "
                              f"({', '.join(shown(s) for s in subs[:8])}), e.g. transformer/ for the DiT "
                              "or vae/ for the VAE.")
    raise CheckpointError(f"{folder}: the folder holds no weights file (.safetensors, "
                          "*.safetensors.index.json, .pth, .bin).")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------
# strict JSON


class _Duplicate(Exception):
    pass


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return out


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def _json_scan(raw: bytes) -> tuple[int, int]:
    """(deepest [ / { nesting, number of items) outside strings, in linear time at C speed.

    Escapes, then strings, are removed; items are brackets, commas and colons, about one per
    Python object the parse would create.
    """
    structure = _STRING.sub(b"", _ESCAPE.sub(b"", raw))
    items = structure.count(b",") + structure.count(b":")
    brackets = structure.translate(None, _NOT_BRACKET)
    if not brackets:
        return 0, items
    arr = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((arr == ord("[")) | (arr == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max()), items + len(brackets)


def _parse_json(raw: bytes, p: Path, what: str) -> object:
    """Strict JSON: UTF-8, nesting <= MAX_JSON_DEPTH, at most MAX_JSON_ITEMS items, no
    duplicate keys, no NaN/Infinity. The limits are checked before the parse allocates."""
    depth, items = _json_scan(raw)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{p.name}: the {what} nests {depth} levels deep (the limit is "
                              f"{MAX_JSON_DEPTH}); the file is corrupt or hostile.")
    if items > MAX_JSON_ITEMS:
        raise CheckpointError(f"{p.name}: the {what} holds {items} JSON items (the limit is "
                              f"{MAX_JSON_ITEMS}); the file is corrupt or hostile.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{p.name}: the {what} is not UTF-8 text (bad byte at position {err.start}); "
                              "the file is corrupt or of another format.") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_object, parse_constant=_refuse_constant)
    except _Duplicate as dup:
        raise CheckpointError(f"{p.name}: the {what} names '{shown(dup.args[0])}' twice; the file is "
                              "corrupt or hostile.") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{p.name}: the {what} is not valid JSON ({err.msg} at character {err.pos}); "
                              "the file is corrupt.") from None
    except (ValueError, RecursionError):     # huge integers, NaN, or (defensively) deep nesting
        raise CheckpointError(f"{p.name}: the {what} holds a value out of range; the file is corrupt.") from None


# ---------------------------------------------------------------------------------------
# safetensors


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _open_safetensors(p: Path) -> TensorFile:
    size = p.stat().st_size
    with open(p, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{p.name}: too short to be a safetensors file ({size} bytes); "
                                  "the download is incomplete.")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len < 2 or header_len > MAX_HEADER_BYTES:
            # The length is not printed: it is the file's first bytes.
            raise CheckpointError(f"{p.name}: not a valid safetensors file (its first 8 bytes do not give "
                                  f"a header length between 2 bytes and {MAX_HEADER_BYTES // 2**20} MB). "
                                  "The file is corrupt or of another format.")
        if 8 + header_len > size:
            raise CheckpointError(f"{p.name}: the file is truncated: its header alone needs "
                                  f"{8 + header_len} bytes but the file has {size}. Download it again.")
        raw = fh.read(header_len)
    header = _parse_json(raw, p, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{p.name}: the safetensors header is not a JSON object; the file is corrupt.")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{p.name}: the safetensors '__metadata__' is not an object of strings; "
                              "the file is corrupt.")
    if len(header) > MAX_TENSORS:
        raise CheckpointError(f"{p.name}: the header lists {len(header)} tensors (the limit is {MAX_TENSORS}); "
                              "the file is corrupt or hostile.")
    base = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    data_end = base
    for name, entry in header.items():
        dtype, shape, start, stop = _header_entry(p, name, entry)
        nbytes = _numel(shape) * dtype.itemsize
        if stop - start != nbytes:
            raise CheckpointError(f"{p.name}: tensor '{shown(name)}' claims {stop - start} bytes but its "
                                  f"shape {list(shape)} of {entry['dtype']} needs {nbytes}; the file is corrupt.")
        infos[name] = TensorInfo(name, dtype, shape, base + start, nbytes, p)
        if nbytes:
            ranges.append((start, stop, name))
        data_end = max(data_end, base + stop)
    ranges.sort()
    for (_, stop_a, a), (start_b, _, b) in zip(ranges, ranges[1:]):
        if start_b < stop_a:
            raise CheckpointError(f"{p.name}: tensors '{shown(a)}' and '{shown(b)}' overlap in the file; "
                                  "the file is corrupt or hostile.")
    if data_end > size:
        missing = data_end - size
        raise CheckpointError(f"{p.name}: the file is truncated: it has {size} bytes but its tensors "
                              f"need {data_end} ({missing} missing). Download it again.")
    return TensorFile(p, infos, metadata)


def _header_entry(p: Path, name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, start, stop) of one header entry, every field checked."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{p.name}: header entry '{shown(name)}' {what}; the file is corrupt.")

    if not isinstance(entry, dict):
        raise bad("is not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise bad(f"lacks '{field}'")
    code = entry["dtype"]
    if not isinstance(code, str):
        raise bad("has a dtype that is not a string")
    if code not in _ST_DTYPES:
        # Printed only when it looks like a dtype code: the string is the file's content.
        label = code if re.fullmatch(r"[A-Z0-9_]{1,12}", code) else "(not a dtype code)"
        raise CheckpointError(f"{p.name}: tensor '{shown(name)}' has dtype {label}, which this "
                              "loader does not read.")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise bad(f"has a shape that is not a list of at most {MAX_RANK} sizes")
    dims = tuple(_int(s) for s in shape)
    if any(d is None or not 0 <= d <= MAX_DIM for d in dims):
        raise bad(f"has a shape with a size that is not an integer in 0..{MAX_DIM}")
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise bad("has 'data_offsets' that are not two integers")
    start, stop = (_int(v) for v in offsets)
    if start is None or stop is None or not 0 <= start <= stop:
        raise bad("has 'data_offsets' that are not two integers with 0 <= start <= end")
    return _ST_DTYPES[code], dims, start, stop  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# .pth


def _open_pickle(p: Path) -> TensorFile:
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as fh:
            head = fh.read(2)
        if head == b"PK":
            raise CheckpointError(f"{p.name}: cannot read this .pth (its zip archive is incomplete). "
                                  "The file is truncated or corrupt; download it again.")
        if head[:1] == b"\x80":
            # Legacy (pre-1.6) torch.save: its loader allocates each storage at the size the
            # pickle claims before reading it, so a tiny file could ask for terabytes.
            raise CheckpointError(f"{p.name}: written in the legacy (PyTorch < 1.6) format, which is not "
                                  "read; re-save it with a current PyTorch or use a .safetensors version.")
        raise CheckpointError(f"{p.name}: not a PyTorch checkpoint (not a zip archive); the file is "
                              "corrupt or of another format.")
    try:
        with zipfile.ZipFile(p) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise CheckpointError(f"{p.name}: cannot read this .pth (its zip archive is corrupt). The file is "
                              "truncated or corrupt; download it again.") from None
    # torch.save stores every record uncompressed: a compressed record could inflate to any size.
    if (len(members) > MAX_TENSORS + 16 or any(m.compress_type != zipfile.ZIP_STORED for m in members)
            or sum(m.file_size for m in members) > p.stat().st_size):
        raise CheckpointError(f"{p.name}: not a torch.save archive (compressed or oversized records); "
                              "refused. Use a .safetensors version of this model.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(
                f"{p.name}: refused: this .pth needs to run arbitrary code to load. Only plain tensor "
                "checkpoints are loaded; use a .safetensors version of this model.") from None
        raise CheckpointError(f"{p.name}: cannot read this .pth (UnpicklingError). The file is "
                              "truncated or corrupt; download it again.") from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - torch.load raises many types on bad input
        # torch's message is not shown: it can quote the file's own bytes and record names.
        raise CheckpointError(f"{p.name}: cannot read this .pth ({type(err).__name__}). "
                              "The file is truncated or corrupt; download it again.") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict) and len(obj) <= 4:
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{p.name}: this .pth does not hold a flat dictionary of named tensors, "
                              "so it is not a model checkpoint this loader understands.")
    if len(obj) > MAX_TENSORS:
        raise CheckpointError(f"{p.name}: the file holds {len(obj)} tensors (the limit is {MAX_TENSORS}).")
    for k, v in obj.items():
        if v.layout != torch.strided or v.dtype not in _KNOWN_DTYPES or v.dim() > MAX_RANK:
            raise CheckpointError(f"{p.name}: tensor '{shown(k)}' is a {v.layout} {v.dtype} tensor of rank "
                                  f"{v.dim()}; only dense tensors of rank <= {MAX_RANK} are read.")
    infos = {k: TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in obj.items()}
    return TensorFile(p, infos, {}, state_dict=obj)


# ---------------------------------------------------------------------------------------
# sharded safetensors

_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>[0-9]{5})-of-(?P<n>[0-9]{5})\.safetensors$")


def _shard_parts(p: Path) -> list[Path]:
    """Every part of the shard set ``p`` (``stem-0000i-of-0000n.safetensors``) belongs to."""
    m = _SHARD_RE.match(p.name)
    assert m is not None
    n, i = int(m["n"]), int(m["i"])
    if not 1 <= i <= n <= MAX_SHARDS:
        raise CheckpointError(f"{p.name}: part {i} of {n} is not a valid shard number (1..{MAX_SHARDS}).")
    return [_shard_path(p, f"{m['stem']}-{k:05d}-of-{n:05d}.safetensors") for k in range(1, n + 1)]


def _shard_path(p: Path, name: str) -> Path:
    """``name`` as a file of ``p``'s folder, refusing anything that leaves that folder."""
    if (not name or name in (".", "..") or any(c in name for c in "/\\:\0")
            or Path(name).is_absolute() or PureWindowsPath(name).is_absolute()):
        raise CheckpointError(f"{p.name}: shard '{shown(name)}' is not a plain file name in the index's "
                              "folder; refused (an index may only name files next to it).")
    shard = p.parent / name
    if shard.exists() and not _inside_model_folder(p.parent, shard):
        raise CheckpointError(f"{p.name}: shard '{shown(name)}' is a link to a file outside the model "
                              "folder; refused. Copy the real file next to the index.")
    return shard


def _inside_model_folder(folder: Path, shard: Path) -> bool:
    """Whether ``shard`` resolves inside ``folder`` (or the Hugging Face cache's blob store)."""
    real = shard.resolve()
    if real.is_relative_to(folder.resolve()):
        return True
    # huggingface_hub cache: <repo>/snapshots/<rev>/<sub>/file is a link to <repo>/blobs/<sha>.
    parts = folder.absolute().parts
    if "snapshots" in parts:
        repo = Path(*parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
        return real.parent == (repo / "blobs").resolve()
    return False


def _open_index(p: Path) -> TensorFile:
    size = p.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{p.name}: the index is {size} bytes (the limit is {MAX_INDEX_BYTES}); "
                              "it is not a safetensors index.")
    index = _parse_json(p.read_bytes(), p, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{p.name}: not a valid safetensors index (needs a non-empty 'weight_map' "
                              "object from tensor names to shard files).")
    for key, value in weight_map.items():
        if not isinstance(value, str):
            raise CheckpointError(f"{p.name}: the index's entry for '{shown(key)}' is not a file name.")
    names = sorted(set(weight_map.values()))
    if len(names) > MAX_SHARDS:
        raise CheckpointError(f"{p.name}: the index names {len(names)} shards (the limit is {MAX_SHARDS}).")
    return _open_shards(p, [_shard_path(p, n) for n in names], weight_map)


def _open_shards(p: Path, shards: list[Path], weight_map: dict[str, str] | None = None) -> TensorFile:
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{p.name} is one part of a sharded checkpoint; these parts are missing "
                              f"next to it: {', '.join(shown(m) for m in missing[:8])}. "
                              "Put all parts in the same folder.")
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        part = _open_safetensors(shard)
        for name, info in part.infos.items():
            if name in infos:
                first = infos[name].path.name  # type: ignore[union-attr]
                raise CheckpointError(f"{p.name}: tensor '{shown(name)}' is in two shards, {first} and "
                                      f"{shard.name}; the shard set is mixed up. Download it again.")
            infos[name] = info
        if len(infos) > MAX_TENSORS:
            raise CheckpointError(f"{p.name}: the shards hold more than {MAX_TENSORS} tensors.")
        metadata.update(part.metadata)
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            info = infos.get(name)
            if info is None or info.path.name != shard_name:  # type: ignore[union-attr]
                raise CheckpointError(f"{p.name}: the index puts '{shown(name)}' in {shown(shard_name)}, "
                                      "which does not hold it; index and shards do not match.")
        extra = [n for n in infos if n not in weight_map]
        if extra:
            raise CheckpointError(f"{p.name}: tensor '{shown(extra[0])}' (in {infos[extra[0]].path.name}) "  # type: ignore[union-attr]
                                  "is not listed in the index; index and shards do not match.")
    return TensorFile(shards[0], infos, metadata)
