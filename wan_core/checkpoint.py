"""Load a Wan 2.1 network from a checkpoint file in any published layout.

The flow is: open the file lazily (:mod:`wan_core.files`), identify kind, layout and config
from keys and shapes (:mod:`wan_core.layouts`), build the module on the meta device, then
stream tensors in one at a time, dequantising fp8 (or keeping / quantising the Linear
weights as fp8, see ``weight_dtype``) and casting to the storage dtype on the way. Peak RAM stays near one copy of the weights in their storage dtype. Every check that can
fail (wrong kind, truncated file, unknown layout, missing tokenizer) runs before any weight
is read. Every floating tensor is checked for NaN/Inf as it streams in (in its storage dtype,
fp8 after dequantisation); a file with any is refused, naming the tensors.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import fp8
from .files import CheckpointError, TensorFile, open_checkpoint, shown
from .gguf import GGUFFile, place_quantized
from .layers import CastLinear
from .layouts import KIND_NAMES, Detected, Recipe, detect

__all__ = ["CheckpointError", "LoadReport", "inspect_checkpoint", "load_module", "read_state_dict",
           "find_tokenizer"]

log = logging.getLogger("wan_core")

# Params a loader may find absent and fill with zeros: unused by Wan (CLIP projection and
# post-norm; HF CLIPVisionModel files without the projection omit them).
_OPTIONAL_PARAMS = {"clip_vision": ("head", "post_norm.weight", "post_norm.bias")}


@dataclass(frozen=True)
class LoadReport:
    """What was loaded: printed as one line and kept on the module in its declared
    ``checkpoint_report`` field (every network class declares it, None until loaded)."""

    path: Path
    kind: str
    layout: str
    variant: str
    quant: str
    file_dtypes: tuple[str, ...]
    storage_dtype: str
    config: object

    def line(self) -> str:
        return (f"wan_core: loaded {self.path.name}: {self.variant} ({self.kind}, layout {self.layout}, "
                f"file {'/'.join(self.file_dtypes)}{'' if self.quant == 'none' else ' ' + self.quant}, "
                f"stored as {self.storage_dtype})")


def inspect_checkpoint(path: str | os.PathLike) -> Detected:
    """Kind, layout, config and quantisation of ``path``, reading only its header."""
    with open_checkpoint(path) as tf:
        return detect(tf)


def _expect_kind(det: Detected, kind: str, path: Path) -> None:
    if det.kind == kind:
        return
    what, folder = KIND_NAMES[det.kind]
    want, want_folder = KIND_NAMES[kind]
    raise CheckpointError(f"{path.name} is {what}; this loader needs {want} (from {want_folder}). "
                          f"Load this file with the {det.kind.replace('_', ' ')} loader instead.")


def _read_recipe(tf: TensorFile, recipe: Recipe, scales: dict[str, str]) -> torch.Tensor:
    parts = []
    for key in recipe.keys:
        t = tf.read(key)
        if key in scales:
            # ComfyUI scaled fp8: the real weight is W_fp8 * scale_weight (a float32 scalar).
            t = fp8.dequantize(t, tf.read(scales[key]), torch.float32)
        parts.append(t)
    if recipe.op == "cat":
        return torch.cat(parts, dim=0)
    if recipe.op == "transpose":
        return parts[0].t().contiguous()
    if recipe.op == "reshape":
        return parts[0].reshape(recipe.shape)
    return parts[0]


def _target_dtype(name: str, src: torch.dtype, dtype: torch.dtype | None,
                  keep_fp32: Callable[[str], bool] | None) -> torch.dtype:
    if not src.is_floating_point:
        return src
    if keep_fp32 is not None and keep_fp32(name):
        return torch.float32
    if dtype is not None:
        return dtype
    return torch.bfloat16 if fp8.is_fp8(src) else src


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, path: Path, key: str) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = owner._parameters.get(leaf)
    if old is None:
        raise CheckpointError(f"{path.name}: tensor '{shown(key)}' maps to '{shown(name)}', which this model "
                              "does not have.")
    if tuple(old.shape) != tuple(tensor.shape):
        if tensor.numel() == old.numel():
            tensor = tensor.reshape(old.shape)
        else:
            raise CheckpointError(f"{path.name}: tensor '{shown(key)}' has shape {list(tensor.shape)}, expected "
                                  f"{list(old.shape)} for '{name}'; the file does not match its own inferred config.")
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _finite(t: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Whether a stored tensor (fp8 with its optional scale included) holds no NaN/Inf."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if fp8.is_fp8(t.dtype):
        return fp8.all_finite(t, scale)
    # min and max propagate NaN, and are finite iff every value is: one pass, no temporary
    # (~20x faster than isfinite(t).all() on CPU).
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@functools.cache
def _non_finite_weights_class() -> type[CheckpointError]:
    """A CheckpointError that is also the package's NonFiniteError (wherever that lives)."""
    base = getattr(importlib.import_module(__package__), "NonFiniteError", None)
    if not isinstance(base, type) or not issubclass(base, Exception):
        return CheckpointError
    if issubclass(base, CheckpointError):
        return base
    return type("NonFiniteWeightsError", (CheckpointError, base),
                {"__module__": __name__, "__doc__": "A checkpoint whose weights hold NaN or Inf."})


def _non_finite_error(path: Path, in_file: list[str], overflow: list[tuple[str, str]]) -> CheckpointError:
    def names(keys: list[str]) -> str:
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        return ", ".join(f"'{shown(k)}'" for k in keys[:4]) + more

    if in_file:
        msg = (f"{path.name}: {len(in_file)} tensor(s) hold NaN or Inf values: {names(in_file)}. The file is "
               "corrupt (a broken download, conversion or merge); download or export it again.")
    else:
        dtypes = sorted({d for _, d in overflow})
        msg = (f"{path.name}: {len(overflow)} tensor(s) overflow to Inf when stored as {'/'.join(dtypes)}: "
               f"{names([k for k, _ in overflow])}. The file's values are finite but too large for that "
               "dtype; load with dtype=torch.bfloat16 or torch.float32.")
    return _non_finite_weights_class()(msg)


def _fp8_eligible(model: nn.Module, keep_fp32: Callable[[str], bool] | None) -> set[str]:
    """Weights that may be stored fp8: those of CastLinears outside the float32 policy.

    Norms, biases, modulation, embeddings, convolutions and the float32-policy Linears
    (time MLPs, head, ...) never are.
    """
    names = {f"{mn}.weight" if mn else "weight" for mn, m in model.named_modules() if isinstance(m, CastLinear)}
    return {n for n in names if keep_fp32 is None or not keep_fp32(n)}


def _read_fp8(tf: TensorFile, recipe: Recipe, scales: dict[str, str],
              mode: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One eligible Linear weight in fp8 storage: (fp8 tensor, float32 0-d scale or None).

    An fp8 file tensor already in the wanted format is kept as it is, with its
    ``scale_weight`` when scaled (no dequantise/requantise). Anything else is dequantised to
    float32 and quantised to scaled fp8 (:func:`wan_core.fp8.quantize`). Returns None for
    ``mode == "keep"`` and a non-fp8 file tensor (it follows the ``dtype`` rule).
    """
    key = recipe.keys[0]
    src = tf.dtype(key)
    want = fp8.WEIGHT_DTYPES[mode]
    if recipe.op == "copy" and fp8.is_fp8(src) and (want is None or want == src):
        scale = tf.read(scales[key]).to(torch.float32).reshape(()) if key in scales else None
        return tf.read(key), scale
    if want is None and not fp8.is_fp8(src):
        return None
    fmt = want if want is not None else src     # "keep" of an fp8 tensor built by a cat/transpose
    return fp8.quantize(_read_recipe(tf, recipe, scales), fmt, scaled=True)


def load_module(path: str | os.PathLike, kind: str, build, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu",
                keep_fp32: Callable[[str], bool] | None = None,
                weight_dtype: str | torch.dtype | None = None) -> tuple[nn.Module, Detected]:
    """Build ``build(config)`` on the meta device and stream ``path``'s tensors into it.

    ``kind``: the expected kind ("dit", "vae", "t5", "clip_vision"); another kind raises a
    :class:`CheckpointError` that says which loader the file belongs to.
    ``dtype``: storage dtype of floating tensors (None keeps the file's: fp8 Linear weights
    stay fp8, other fp8 tensors become bf16);
    names for which ``keep_fp32(name)`` is true are stored float32 whatever ``dtype`` is
    (each network's precision policy).
    ``weight_dtype``: fp8 storage of the Linear weights outside the float32 policy (see
    :mod:`wan_core.fp8`): None (default) = "keep" when ``dtype`` is None, else no fp8 and
    everything follows ``dtype``; "keep" =
    weights that are fp8 in the file stay fp8 (scaled ones with their ``scale_weight``);
    "fp8_e4m3fn" / "fp8_e5m2" = every such weight is stored in that format (kept as is
    when the file already has it, otherwise quantised per tensor to scaled fp8).
    Returns the module (eval mode, no grad) and the detection result.
    """
    path = Path(path)
    mode = fp8.parse_weight_dtype(weight_dtype)
    if weight_dtype is None and dtype is None:
        mode = "keep"   # "as in the file": an fp8 file stays fp8 (a 14B fp8 DiT is 14 GB, not 28)
    device = torch.device(device)
    with open_checkpoint(path) as tf:
        det = detect(tf)
        _expect_kind(det, kind, path)
        try:
            with torch.device("meta"):
                model = build(det.config)
        except (ValueError, RuntimeError, AssertionError, TypeError, ZeroDivisionError) as err:
            raise CheckpointError(f"{path.name}: the config inferred from its shapes ({det.description}) "
                                  f"cannot be built ({type(err).__name__}); the file is corrupt or of an "
                                  "unsupported variant.") from err
        if not hasattr(model, "checkpoint_report"):   # the network contract (docs/DEVELOPING.md)
            raise TypeError(f"{type(model).__name__} does not declare 'checkpoint_report: LoadReport | None'.")
        params = dict(model.named_parameters())
        unexpected = sorted(n for n in det.recipes if n not in params)
        if unexpected:
            keys = [det.recipes[n].keys[0] for n in unexpected]
            raise CheckpointError(f"{path.name}: unknown keys for {det.description}: "
                                  f"{', '.join(shown(k) for k in keys[:8])}"
                                  f"{' ...' if len(keys) > 8 else ''}.")
        optional = _OPTIONAL_PARAMS.get(kind, ())
        missing = sorted(n for n in params if n not in det.recipes and n not in optional)
        if missing:
            raise CheckpointError(f"{path.name}: incomplete {det.description}: missing "
                                  f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}.")
        scales = dict(det.scales)
        src_dtypes: set[str] = set()
        stored: set[str] = set()
        eligible = _fp8_eligible(model, keep_fp32) if mode is not None else set()
        non_finite: list[str] = []                   # file keys with NaN/Inf
        overflow: list[tuple[str, str]] = []         # (file key, dtype) finite in the file, not stored
        gguf = isinstance(tf, GGUFFile)
        for name, recipe in det.recipes.items():
            src = tf.dtype(recipe.keys[0])
            src_dtypes.add(tf.ggml_type(recipe.keys[0]) if gguf else str(src).replace("torch.", ""))
            placed = place_quantized(model, name, tf, recipe.keys[0], device, keep_fp32) if gguf else None
            if placed is not None:   # GGML blocks kept quantized (wan_core.gguf / wan_core.quant)
                qtype, finite = placed
                if not finite:
                    non_finite.append(recipe.keys[0])
                stored.add(qtype)
                continue
            packed = _read_fp8(tf, recipe, scales, mode) if name in eligible else None  # type: ignore[arg-type]
            if packed is not None:
                q, scale = packed
                q = q.to(device)
                if not _finite(q, scale):
                    non_finite.append(recipe.keys[0])
                _assign(model, name, q, path, recipe.keys[0])
                if scale is not None:
                    owner = model.get_submodule(name.rpartition(".")[0])
                    owner.register_parameter("scale_weight", nn.Parameter(scale.to(device), requires_grad=False))
                stored.add(str(q.dtype).replace("torch.", "") + ("-scaled" if scale is not None else ""))
                continue
            raw = _read_recipe(tf, recipe, scales)
            target = _target_dtype(name, src, dtype, keep_fp32)
            t = raw.to(device=device, dtype=target)
            if not _finite(t):
                if _finite(raw):
                    overflow.append((recipe.keys[0], str(target).replace("torch.", "")))
                else:
                    non_finite.append(recipe.keys[0])
            del raw
            stored.add(str(target).replace("torch.", ""))
            _assign(model, name, t, path, recipe.keys[0])
        for name in optional:
            if name in params and name not in det.recipes:
                p = params[name]
                _assign(model, name, torch.zeros(p.shape, dtype=dtype or torch.float32, device=device), path, name)
        if non_finite or overflow:
            raise _non_finite_error(path, non_finite, overflow)
    model.eval().requires_grad_(False)
    report = LoadReport(path, det.kind, det.layout, det.config.variant, det.quant, tuple(sorted(src_dtypes)),
                        "/".join(sorted(stored)), det.config)
    model.checkpoint_report = report
    log.info(report.line())
    return model, det


def read_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> tuple[dict[str, torch.Tensor], Detected]:
    """The whole checkpoint as internal (official) names, dequantised; for tests and tools.

    Holds every tensor in memory: use the ``load_*`` functions for real models.
    """
    out: dict[str, torch.Tensor] = {}
    with open_checkpoint(path) as tf:
        det = detect(tf)
        scales = dict(det.scales)
        for name, recipe in det.recipes.items():
            t = _read_recipe(tf, recipe, scales)
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out, det


def find_tokenizer(path: Path, det: Detected, tokenizer_path: str | os.PathLike | None = None) -> bytes:
    """Serialized sentencepiece model for a umT5 file, checked before any weight is read.

    Order: an explicit ``tokenizer_path``; the ``spiece_model`` tensor ComfyUI embeds; a
    ``spiece.model`` next to the file or in ``google/umt5-xxl/`` beside it (official layout).
    """
    candidates = []
    if tokenizer_path is not None:
        tp = Path(tokenizer_path)
        candidates.append(tp / "spiece.model" if tp.is_dir() else tp)
        if not candidates[-1].is_file():
            raise CheckpointError(f"tokenizer file {candidates[-1]} does not exist.")
    if not candidates and det.tokenizer_key is not None:
        with open_checkpoint(path) as tf:
            return tf.read(det.tokenizer_key).numpy().tobytes()
    if path.is_dir():   # a diffusers text_encoder/ folder: the tokenizer is in ../tokenizer/
        candidates += [path / "spiece.model", path.parent / "tokenizer" / "spiece.model"]
    candidates += [path.parent / "spiece.model", path.parent / "google" / "umt5-xxl" / "spiece.model",
                   path.parent / f"{path.stem}.spiece.model"]
    for c in candidates:
        if c.is_file():
            return c.read_bytes()
    raise CheckpointError(
        f"{path.name} is a umT5 text encoder without an embedded tokenizer (no 'spiece_model' key). "
        f"Put the umT5 tokenizer file 'spiece.model' (from google/umt5-xxl in the Wan 2.1 repo) next to "
        f"it as {path.parent / 'spiece.model'}, or use ComfyUI's umt5_xxl_fp16.safetensors / "
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors, which embed it.")

