"""LoRA files: the key layouts Wan Core reads, and the checks a file passes before any model changes.

Layouts read (detected from the keys; diffusers names are assumed file-wide):

- official names, bare or with ``diffusion_model.`` / ``model.diffusion_model.``:
  ``blocks.0.self_attn.q.lora_down.weight`` / ``.lora_up.weight`` (+ ``.alpha``) or
  ``.lora_A.weight`` / ``.lora_B.weight`` (Kijai, diffusion-pipe, lightx2v, CausVid ...);
- diffusers / PEFT names, bare or with ``transformer.`` / ``base_model.model.``:
  ``blocks.0.attn1.to_q.lora_A.weight``; module paths are converted with
  :func:`wan_core.layouts.dit_key_from_diffusers` (the one place keys are renamed); a PEFT
  alpha stored in the ``lora_adapter_metadata`` header entry is honoured;
- kohya / musubi-tuner / ComfyUI underscored paths: ``lora_unet_blocks_0_self_attn_q.lora_down.weight``
  (also ``lycoris_`` and the Wan-Fun ``lora_unet__`` spelling), matched against the model's
  own module names with dots replaced by underscores. Underscored *diffusers* names
  (OneTrainer ``lora_transformer_blocks_0_attn1_to_q``) are not mapped: reported unmatched.

Besides low-rank pairs, the common Wan distillation LoRAs (lightx2v cfg/step distill, CausVid,
AccVid) carry full deltas, which are applied with the strength and no alpha:
``<module>.diff`` (weight delta: norms, ``norm_q``/``norm_k``, sometimes Linear or the patch
embedding), ``<module>.diff_b`` (bias delta) and ``blocks.N.diff_m`` (delta of
``blocks.N.modulation``); diffusers' conversion of them, ``.lora_B.bias``, reads as
``diff_b``. DoRA, LoHa, LoKr and OFT files are refused with a clear error.

Keys that match nothing (unknown suffix, a layer the model lacks such as ``k_img`` on a T2V
model, a lone ``alpha``) are listed by name in the report and logged as one warning;
``strict=True`` raises instead. A file that matches nothing at all raises :class:`LoraError`.

:func:`check_loras` is the one validator of both modes of :func:`wan_core.lora.apply_loras`
(so "merge" and "unmerged" refuse exactly the same files). It reads the whole of every file
and changes nothing; a file is refused, with a :class:`LoraError` naming it and the key,
unless:

- it opens and is a plain LoRA (not DoRA/LoHa/LoKr/OFT) of which something matches the model;
- every pair is complete: a ``lora_down`` without its ``lora_up`` on a layer the model has is
  an error (on a layer it lacks, an unmatched key);
- the ranks agree (``up [out, r(, 1...)]``, ``down [r, in(, k...)]``) and are bounded
  (``1 <= r <= max(out, in)``), and ``B @ A`` has the target's shape; ``diff`` tensors have
  the target's shape (size-1 dims aside): a shape of another model size is an error, not an
  unmatched key;
- no two entries change the same parameter (``lora_A`` next to ``lora_down``, one layer under
  two prefixes, a pair and a ``diff`` on one weight);
- weights are floating point and finite (their values are not read at strength 0; they are
  checked again as they are applied, so a file changed in between is caught too), and no
  delta can change a weight entry by more than 1e4, strength included (a cheap bound,
  ``|B[i, :]| * |A[:, j]|``; Wan weights are O(1)), so a merge never overflows and both modes
  refuse the same garbage;
- ``alpha`` is one finite number > 0 (a PEFT ``lora_alpha`` / ``alpha_pattern`` too, whose
  patterns must be plain module-name patterns), and ``strength * alpha / rank`` is finite;
- the strength is a finite number.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .files import CheckpointError, TensorFile, open_checkpoint
from .fp8 import is_fp8
from .layouts import dit_key_from_diffusers
from .quant import quantized_param_shapes

__all__ = ["LoraError", "LoraSpec", "LoraFileReport", "Patch", "Plan", "check_loras", "read_checked", "refuse"]

log = logging.getLogger("wan_core")

# Key suffix -> role. Order matters only where one suffix ends another (none do today).
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_B.bias", "diff_b"), (".lora_B.default.bias", "diff_b"),
    (".alpha", "alpha"), (".diff", "diff"), (".diff_b", "diff_b"), (".diff_m", "diff_m"),
)
# Adapters whose formula is not W + s*B@A: applying only their low-rank part would be wrong.
_UNSUPPORTED = (".dora_scale", ".hada_w1_a", ".hada_w1_b", ".lokr_w1", ".lokr_w1_a", ".oft_blocks",
                ".oft_diag", ".lora_mid.weight")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_UNDERSCORE_PREFIXES = ("lora_unet_", "lycoris_")
# Path fragments only the diffusers WanTransformer3DModel uses.
_DIFFUSERS_MARKERS = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|proj_out|scale_shift_table)(\.|$)|\.ffn\.net\.")
# Full deltas: role -> leaf of the target (None: the path names the parameter or its module's weight).
_FULL_ROLES = (("diff", None), ("diff_b", "bias"), ("diff_m", "modulation"))
# PEFT alpha_pattern keys are regular expressions from the file: bounded, and no quantified
# group (the shape of catastrophic backtracking), so matching them cannot hang.
_MAX_PATTERN = 256
_NESTED_QUANTIFIER = re.compile(r"\)[*+{]")
# Largest change of any weight entry a LoRA may make (strength included). Wan weights are
# O(1) (|w| < 10); trained LoRAs reach O(1)-O(10) by the bound below; 1e4 leaves three orders
# of magnitude and keeps every merged value finite, even in float16 storage.
_MAX_DELTA = 1e4
_CORRUPT = "the file is corrupt or was written wrongly: re-download or re-export it; nothing was applied"


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to this model; the message says why and what to do."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and its strength (0 = off; negative subtracts the LoRA)."""

    path: str | os.PathLike
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.strength)):
            raise ValueError(f"LoRA strength must be a finite number, got {self.strength!r}")


@dataclass(frozen=True)
class LoraFileReport:
    """What one file did: targets are official parameter names, unmatched are file keys."""

    path: Path
    strength: float
    layout: str                    # "official" | "comfy" | "diffusers" | "kohya"
    matched: tuple[str, ...]       # parameters changed (or hooked)
    unmatched: tuple[str, ...]     # file keys that matched nothing in the model
    rank: int | None = None        # largest rank of its low-rank pairs


@dataclass(frozen=True)
class Patch:
    """One delta for one parameter: ``kind`` "lowrank" (keys down, up) or "full" (key diff)."""

    target: str
    kind: str
    keys: tuple[str, ...]
    scale: float
    file: int


@dataclass
class Plan:
    """What :func:`check_loras` found: the open files, their reports, patches by parameter
    (in file order)."""

    files: list[TensorFile] = field(default_factory=list)
    reports: list[LoraFileReport] = field(default_factory=list)
    by_target: dict[str, list[Patch]] = field(default_factory=dict)


def refuse(tf: TensorFile, key: str, what: str) -> LoraError:
    """The error refusing ``key`` of ``tf``: ``"<file name>: LoRA key '<key>' <what>"``."""
    return LoraError(f"{tf.path.name}: LoRA key '{key}' {what}")


# --------------------------------------------------------------------------- key names


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _layout_of(paths: Sequence[str]) -> str:
    if any(p.startswith(_UNDERSCORE_PREFIXES) for p in paths):
        return "kohya"
    stripped = [_strip(p) for p in paths]
    if any(_DIFFUSERS_MARKERS.search(p) for p in stripped):
        return "diffusers"
    if any(p.startswith(("diffusion_model.", "model.diffusion_model.")) for p in paths):
        return "comfy"
    return "official"


def _strip(path: str) -> str:
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def _official_path(path: str, layout: str, underscored: dict[str, str]) -> str | None:
    """Official module (or parameter) path of a LoRA module path, None if unknown."""
    for prefix in _UNDERSCORE_PREFIXES:
        if path.startswith(prefix):  # "lora_unet__blocks_0_..." is the Wan-Fun spelling
            return underscored.get(path[len(prefix):].lstrip("_"))
    path = _strip(path)
    if layout == "diffusers":
        renamed = dit_key_from_diffusers(path)  # whole-parameter renames (scale_shift_table)
        if renamed == path:
            # module paths: the rules match "<module>.<leaf>", so convert a dummy leaf
            renamed = dit_key_from_diffusers(path + ".weight")[: -len(".weight")]
        path = renamed
    return path


def _target(params: dict[str, nn.Parameter], official: str | None, leaf: str | None) -> str | None:
    """Parameter ``<official>.<leaf>`` if the model has it; ``leaf=None``: the path itself
    names a parameter (``blocks.0.modulation.diff``) or a module's weight (``norm3.diff``)."""
    if official is None:
        return None
    if leaf is None:
        return official if official in params else (official + ".weight" if official + ".weight" in params else None)
    return f"{official}.{leaf}" if f"{official}.{leaf}" in params else None


# --------------------------------------------------------------------------- checking


def _positive(value: object) -> float | None:
    """``value`` as a finite number > 0, else None (bools and non-numbers are not alphas)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def _peft_alpha(tf: TensorFile) -> Callable[[str], float | None]:
    """alpha of a diffusers/PEFT file from its ``lora_adapter_metadata`` (None: not given)."""
    raw = (tf.metadata or {}).get("lora_adapter_metadata")
    if raw is None:
        return lambda path: None
    where = "header entry 'lora_adapter_metadata'"
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("alpha_pattern") or {}, dict):
        raise LoraError(f"{tf.path.name}: its {where} is not a JSON object with an 'alpha_pattern' object; "
                        f"{_CORRUPT}.")
    alpha = None
    if meta.get("lora_alpha") is not None and (alpha := _positive(meta["lora_alpha"])) is None:
        raise LoraError(f"{tf.path.name}: 'lora_alpha' in its {where} is not a finite number > 0; {_CORRUPT}.")
    patterns: list[tuple[re.Pattern, float]] = []
    for pat, value in (meta.get("alpha_pattern") or {}).items():
        ok = _positive(value)
        if ok is None or len(pat) > _MAX_PATTERN or _NESTED_QUANTIFIER.search(pat):
            raise LoraError(f"{tf.path.name}: an 'alpha_pattern' entry of its {where} is not a module name "
                            f"with a finite alpha > 0; {_CORRUPT}.")
        try:  # PEFT matches pattern keys against the module name's end
            patterns.append((re.compile(rf"(.*\.)?(?:{pat})"), ok))
        except re.error:
            raise LoraError(f"{tf.path.name}: an 'alpha_pattern' key of its {where} is not a valid "
                            f"pattern; {_CORRUPT}.") from None

    def alpha_of(path: str) -> float | None:
        for regex, value in patterns:
            if regex.fullmatch(path):
                return value
        return alpha
    return alpha_of


def _read(tf: TensorFile, key: str) -> Tensor:
    try:
        return tf.read(key)
    except LoraError:
        raise
    except CheckpointError as exc:
        raise refuse(tf, key, f"cannot be read: {exc}") from exc


def _file_alpha(tf: TensorFile, key: str) -> float:
    """The ``.alpha`` tensor ``key``: one finite number > 0 (any float or int dtype)."""
    shape, dtype = tf.shape(key), tf.dtype(key)
    if math.prod(shape) != 1 or dtype == torch.bool or dtype.is_complex:
        raise refuse(tf, key, f"is {dtype} {list(shape)}; an alpha is one number; {_CORRUPT}.")
    value = _positive(_read(tf, key).to(torch.float64).reshape(-1)[0].item())
    if value is None:
        raise refuse(tf, key, f"is not a finite number > 0 (NaN, inf, zero or negative); {_CORRUPT}.")
    return value


def _check_pair(tf: TensorFile, down_key: str, up_key: str, target: str, shape: torch.Size) -> int:
    """Rank of the pair after checking that ``B [out, r] @ A [r, in]`` gives ``shape``
    (conv weights flattened: ``A [r, in, k...]``, ``B [out, r, 1...]``)."""
    down, up = tf.shape(down_key), tf.shape(up_key)
    for key in (down_key, up_key):
        if not tf.dtype(key).is_floating_point:
            raise refuse(tf, key, f"is {tf.dtype(key)}; LoRA weights are floating point; {_CORRUPT}.")
    if len(down) < 2 or len(up) < 2 or up[1] != down[0] or any(d != 1 for d in up[2:]):
        raise refuse(tf, up_key, f"{list(up)} and its lora_down {list(down)} are not a pair of ranks "
                                  f"[out, r] and [r, in]; {_CORRUPT}.")
    if len(shape) < 2:
        raise refuse(tf, up_key, f"is a low-rank pair for {target} {list(shape)}, which is not a matrix; "
                                 f"{_CORRUPT}.")
    r = down[0]
    out, fan_in = shape[0], math.prod(shape[1:])
    if up[0] != out or math.prod(down[1:]) != fan_in:
        raise refuse(tf, up_key, f"{list(up)} @ {list(down)} does not give {target} {list(shape)}: this "
                                  "LoRA was made for another model size or variant (1.3B vs 14B, T2V vs I2V); "
                                  "use one made for this model.")
    if not 1 <= r <= max(out, fan_in):
        raise refuse(tf, down_key, f"has rank {r}; a rank is between 1 and {max(out, fan_in)} for {target}; "
                                    f"{_CORRUPT}.")
    return r


def _check_full(tf: TensorFile, key: str, target: str, shape: torch.Size) -> None:
    """A full delta ``key`` must be floating point with ``shape`` (size-1 dims aside)."""
    if not tf.dtype(key).is_floating_point:
        raise refuse(tf, key, f"is {tf.dtype(key)}; LoRA weights are floating point; {_CORRUPT}.")
    have = [d for d in tf.shape(key) if d != 1]
    if have != [d for d in shape if d != 1]:
        raise refuse(tf, key, f"{list(tf.shape(key))} does not fit {target} {list(shape)}: this LoRA was made "
                               "for another model size or variant; use one made for this model.")


def read_checked(tf: TensorFile, key: str) -> Tensor:
    """One LoRA weight tensor, refused unless floating point and finite. Used when checking
    and again when applying, so a file changed in between is caught too."""
    t = _read(tf, key)
    if not t.is_floating_point():
        raise refuse(tf, key, f"is {t.dtype}; LoRA weights are floating point; {_CORRUPT}.")
    if not torch.isfinite(t.float() if is_fp8(t.dtype) else t).all():
        raise refuse(tf, key, f"holds NaN or inf values; {_CORRUPT}.")
    return t


def _check_reach(tf: TensorFile, patch: Patch, tensors: list[Tensor]) -> None:
    """Refuse a delta that may exceed :data:`_MAX_DELTA` anywhere. Bound of a pair, by
    Cauchy-Schwarz: ``|(B @ A)[i, j]| <= |B[i, :]| * |A[:, j]|`` (cheap: no ``B @ A``)."""
    if patch.kind == "lowrank":
        a, b = (t.float().flatten(1) for t in tensors)
        reach = float(b.norm(dim=1).max() * a.norm(dim=0).max()) * abs(patch.scale)
    else:
        reach = float(tensors[0].float().abs().max()) * abs(patch.scale)
    if not reach <= _MAX_DELTA:  # also catches an overflow to inf or NaN
        raise refuse(tf, patch.keys[-1], f"may change {patch.target} by up to {reach:.3g} (scale included); no Wan "
                                         f"weight is near {_MAX_DELTA:g}: the values are garbage or the strength far "
                                         "too large; nothing was applied.")


def _check_file(tf: TensorFile, strength: float, index: int, params: dict[str, nn.Parameter],
                underscored: dict[str, str]) -> tuple[list[Patch], list[str], str, int | None]:
    """Patches of one file, its unmatched keys, layout and largest rank; raises
    :class:`LoraError` at the first problem. Reads no weight data at strength 0."""
    bad = sorted(k for k in tf.keys() if k.endswith(_UNSUPPORTED))
    if bad:
        raise LoraError(f"{tf.path.name} is a DoRA/LoHa/LoKr/OFT adapter (key '{bad[0]}'); Wan Core applies only "
                        "plain LoRA (lora_up/lora_down, lora_A/lora_B) and diff tensors.")
    groups: dict[str, dict[str, str]] = {}
    unmatched: list[str] = []
    for key in tf.keys():
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        roles = groups.setdefault(split[0], {})
        if split[1] in roles:  # lora_A next to lora_down, .lora_B.bias next to .diff_b
            raise refuse(tf, key, f"and '{roles[split[1]]}' are two {split[1]} tensors of one layer; "
                                   f"{_CORRUPT}.")
        roles[split[1]] = key
    layout = _layout_of(list(groups))
    peft_alpha = _peft_alpha(tf) if layout == "diffusers" else (lambda path: None)
    patches: list[Patch] = []
    claimed: dict[str, str] = {}   # parameter -> the key that already changes it
    rank = None

    def claim(target: str, key: str) -> None:
        if target in claimed:
            raise refuse(tf, key, f"and '{claimed[target]}' both change {target}; a file may change each "
                                   f"parameter once; {_CORRUPT}.")
        claimed[target] = key

    for path, roles in groups.items():
        official = _official_path(path, layout, underscored)
        used: set[str] = set()
        if "down" in roles or "up" in roles:
            t = _target(params, official, "weight")
            if t is not None:
                if "down" not in roles or "up" not in roles:
                    have, lacks = ("down", "lora_up/lora_B") if "down" in roles else ("up", "lora_down/lora_A")
                    raise refuse(tf, roles[have], f"has no {lacks} partner: the pair for {t} is incomplete; "
                                                   f"{_CORRUPT}.")
                r = _check_pair(tf, roles["down"], roles["up"], t, params[t].shape)
                if "alpha" in roles:
                    alpha = _file_alpha(tf, roles["alpha"])
                    used.add(roles["alpha"])
                else:
                    alpha = peft_alpha(_strip(path))
                scale = strength * (alpha / r if alpha is not None else 1.0)
                if not math.isfinite(scale):
                    raise refuse(tf, roles.get("alpha", roles["up"]), f"gives a scale of {scale} for strength "
                                                                       f"{strength:g}; {_CORRUPT}.")
                claim(t, roles["up"])
                patches.append(Patch(t, "lowrank", (roles["down"], roles["up"]), scale, index))
                used.update((roles["down"], roles["up"]))
                rank = max(rank or 0, r)
        for role, leaf in _FULL_ROLES:
            if role in roles and (t := _target(params, official, leaf)) is not None:
                _check_full(tf, roles[role], t, params[t].shape)
                claim(t, roles[role])
                patches.append(Patch(t, "full", (roles[role],), strength, index))
                used.add(roles[role])
        unmatched.extend(k for k in roles.values() if k not in used)
    if not patches:
        raise LoraError(f"{tf.path.name} matches nothing in this model: first keys: "
                        f"{', '.join(sorted(tf.keys())[:4]) or '(none)'}; it is not a Wan 2.1 DiT LoRA in a "
                        "known layout.")
    if strength != 0.0:  # values checked now (a pair at a time) and again as they are applied
        for patch in patches:
            _check_reach(tf, patch, [read_checked(tf, key) for key in patch.keys])
    return patches, sorted(unmatched), layout, rank


def check_loras(model: nn.Module, specs: Sequence[LoraSpec], strict: bool, plan: Plan) -> None:
    """Open and check every file into ``plan`` (the one validator of both modes of
    :func:`wan_core.lora.apply_loras`); the model is not changed. Files are appended to
    ``plan.files`` as they are opened: the caller closes them, also when this raises."""
    params = dict(model.named_parameters())
    # GGUF-quantized weights hold raw blocks: match LoRAs against their real shape (wan_core.quant)
    params.update({n: torch.empty(s, device="meta") for n, s in quantized_param_shapes(model).items()})
    underscored = {n.replace(".", "_"): n for n, _ in model.named_modules() if n}
    underscored.update({n.replace(".", "_"): n for n in params})
    for i, spec in enumerate(specs):
        try:
            strength = float(spec.strength)
        except (TypeError, ValueError, AttributeError):
            strength = math.nan
        name = Path(getattr(spec, "path", "?")).name
        if not math.isfinite(strength):
            raise LoraError(f"{name}: LoRA strength {getattr(spec, 'strength', None)!r} is not a finite number.")
        try:
            tf = open_checkpoint(spec.path)
        except LoraError:
            raise
        except CheckpointError as exc:
            raise LoraError(str(exc)) from exc
        plan.files.append(tf)
        try:
            patches, unmatched, layout, rank = _check_file(tf, strength, i, params, underscored)
        except LoraError:
            raise
        except Exception as exc:  # e.g. an I/O error while reading: still one error naming the file
            raise LoraError(f"{tf.path.name}: checking the LoRA failed ({type(exc).__name__}: {exc}); "
                            "nothing was applied.") from exc
        if unmatched:
            msg = (f"{tf.path.name}: {len(unmatched)} LoRA keys match nothing in this model: "
                   f"{', '.join(unmatched[:12])}{' ...' if len(unmatched) > 12 else ''}")
            if strict:
                raise LoraError(msg)
            log.warning("wan_core: %s", msg)
        active = strength != 0.0
        plan.reports.append(LoraFileReport(tf.path, strength, layout,
                                           tuple(sorted({p.target for p in patches})) if active else (),
                                           tuple(unmatched), rank))
        if active:
            for p in patches:
                plan.by_target.setdefault(p.target, []).append(p)


