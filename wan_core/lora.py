"""LoRA files applied to a Wan network, merged into the weights or added at call time.

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

Scale of a low-rank pair: ``strength * alpha / rank`` (no alpha: ``strength``), so the
weight becomes ``W + scale * (B @ A)`` computed in float32 (``A`` = down ``[r, in]``, ``B``
= up ``[out, r]``; conv weights are flattened). Several files chain: their deltas add up.

Two modes of :func:`apply_loras`:

- ``"merge"``: deltas are added to the weights once (no cost per step). fp8 storage
  (``wan_core.layers.CastLinear`` contract: fp8 ``weight`` and optional float32
  ``scale_weight``) is dequantised, merged in float32 and re-quantised to the same format:
  scaled weights get a new ``scale_weight = absmax / fp8_max``, unscaled ones a plain cast
  (clamped to the fp8 range). The result is one fp8 rounding of the exact merged weight:
  relative rms error 2.7 % (e4m3fn) / 5.3 % (e5m2) of the weight, the same as the file's
  own quantisation. But a LoRA delta much smaller than the fp8 step is mostly rounded away:
  measured on a 512x512 e4m3fn weight, a delta of 1 % / 3 % / 10 % of ``|W|`` (rms) is
  applied with an rms error of 0.89 / 0.64 / 0.26 times the delta itself (e5m2: 0.93 / 0.80
  / 0.46). ``fp8_rounding="stochastic"`` (ComfyUI's choice) is unbiased but noisier: 2.2 /
  1.1 / 0.37. For fp8 models and small LoRAs prefer "unmerged", which is
  exact. Not reversible (reload the model).
- ``"unmerged"``: every targeted ``CastLinear`` gets a forward hook adding
  ``scale * (x @ A^T) @ B^T`` (and diff / diff_b terms) in the input's dtype; the weights are
  untouched. Full deltas of other parameters (norm weights, modulation, patch embedding)
  cannot be hooked cheaply, so they are patched in place with the original tensor kept;
  :meth:`LoraReport.remove` restores the model bit for bit.

Keys that match nothing (unknown suffix, incomplete pair, a layer the model lacks such as
``k_img`` on a T2V model) are listed by name in the report and logged as one warning;
``strict=True`` raises instead. A file that matches nothing at all, or whose shapes belong
to another model size, raises :class:`LoraError`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .files import CheckpointError, TensorFile, open_checkpoint
from .layers import CastLinear
from .layouts import dit_key_from_diffusers

__all__ = ["LoraError", "LoraFileReport", "LoraReport", "LoraSpec", "applied_loras", "apply_loras"]

log = logging.getLogger("wan_core")

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_MANTISSA = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}

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
class LoraReport:
    """Result of :func:`apply_loras`. ``remove()`` undoes an ``"unmerged"`` application."""

    mode: str
    files: tuple[LoraFileReport, ...]
    _undo: list = field(default_factory=list, repr=False, compare=False)

    @property
    def matched(self) -> tuple[str, ...]:
        """Official names of every parameter changed or hooked, sorted."""
        return tuple(sorted({t for f in self.files for t in f.matched}))

    @property
    def unmatched(self) -> tuple[str, ...]:
        """``"<file name>: <key>"`` for every key that matched nothing."""
        return tuple(f"{f.path.name}: {k}" for f in self.files for k in f.unmatched)

    def remove(self) -> None:
        """Restore the model exactly (``"unmerged"`` only; a merge is permanent). Idempotent."""
        if self.mode == "merge" and any(f.matched for f in self.files):
            raise RuntimeError("merged LoRAs cannot be removed; reload the model instead")
        while self._undo:
            self._undo.pop()()

    def line(self) -> str:
        parts = [f"{f.path.name} x{f.strength:g} ({f.layout}, {len(f.matched)} tensors"
                 f"{f', {len(f.unmatched)} keys unmatched' if f.unmatched else ''})" for f in self.files]
        return f"wan_core: LoRA {self.mode}: " + ("; ".join(parts) or "none")


@dataclass(frozen=True)
class _Patch:
    """One delta for one parameter: ``kind`` "lowrank" (keys down, up) or "full" (key diff)."""

    target: str
    kind: str
    keys: tuple[str, ...]
    scale: float
    file: int


# --------------------------------------------------------------------------- parsing


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


def _peft_alpha(tf: TensorFile) -> Callable[[str], float | None]:
    """alpha of a diffusers/PEFT file from its ``lora_adapter_metadata`` (None: not given)."""
    raw = (tf.metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return lambda path: None
    try:
        meta = json.loads(raw)
    except ValueError:
        return lambda path: None
    alpha = meta.get("lora_alpha")
    pattern = meta.get("alpha_pattern") or {}

    def alpha_of(path: str) -> float | None:
        for pat, value in pattern.items():  # PEFT matches pattern keys against the module name's end
            if re.fullmatch(rf"(.*\.)?{pat}", path):
                return float(value)
        return None if alpha is None else float(alpha)
    return alpha_of


def _parse(tf: TensorFile, strength: float, file_index: int,
           params: dict[str, nn.Parameter], underscored: dict[str, str]
           ) -> tuple[list[_Patch], list[str], str, int | None]:
    """Patches of one file, its unmatched keys, layout and largest rank."""
    name = tf.path.name
    bad = sorted(k for k in tf.keys() if k.endswith(_UNSUPPORTED))
    if bad:
        raise LoraError(f"{name} is a DoRA/LoHa/LoKr/OFT adapter (key '{bad[0]}'); Wan Core applies only "
                        "plain LoRA (lora_up/lora_down, lora_A/lora_B) and diff tensors.")
    groups: dict[str, dict[str, str]] = {}
    unmatched: list[str] = []
    for key in tf.keys():
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = key
    layout = _layout_of(list(groups))
    peft_alpha = _peft_alpha(tf)
    patches: list[_Patch] = []
    mismatched: list[str] = []
    rank = None
    for path, roles in groups.items():
        official = _official_path(path, layout, underscored)
        used: set[str] = set()

        def check(tname: str, fits: bool, what: str) -> bool:
            if not fits:
                mismatched.append(f"{what} vs {tname} {list(params[tname].shape)}")
            return fits

        if "down" in roles and "up" in roles:
            t = _target(params, official, "weight")
            down, up = tf.shape(roles["down"]), tf.shape(roles["up"])
            r = down[0]
            # B [out, r(, 1...)] @ A [r, in(, k...)] must give the weight [out, in(, k...)]
            if t is not None and check(t, len(up) >= 2 and len(down) >= 2 and up[1] == r
                                       and params[t].shape[0] == up[0]
                                       and math.prod(params[t].shape[1:]) == math.prod(down[1:]),
                                       f"{roles['up']} {list(up)} @ {list(down)}"):
                if "alpha" in roles:
                    alpha = float(tf.read(roles["alpha"]).float().reshape(-1)[0])
                    used.add(roles["alpha"])
                else:
                    alpha = peft_alpha(_strip(path)) if layout == "diffusers" else None
                scale = strength * (alpha / r if alpha is not None else 1.0)
                patches.append(_Patch(t, "lowrank", (roles["down"], roles["up"]), scale, file_index))
                used.update((roles["down"], roles["up"]))
                rank = max(rank or 0, r)
        for role, leaf in (("diff", None), ("diff_b", "bias"), ("diff_m", "modulation")):
            if role in roles:
                t = _target(params, official, leaf)
                if t is not None and check(t, params[t].numel() == math.prod(tf.shape(roles[role])), roles[role]):
                    patches.append(_Patch(t, "full", (roles[role],), strength, file_index))
                    used.add(roles[role])
        unmatched.extend(k for k in roles.values() if k not in used)
    if not patches:
        why = (f"its shapes belong to another model size ({'; '.join(mismatched[:2])})" if mismatched else
               f"first keys: {', '.join(sorted(tf.keys())[:4])}; it is not a Wan 2.1 DiT LoRA in a known layout")
        raise LoraError(f"{name} matches nothing in this model: {why}.")
    if mismatched:
        # a few odd tensors (e.g. a head diff of another shape) must not refuse a good file;
        # their keys are reported as unmatched like any other
        log.warning("wan_core: %s: %d LoRA tensors do not fit this model's shapes, e.g. %s", name,
                    len(mismatched), "; ".join(mismatched[:3]))
    return patches, sorted(unmatched), layout, rank


# --------------------------------------------------------------------------- deltas


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), leaf


def _delta(tf: TensorFile, patch: _Patch, shape: torch.Size, device: torch.device) -> Tensor:
    """float32 delta ``[shape]`` of one patch, scale included, on ``device``."""
    if patch.kind == "lowrank":
        a = tf.read(patch.keys[0]).to(device=device, dtype=torch.float32).flatten(1)
        b = tf.read(patch.keys[1]).to(device=device, dtype=torch.float32).flatten(1)
        return (patch.scale * (b @ a)).reshape(shape)
    return (patch.scale * tf.read(patch.keys[0]).to(device=device, dtype=torch.float32)).reshape(shape)


def _real_weight(owner: nn.Module, leaf: str, p: Tensor) -> Tensor:
    """float32 value of a parameter, honouring the fp8 ``scale_weight`` contract."""
    w = p.detach().to(torch.float32, copy=True)  # a copy even for float32: deltas are added in place
    scale = getattr(owner, "scale_weight", None) if leaf == "weight" else None
    if p.dtype in _FP8 and scale is not None:
        w = w * scale.detach().to(torch.float32)
    return w


def _to_fp8(w: Tensor, fmt: torch.dtype, rounding: str, seed: int) -> Tensor:
    """float32 ``w`` -> ``fmt``, clamped to its range (e4m3fn has no inf: an overflow would be NaN).

    "stochastic" rounds each value up or down with probability proportional to its distance
    (unbiased): float32 bits get uniform noise below the fp8 mantissa and are truncated, then
    the cast is exact except in the fp8 subnormal range, where it rounds to nearest.
    """
    fmax = torch.finfo(fmt).max
    w = w.clamp(-fmax, fmax)
    if rounding == "nearest":
        return w.to(fmt)
    drop = 23 - _FP8_MANTISSA[fmt]  # float32 mantissa bits below the fp8 mantissa
    gen = torch.Generator(device=w.device).manual_seed(seed)
    noise = torch.randint(0, 1 << drop, w.shape, generator=gen, device=w.device, dtype=torch.int32)
    # sign-magnitude bits: adding noise and truncating rounds the magnitude, either sign
    bits = (w.contiguous().view(torch.int32) + noise) & ~((1 << drop) - 1)
    return bits.view(torch.float32).clamp(-fmax, fmax).to(fmt)


def _quantised(owner: nn.Module, leaf: str, p: Tensor, w: Tensor, rounding: str, seed: int
               ) -> tuple[Tensor, Tensor | None]:
    """``w`` (float32) in ``p``'s storage format: (new weight, new scale_weight or None)."""
    if p.dtype not in _FP8:
        return w.to(p.dtype), None
    scale = getattr(owner, "scale_weight", None) if leaf == "weight" else None
    if scale is None:
        return _to_fp8(w, p.dtype, rounding, seed), None
    s = w.abs().max() / torch.finfo(p.dtype).max
    s = torch.where(s > 0, s, torch.ones_like(s))
    return _to_fp8(w / s, p.dtype, rounding, seed), s.reshape(scale.shape).to(scale.dtype)


def _patch_params(model: nn.Module, files: list[TensorFile], by_target: dict[str, list[_Patch]],
                  keep_original: bool, fp8_rounding: str = "nearest") -> list[Callable[[], None]]:
    """Add the deltas to the parameters; with ``keep_original``, return undo callbacks."""
    undo: list[Callable[[], None]] = []
    for name, patches in by_target.items():
        owner, leaf = _owner(model, name)
        p = getattr(owner, leaf)
        w = _real_weight(owner, leaf, p)
        for patch in patches:
            w += _delta(files[patch.file], patch, w.shape, w.device)
        new, new_scale = _quantised(owner, leaf, p, w, fp8_rounding, zlib.crc32(name.encode()))
        del w
        scale = getattr(owner, "scale_weight", None) if new_scale is not None else None
        if keep_original:
            old, old_scale = p.data, None if scale is None else scale.data
            p.data = new
            if scale is not None:
                scale.data = new_scale

            def restore(p=p, old=old, scale=scale, old_scale=old_scale) -> None:
                p.data = old
                if scale is not None:
                    scale.data = old_scale
            undo.append(restore)
        else:
            p.data.copy_(new)  # in place: no second full-size copy of a big weight
            if scale is not None:
                scale.data.copy_(new_scale)
    return undo


# --------------------------------------------------------------------------- unmerged


class _LoraHook:
    """Forward hook of one CastLinear: adds the LoRA terms to its output in the input dtype."""

    def __init__(self) -> None:
        self.lowrank: list[tuple[Tensor, Tensor, float]] = []   # (A [r, in], B [out, r], scale)
        self.weight_diffs: list[tuple[Tensor, float]] = []      # (D [out, in], scale)
        self.bias_diffs: list[tuple[Tensor, float]] = []        # (d [out], scale)

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0]
        # .to(device) too: block swap may run the layer on another device than at apply time
        for a, b, s in self.lowrank:
            out = out + F.linear(F.linear(x, a.to(x.device, x.dtype)), b.to(x.device, x.dtype)) * s
        for d, s in self.weight_diffs:
            out = out + F.linear(x, d.to(x.device, x.dtype)) * s
        for d, s in self.bias_diffs:
            out = out + (d.to(out.device) * s).to(out.dtype)
        return out


def _hook_linears(model: nn.Module, files: list[TensorFile], by_target: dict[str, list[_Patch]]
                  ) -> tuple[list[Callable[[], None]], dict[str, list[_Patch]]]:
    """Hook every CastLinear target; returns undo callbacks and the patches left over."""
    hooks: dict[str, _LoraHook] = {}
    rest: dict[str, list[_Patch]] = {}
    for name, patches in by_target.items():
        owner, leaf = _owner(model, name)
        if not isinstance(owner, CastLinear) or leaf not in ("weight", "bias"):
            rest[name] = patches
            continue
        owner_name = name.rpartition(".")[0]
        hook = hooks.setdefault(owner_name, _LoraHook())
        device = owner.weight.device
        for patch in patches:
            tf = files[patch.file]
            if patch.kind == "lowrank":
                a, b = (tf.read(k).to(device).flatten(1) for k in patch.keys)
                hook.lowrank.append((a, b, patch.scale))
            elif leaf == "weight":
                hook.weight_diffs.append((tf.read(patch.keys[0]).to(device).reshape(owner.weight.shape), patch.scale))
            else:
                hook.bias_diffs.append((tf.read(patch.keys[0]).to(device).reshape(-1), patch.scale))
    undo = [model.get_submodule(n).register_forward_hook(h).remove for n, h in hooks.items()]
    return undo, rest


# --------------------------------------------------------------------------- entry points


def apply_loras(model: nn.Module, specs: Sequence[LoraSpec], mode: str = "merge",
                strict: bool = False, fp8_rounding: str = "nearest") -> LoraReport:
    """Apply LoRA files (in order; their deltas add up) to ``model`` (official parameter names).

    Args:
        model: a Wan network, usually :class:`wan_core.dit.WanDiT`, on any device; deltas are
            computed on the device of each weight.
        specs: files and strengths; strength 0 reads only the header (keys are still checked
            and reported) and changes nothing.
        mode: ``"merge"`` (into the weights, permanent) or ``"unmerged"`` (hooks; ``remove()``).
        strict: raise :class:`LoraError` if any key matches nothing, instead of reporting it.
        fp8_rounding: how merged fp8 weights are re-quantised: "nearest" (default, lower rms
            error) or "stochastic" (unbiased, seeded per parameter name so results repeat);
            figures in the module docstring.

    Returns:
        :class:`LoraReport`; unmatched keys are also logged as one warning per file.
    """
    if mode not in ("merge", "unmerged"):
        raise ValueError(f"LoRA mode must be 'merge' or 'unmerged', got {mode!r}")
    if fp8_rounding not in ("stochastic", "nearest"):
        raise ValueError(f"fp8_rounding must be 'stochastic' or 'nearest', got {fp8_rounding!r}")
    params = dict(model.named_parameters())
    underscored = {n.replace(".", "_"): n for n, _ in model.named_modules() if n}
    underscored.update({n.replace(".", "_"): n for n in params})
    files: list[TensorFile] = []
    reports: list[LoraFileReport] = []
    by_target: dict[str, list[_Patch]] = {}
    try:
        for i, spec in enumerate(specs):
            tf = open_checkpoint(spec.path)
            files.append(tf)
            patches, unmatched, layout, rank = _parse(tf, float(spec.strength), i, params, underscored)
            if unmatched:
                msg = (f"{tf.path.name}: {len(unmatched)} LoRA keys match nothing in this model: "
                       f"{', '.join(unmatched[:12])}{' ...' if len(unmatched) > 12 else ''}")
                if strict:
                    raise LoraError(msg)
                log.warning("wan_core: %s", msg)
            active = float(spec.strength) != 0.0
            reports.append(LoraFileReport(tf.path, float(spec.strength), layout,
                                          tuple(sorted({p.target for p in patches})) if active else (),
                                          tuple(unmatched), rank))
            if active:
                for p in patches:
                    by_target.setdefault(p.target, []).append(p)
        with torch.no_grad():
            if mode == "merge":
                undo = _patch_params(model, files, by_target, keep_original=False, fp8_rounding=fp8_rounding)
            else:
                undo, rest = _hook_linears(model, files, by_target)
                undo += _patch_params(model, files, rest, keep_original=True, fp8_rounding=fp8_rounding)
    finally:
        for tf in files:
            tf.close()
    report = LoraReport(mode, tuple(reports), undo)
    log.info(report.line())
    return report


@contextmanager
def applied_loras(model: nn.Module, specs: Sequence[LoraSpec], strict: bool = False) -> Iterator[LoraReport]:
    """``with applied_loras(dit, specs) as report:`` LoRAs unmerged inside, removed on exit."""
    report = apply_loras(model, specs, mode="unmerged", strict=strict)
    try:
        yield report
    finally:
        report.remove()
