"""LoRA files applied to a Wan network, merged into the weights or added at call time.

Which files and key layouts are read, and the checks every file passes first:
:mod:`wan_core.lora_files`.

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

All or nothing. :func:`apply_loras` first checks every file completely
(:func:`wan_core.lora_files.check_loras`, the same for both modes, so "merge" and
"unmerged" refuse exactly the same files); only then does it change the model. A failure
after that (out of memory, a file changed since it was checked, an error, an interrupt)
puts back every parameter it had replaced and removes every hook it had added before the
exception leaves :func:`apply_loras`: the model is bit-identical (values, dtypes, devices,
parameter objects) and hook-free. Refusals and errors are a :class:`LoraError` naming the
file and the key; an interrupt (``KeyboardInterrupt``) is re-raised as it is.

Memory of the transaction. A merge cannot undo a rounding (fp8 requantisation, bf16), so
it keeps the original storage of every parameter it rewrites until the last one is done:
the tensors themselves when they live on the CPU (no copy), a CPU copy when they live on
an accelerator (ComfyUI's weight backups do the same). Extra host memory: the storage
bytes of the touched parameters, whatever the rank. For Wan 2.1 14B in fp8 with a LoRA on
all 400 block Linears that is 14.05 GB (13.1 GiB: the fp8 weights themselves; the 400
scales add 1.6 kB), freed when the merge commits; in bf16, 28.1 GB. Besides, one parameter
at a time is worked on in float32 on its own device: for the largest 14B Linear (ffn,
5120 x 13824) the merged weight and ``B @ A``, then the weight, the requantisation copy and
the fp8 result: 0.64 GB at most (about 1.4 GB with stochastic rounding, whose noise and
bit temporaries are float32-sized too). Checking reads one pair at a time (rank 64: under
10 MB). "unmerged" rewrites only the few non-Linear parameters (norms, modulation, patch
embedding) its files have deltas for; its hooks hold the LoRA tensors on the device (a
rank-64 LoRA on the 400 Linears of 14B: 307 M values, 613 MB in bf16).

A caller about to drop the model on failure (a loader merging LoRAs into a model it has just
read) does not need those originals: ``apply_loras(..., rollback=False)`` merges keeping
none (each replaced tensor is freed as soon as its parameter is rewritten), so the merge
needs no extra host memory beyond the one parameter worked on. Every file is still checked
completely before the first change; a failure after that leaves the model partly merged,
and the :class:`LoraError` says to discard it. "unmerged" keeps its few originals either
way (:meth:`LoraReport.remove` needs them).
"""
from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .files import TensorFile
from .fp8 import dequantize, is_fp8, quantize
from .layers import CastLinear
from .lora_files import LoraError, LoraFileReport, LoraSpec, Patch, Plan, check_loras, read_checked, refuse
from .quant import quantized_param_shapes

__all__ = ["LoraError", "LoraFileReport", "LoraReport", "LoraSpec", "applied_loras", "apply_loras"]

log = logging.getLogger("wan_core")


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


# --------------------------------------------------------------------------- applying


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), leaf


def _fp8_scale(owner: nn.Module, leaf: str, p: Tensor) -> nn.Parameter | None:
    """The ``scale_weight`` of an fp8 weight (CastLinear contract), else None."""
    return getattr(owner, "scale_weight", None) if leaf == "weight" and is_fp8(p.dtype) else None


class _UndoLog:
    """Originals of the parameters a LoRA application replaced, until it commits.

    A parameter on the CPU keeps its original tensor (no copy); one elsewhere keeps a CPU
    copy, written back in place on rollback (no device allocation while recovering from an
    out-of-memory error). The entry is recorded before the parameter changes, so an
    interrupt between the two still rolls back correctly.
    """

    def __init__(self, keep: bool = True) -> None:
        self._entries: list[tuple[Tensor, Tensor, bool]] = []   # (parameter, original, copied)
        self.keep = keep            # False: record nothing (rollback=False), only count
        self.writes = 0

    def write(self, p: Tensor, new: Tensor) -> None:
        """``p.data = new`` (same shape, dtype and device as before)."""
        old = p.data
        if self.keep:
            copied = old.device.type != "cpu"
            self._entries.append((p, old.to("cpu", copy=True) if copied else old, copied))
        self.writes += 1
        del old
        p.data = new

    def rollback(self) -> None:
        while self._entries:
            p, old, copied = self._entries.pop()
            if copied:
                p.data.copy_(old)
            else:
                p.data = old

    def commit(self) -> None:
        self._entries.clear()


def _delta(tf: TensorFile, patch: Patch, shape: torch.Size, device: torch.device) -> Tensor:
    """float32 delta ``[shape]`` of one patch, scale included, on ``device``."""
    if patch.kind == "lowrank":
        a = read_checked(tf, patch.keys[0]).to(device=device, dtype=torch.float32).flatten(1)
        b = read_checked(tf, patch.keys[1]).to(device=device, dtype=torch.float32).flatten(1)
        return (b @ a).mul_(patch.scale).reshape(shape)
    return (patch.scale * read_checked(tf, patch.keys[0]).to(device=device, dtype=torch.float32)).reshape(shape)


def _merged(owner: nn.Module, leaf: str, name: str, patches: list[Patch], files: list[TensorFile],
            rounding: str) -> tuple[Tensor, Tensor | None]:
    """New storage of parameter ``name`` with ``patches`` added in float32: (tensor, new
    ``scale_weight`` or None), in the parameter's dtype and on its device."""
    p = getattr(owner, leaf).detach()
    scale = _fp8_scale(owner, leaf, p)
    # dequantize makes a new float32 tensor; a float32 weight needs an explicit copy
    w = dequantize(p, scale, torch.float32) if is_fp8(p.dtype) else p.to(torch.float32, copy=True)
    for patch in patches:
        d = _delta(files[patch.file], patch, w.shape, w.device)
        w += d
        del d
    # the checks bound every delta, so only a weight already near its dtype's limit gets here
    if not torch.isfinite(w).all() or (not is_fp8(p.dtype) and w.abs().max() > torch.finfo(p.dtype).max):
        raise refuse(files[patches[0].file], patches[0].keys[-1],
                     f"makes {name} non-finite in {p.dtype} (overflow); lower the strength.")
    if not is_fp8(p.dtype):
        return w if p.dtype == torch.float32 else w.to(p.dtype), None
    seed = zlib.crc32(name.encode()) if rounding == "stochastic" else None
    q, s = quantize(w, p.dtype, scaled=scale is not None, stochastic_seed=seed)
    return q, None if scale is None else s.reshape(scale.shape).to(scale.dtype)


def _merge_into(model: nn.Module, files: list[TensorFile], by_target: dict[str, list[Patch]],
                undo: _UndoLog, rounding: str, current: list[Patch]) -> None:
    """Add the deltas to the parameters, every replaced original recorded in ``undo``;
    ``current`` holds the patch being applied (for the error message)."""
    for name, patches in by_target.items():
        current[:] = patches
        owner, leaf = _owner(model, name)
        p = getattr(owner, leaf)
        new, new_scale = _merged(owner, leaf, name, patches, files, rounding)
        undo.write(p, new)
        if new_scale is not None:
            undo.write(owner.scale_weight, new_scale)


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


def _unhook(module: nn.Module, hook: _LoraHook) -> None:
    """Remove ``hook`` from ``module`` by identity, also one whose handle never came back
    (an interrupt just after it was registered). The three dicts are those
    ``RemovableHandle.remove`` clears for a forward hook."""
    for hid, fn in list(module._forward_hooks.items()):
        if fn is hook:
            for hook_dict in (module._forward_hooks, module._forward_hooks_with_kwargs,
                              module._forward_hooks_always_called):
                hook_dict.pop(hid, None)


def _build_hooks(model: nn.Module, files: list[TensorFile], by_target: dict[str, list[Patch]],
                 current: list[Patch]) -> tuple[dict[str, _LoraHook], dict[str, list[Patch]]]:
    """Hooks for every CastLinear target (module name -> hook, nothing registered yet) and
    the patches left over for :func:`_merge_into`."""
    hooks: dict[str, _LoraHook] = {}
    rest: dict[str, list[Patch]] = {}
    for name, patches in by_target.items():
        owner, leaf = _owner(model, name)
        if not isinstance(owner, CastLinear) or leaf not in ("weight", "bias"):
            rest[name] = patches
            continue
        current[:] = patches
        hook = hooks.setdefault(name.rpartition(".")[0], _LoraHook())
        device = owner.weight.device
        for patch in patches:
            tf = files[patch.file]
            if patch.kind == "lowrank":
                a, b = (read_checked(tf, k).to(device).flatten(1) for k in patch.keys)
                hook.lowrank.append((a, b, patch.scale))
            elif leaf == "weight":
                d = read_checked(tf, patch.keys[0]).to(device).reshape(owner.out_features, owner.in_features)
                hook.weight_diffs.append((d, patch.scale))
            else:
                hook.bias_diffs.append((read_checked(tf, patch.keys[0]).to(device).reshape(-1), patch.scale))
    return hooks, rest


# --------------------------------------------------------------------------- entry points


def apply_loras(model: nn.Module, specs: Sequence[LoraSpec], mode: str = "merge",
                strict: bool = False, fp8_rounding: str = "nearest", *, rollback: bool = True) -> LoraReport:
    """Apply LoRA files (in order; their deltas add up) to ``model`` (official parameter names).

    All or nothing (module docstring): every file is checked completely first, the same way
    in both modes; on any failure the model is left bit-identical and without hooks.

    Args:
        model: a Wan network, usually :class:`wan_core.dit.WanDiT`, on any device; deltas are
            computed on the device of each weight.
        specs: files and strengths; strength 0 reads only the header and alphas (keys are
            still checked and reported) and changes nothing.
        mode: ``"merge"`` (into the weights, permanent) or ``"unmerged"`` (hooks; ``remove()``).
        strict: raise :class:`LoraError` if any key matches nothing, instead of reporting it.
        fp8_rounding: how merged fp8 weights are re-quantised: "nearest" (default, lower rms
            error) or "stochastic" (unbiased, seeded per parameter name so results repeat);
            figures in the module docstring.
        rollback: keep the original of every rewritten parameter until the merge is done, so a
            failure leaves the model as it was (default). False ("merge" only; "unmerged" keeps
            them anyway): keep none, saving the storage of every merged weight (14 GB for 14B
            fp8), for a caller that discards the model on failure; the files are still checked
            completely before the first change, and a later failure says the model is partly
            merged.

    Returns:
        :class:`LoraReport`; unmatched keys are also logged as one warning per file.

    Raises:
        LoraError: a file refused, or applying failed (the cause chained); the message names
            the file and the key. ``KeyboardInterrupt`` passes through, after the rollback.
    """
    if mode not in ("merge", "unmerged"):
        raise ValueError(f"LoRA mode must be 'merge' or 'unmerged', got {mode!r}")
    if fp8_rounding not in ("stochastic", "nearest"):
        raise ValueError(f"fp8_rounding must be 'stochastic' or 'nearest', got {fp8_rounding!r}")
    plan = Plan()
    undo = _UndoLog(keep=rollback or mode == "unmerged")
    hooks: dict[str, _LoraHook] = {}
    handles: list = []
    current: list[Patch] = []
    try:
        check_loras(model, specs, strict, plan)
        with torch.no_grad():
            if mode == "merge":
                quantized = sorted(set(plan.by_target) & set(quantized_param_shapes(model)))
                if quantized:
                    raise LoraError(f"cannot merge LoRAs into GGUF-quantized weights (e.g. {quantized[0]}): that "
                                    "would re-quantize them. Apply the LoRAs unmerged (mode='unmerged'; in ComfyUI "
                                    "the sampler's 'loras' input), which is exact for GGUF models.")
                _merge_into(model, plan.files, plan.by_target, undo, fp8_rounding, current)
            else:
                hooks, rest = _build_hooks(model, plan.files, plan.by_target, current)
                current.clear()
                for owner_name, hook in hooks.items():
                    handles.append(model.get_submodule(owner_name).register_forward_hook(hook))
                _merge_into(model, plan.files, rest, undo, fp8_rounding, current)
    except BaseException as exc:
        for owner_name, hook in hooks.items():
            _unhook(model.get_submodule(owner_name), hook)
        undo.rollback()
        partly = not undo.keep and undo.writes > 0     # rollback=False after the first change
        if not isinstance(exc, Exception) or (isinstance(exc, LoraError) and not partly):
            raise
        where = (f"{plan.files[current[0].file].path.name}: applying LoRA key '{current[0].keys[-1]}' to "
                 f"{current[0].target}" if current else "applying LoRAs")
        state = ("the model is partly merged (rollback=False): discard it and load it again" if partly
                 else "every change was undone, the model is as before")
        cause = str(exc) if isinstance(exc, LoraError) else f"{type(exc).__name__}: {exc}"
        raise LoraError(f"{where} failed ({cause}); {state}.") from exc
    finally:
        for tf in plan.files:
            tf.close()
    if mode == "merge":
        undo.commit()
        report = LoraReport(mode, tuple(plan.reports))
    else:
        report = LoraReport(mode, tuple(plan.reports), [h.remove for h in handles] + [undo.rollback])
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
