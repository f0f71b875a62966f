"""A failed LoRA leaves the model exactly as it was: fault injection over files and application.

Each fault is either a malformed file (refused while checking, before the model changes) or
an error / interrupt injected while the model is being changed (the k-th parameter write, an
out-of-memory delta, a hook registration, a file that changes after it was checked). For
every fault, in both modes and with float32, bf16 and scaled-fp8 storage, the model after
the failure must have the same parameter objects with bit-identical values, dtypes and
devices (state dict included), no hook on any module, no attribute added or removed, and
give bit for bit the output it gave before (for refused files the forward runs on the fp8
models only: the rest implies it, and the forward is most of this file's time). The two
modes must refuse the same files with the same message (one validator).

The LoRA used has low-rank pairs on five Linears (attention, FFN, time projection, head),
full deltas of a norm, a modulation, a bias and the patch embedding, so "unmerged" both
hooks Linears and rewrites non-Linear parameters, and every path of the merge runs.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tiny
import wan_core.lora as lora_mod
from wan_core.dit import WanDiT
from wan_core.files import TensorFile
from wan_core.fp8 import quantize
from wan_core.layers import CastLinear
from wan_core.lora import LoraError, LoraSpec, applied_loras, apply_loras

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 4, 2.0
MODES = ("merge", "unmerged")
STORAGES = ("fp32", "bf16", "fp8")
# module path -> (out, in) of the tiny T2V DiT (dim 256, ffn 384, out 64)
PAIRS = {"blocks.0.self_attn.q": (256, 256), "blocks.1.ffn.0": (384, 256), "blocks.0.cross_attn.o": (256, 256),
         "time_projection.1": (1536, 256), "head.head": (64, 256)}
SECOND = "blocks.1.ffn.0"   # the pair the "second pair" faults break (keys are applied in file order)
P = "diffusion_model."


# ---------------------------------------------------------------------------- models


def build(storage: str) -> WanDiT:
    torch.manual_seed(0)
    model = WanDiT(tiny.TINY_DIT_T2V, compute_dtype=torch.float32).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if not isinstance(m, CastLinear):
                continue
            if storage == "bf16":
                m.weight.data = m.weight.data.to(torch.bfloat16)
                m.bias.data = m.bias.data.to(torch.bfloat16)
            elif storage == "fp8":  # ComfyUI scaled fp8: weight e4m3fn + float32 scale_weight
                q, s = quantize(m.weight.data, torch.float8_e4m3fn, scaled=True)
                m.weight.data = q
                m.register_parameter("scale_weight", nn.Parameter(s, requires_grad=False))
    return model


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(1, 16, 2, 2, 2, generator=g), "t": torch.tensor([700.0]),
            "context": torch.randn(1, 3, tiny.TINY_DIT_T2V.text_dim, generator=g)}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor: equal bytes = bit-identical (fp8, -0.0 and NaN included)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


class Snapshot:
    """Everything a failed application must leave as it was."""

    def __init__(self, model: nn.Module, out: torch.Tensor | None = None) -> None:
        self.params = {n: (p, p.dtype, p.device, p.detach().clone()) for n, p in model.named_parameters()}
        self.state = {k: v.detach() for k, v in model.state_dict().items()}
        self.attrs = {n: (set(vars(m)), set(m._parameters)) for n, m in model.named_modules()}
        self.out = out

    def check(self, model: nn.Module, output: bool = True) -> None:
        now = dict(model.named_parameters())
        assert now.keys() == self.params.keys()
        for name, (obj, dtype, device, value) in self.params.items():
            p = now[name]
            assert p is obj, f"{name}: the parameter object was replaced"
            assert p.dtype == dtype and p.device == device, name
            assert p.shape == value.shape and torch.equal(bits(p), bits(value)), f"{name} changed"
        state = model.state_dict()   # no buffers: every entry is a parameter checked above
        assert state.keys() == self.state.keys()
        for k, v in self.state.items():
            assert state[k].dtype == v.dtype and state[k].data_ptr() == now[k].data_ptr(), k
        for name, m in model.named_modules():
            hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks,
                     m._forward_hooks_with_kwargs, m._forward_hooks_always_called, m._forward_pre_hooks_with_kwargs)
            assert not any(hooks), f"{name or 'model'} kept a hook"
            assert (set(vars(m)), set(m._parameters)) == self.attrs[name], f"{name or 'model'}: attributes changed"
        if output and self.out is not None:
            with torch.no_grad():
                assert torch.equal(model(**inputs()), self.out), "the output changed"


@pytest.fixture(scope="module")
def bases() -> dict[str, tuple[WanDiT, Snapshot]]:
    """One model per storage with its snapshot. Tests that must not change it (refused
    files) use it as it is; the others work on :func:`fresh` copies."""
    out = {}
    for storage in STORAGES:
        model = build(storage)
        with torch.no_grad():
            out[storage] = (model, Snapshot(model, model(**inputs())))
    return out


def fresh(bases, storage: str) -> tuple[WanDiT, Snapshot]:
    base, snap = bases[storage]
    model = copy.deepcopy(base)
    return model, Snapshot(model, snap.out)


# ---------------------------------------------------------------------------- files


def good_sd(seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for path, (out, fan_in) in PAIRS.items():
        sd[f"{P}{path}.lora_down.weight"] = 0.1 * torch.randn(RANK, fan_in, generator=g)
        sd[f"{P}{path}.lora_up.weight"] = 0.1 * torch.randn(out, RANK, generator=g)
        sd[f"{P}{path}.alpha"] = torch.tensor(ALPHA)
    sd[f"{P}blocks.0.norm3.diff"] = 0.1 * torch.randn(256, generator=g)
    sd[f"{P}blocks.1.diff_m"] = 0.1 * torch.randn(1, 6, 256, generator=g)
    sd[f"{P}blocks.0.cross_attn.o.diff_b"] = 0.1 * torch.randn(256, generator=g)
    sd[f"{P}patch_embedding.diff"] = 0.01 * torch.randn(256, 16, 1, 2, 2, generator=g)
    return sd


def edit(**changes: torch.Tensor | None) -> Callable[[dict], dict]:
    """A fault as edits of the good file: key suffix (after the prefix) -> tensor, None drops it."""
    def apply(sd: dict) -> dict:
        sd = dict(sd)
        for key, value in changes.items():
            key = P + key.replace("__", ".")
            if value is None:
                sd.pop(key)
            else:
                sd[key] = value
        return sd
    return apply


def down(r: int = RANK, fan_in: int = 256) -> torch.Tensor:
    return 0.1 * torch.randn(r, fan_in)


def nan_at(t: torch.Tensor, value: float = math.nan) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def other_size(sd: dict) -> dict:  # a LoRA of a twice wider model of the same layout
    return {k: (torch.zeros(*(2 * d if d > 16 else d for d in v.shape)) if v.ndim else v) for k, v in sd.items()}


def diffusers(sd: dict) -> dict:  # the first pair under its diffusers / PEFT name
    q = f"{P}blocks.0.self_attn.q"
    return {"transformer.blocks.0.attn1.to_q.lora_A.weight": sd[f"{q}.lora_down.weight"],
            "transformer.blocks.0.attn1.to_q.lora_B.weight": sd[f"{q}.lora_up.weight"]}


G = good_sd()
FILE_FAULTS: dict[str, tuple[Callable[[dict], dict], str, dict | None]] = {
    # name: (file from the good one, text the error must contain, safetensors metadata)
    "second_pair_down_is_1d": (edit(**{f"{SECOND}__lora_down__weight": torch.randn(256)}), "lora_up.weight", None),
    "rank_differs_between_up_and_down": (edit(**{f"{SECOND}__lora_up__weight": torch.randn(384, RANK + 1)}),
                                         f"{SECOND}.lora_up.weight", None),
    "rank_above_both_dims": (edit(**{f"{SECOND}__lora_down__weight": down(400),
                                     f"{SECOND}__lora_up__weight": torch.randn(384, 400)}), "rank 400", None),
    "wrong_shape": (edit(**{f"{SECOND}__lora_down__weight": down(fan_in=264)}), "another model size", None),
    "nan_alpha": (edit(**{f"{SECOND}__alpha": torch.tensor(math.nan)}), f"{SECOND}.alpha", None),
    "inf_alpha": (edit(**{f"{SECOND}__alpha": torch.tensor(math.inf)}), f"{SECOND}.alpha", None),
    "zero_alpha": (edit(**{f"{SECOND}__alpha": torch.tensor(0.0)}), f"{SECOND}.alpha", None),
    "negative_alpha": (edit(**{f"{SECOND}__alpha": torch.tensor(-2.0)}), f"{SECOND}.alpha", None),
    "alpha_not_a_scalar": (edit(**{f"{SECOND}__alpha": torch.tensor([2.0, 2.0])}), f"{SECOND}.alpha", None),
    "alpha_is_bool": (edit(**{f"{SECOND}__alpha": torch.tensor(True)}), f"{SECOND}.alpha", None),
    "inf_in_up": (edit(**{f"{SECOND}__lora_up__weight": nan_at(G[f"{P}{SECOND}.lora_up.weight"], math.inf)}),
                  f"{SECOND}.lora_up.weight", None),
    "nan_in_down": (edit(**{f"{SECOND}__lora_down__weight": nan_at(G[f"{P}{SECOND}.lora_down.weight"])}),
                    f"{SECOND}.lora_down.weight", None),
    "nan_in_norm_diff": (edit(blocks__0__norm3__diff=nan_at(G[f"{P}blocks.0.norm3.diff"])), "norm3.diff", None),
    "inf_in_diff_m": (edit(blocks__1__diff_m=nan_at(G[f"{P}blocks.1.diff_m"], -math.inf)), "diff_m", None),
    "values_overflow_float32": (edit(**{f"{SECOND}__lora_up__weight": torch.full((384, RANK), 3e38),
                                        f"{SECOND}__lora_down__weight": torch.full((RANK, 256), 3e38)}),
                                "up to inf", None),
    "absurdly_large_delta": (edit(blocks__0__norm3__diff=torch.full((256,), 1e6)), "up to 1e+06", None),
    "integer_up": (edit(**{f"{SECOND}__lora_up__weight": torch.ones(384, RANK, dtype=torch.int32)}),
                   f"{SECOND}.lora_up.weight", None),
    "integer_diff": (edit(blocks__0__norm3__diff=torch.ones(256, dtype=torch.int64)), "norm3.diff", None),
    "missing_up_of_a_pair": (edit(**{f"{SECOND}__lora_up__weight": None}), f"{SECOND}.lora_down.weight", None),
    "missing_down_of_a_pair": (edit(**{f"{SECOND}__lora_down__weight": None}), f"{SECOND}.lora_up.weight", None),
    "diff_of_another_shape": (edit(blocks__0__norm3__diff=torch.zeros(255)), "norm3.diff", None),
    "one_layer_under_two_prefixes": (lambda sd: {**sd, "blocks.0.self_attn.q.lora_down.weight": down(),
                                                 "blocks.0.self_attn.q.lora_up.weight": 0.1 * torch.randn(256, RANK)},
                                     "blocks.0.self_attn.q.weight", None),
    "pair_and_diff_on_one_weight": (edit(blocks__0__self_attn__q__diff=torch.zeros(256, 256)),
                                    "blocks.0.self_attn.q", None),
    "lora_A_next_to_lora_down": (edit(blocks__0__self_attn__q__lora_A__weight=down()), "lora_A.weight", None),
    "dora": (edit(blocks__0__self_attn__q__dora_scale=torch.ones(256, 1)), "DoRA", None),
    "another_architecture": (lambda sd: {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 8),
                                         "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(8, 4)},
                             "matches nothing", None),
    "another_model_size": (other_size, "another model size", None),
    "no_tensors_at_all": (lambda sd: {"__": torch.zeros(1)}, "matches nothing", None),
    "peft_metadata_not_json": (diffusers, "lora_adapter_metadata", {"lora_adapter_metadata": "{"}),
    "peft_alpha_nan": (diffusers, "lora_alpha", {"lora_adapter_metadata": json.dumps({"lora_alpha": math.nan})}),
    "peft_alpha_pattern_backtracks": (diffusers, "alpha_pattern",
                                      {"lora_adapter_metadata": json.dumps({"alpha_pattern": {"(a+)+$": 4}})}),
}


def write(folder: Path, name: str, sd: dict, metadata: dict | None = None) -> Path:
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    out = {"good": write(folder, "good", G)}
    for name, (make, _, meta) in FILE_FAULTS.items():
        out[name] = write(folder, name, make(G), meta)
    (folder / "text.safetensors").write_text("this is not a safetensors file at all\n" * 4)
    out["not_a_safetensors_file"] = folder / "text.safetensors"
    return out


def refused_specs(files, fault: str) -> list:
    """The LoRA list of a fault: the faulty file second, after a good one (so a half-done
    first file would show)."""
    return [LoraSpec(files["good"], 0.7), LoraSpec(files[fault], 1.0)]


# ---------------------------------------------------------------------------- refused files


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", [*FILE_FAULTS, "not_a_safetensors_file"])
def test_a_refused_file_leaves_the_model_bit_identical_and_hook_free(bases, files, fault, mode, storage):
    model, snap = bases[storage]  # shared: a refusal that changed it would fail here and in every later test
    with pytest.raises(LoraError) as err:
        apply_loras(model, refused_specs(files, fault), mode=mode)
    message = str(err.value)
    assert files[fault].name in message, message
    if fault in FILE_FAULTS:
        assert FILE_FAULTS[fault][1] in message, message
    # same parameters, hooks and attributes imply the same output; the forward (the costly
    # part of this test) runs for the fp8 models, where a rewrite would be the most visible
    snap.check(model, output=storage == "fp8")


def test_a_nan_strength_that_bypassed_loraspec_is_refused(bases, files):
    model, snap = fresh(bases, "fp32")
    spec = LoraSpec(files["good"], 1.0)
    object.__setattr__(spec, "strength", math.nan)
    with pytest.raises(LoraError, match="good.safetensors.*strength"):
        apply_loras(model, [spec])
    snap.check(model)


CATALOGUE = ["good", *FILE_FAULTS, "not_a_safetensors_file"]


@pytest.mark.parametrize("name", CATALOGUE)
def test_merged_and_unmerged_refuse_exactly_the_same_files(bases, files, name):
    outcomes = []
    for mode in MODES:
        model, _ = fresh(bases, "fp32")
        try:
            report = apply_loras(model, [LoraSpec(files[name], 0.5)], mode=mode)
            outcomes.append(("applied", report.matched, report.unmatched))
        except LoraError as exc:
            outcomes.append(("refused", str(exc)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == ("applied" if name == "good" else "refused")


def test_strength_zero_checks_the_structure_but_not_the_values_in_both_modes(bases, files):
    for mode in MODES:
        model, snap = fresh(bases, "fp32")
        assert apply_loras(model, [LoraSpec(files["nan_in_down"], 0.0)], mode=mode).matched == ()
        snap.check(model)
        with pytest.raises(LoraError, match="another model size"):
            apply_loras(model, [LoraSpec(files["wrong_shape"], 0.0)], mode=mode)
        snap.check(model)


# ---------------------------------------------------------------------------- failures while applying


def fail_on_call(owner, name: str, k: int, exc: BaseException, after: bool = True):
    """Wrap ``owner.name`` so that its k-th call raises ``exc`` (after doing its work when
    ``after``: the change is made, then the failure comes)."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k and not after:
            raise exc
        result = original(*args, **kwargs)
        if calls["n"] == k:
            raise exc
        return result
    return wrapped, calls


def count_calls(monkeypatch, owner, name: str, model: nn.Module, path: Path, mode: str) -> int:
    """How many times a good application of ``path`` calls ``owner.name`` (on a copy of ``model``)."""
    wrapped, calls = fail_on_call(owner, name, 10 ** 9, RuntimeError())
    with monkeypatch.context() as m:
        m.setattr(owner, name, wrapped)
        apply_loras(copy.deepcopy(model), [LoraSpec(path, 0.7)], mode=mode)
    return calls["n"]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("exc", [RuntimeError("injected"), torch.OutOfMemoryError("CUDA out of memory (injected)"),
                                 KeyboardInterrupt()], ids=["error", "oom", "interrupt"])
def test_a_failure_at_any_parameter_write_is_rolled_back(bases, files, monkeypatch, mode, storage, exc):
    writes = count_calls(monkeypatch, lora_mod._UndoLog, "write", bases[storage][0], files["good"], mode)
    # merge: 9 parameters (+ 5 scales in fp8); unmerged: the 3 non-Linear ones
    assert writes == {"merge": 14 if storage == "fp8" else 9, "unmerged": 3}[mode]
    for k in sorted({1, 2, writes // 2, writes}):
        model, snap = fresh(bases, storage)
        wrapped, _ = fail_on_call(lora_mod._UndoLog, "write", k, exc)
        with monkeypatch.context() as m:
            m.setattr(lora_mod._UndoLog, "write", wrapped)
            with pytest.raises(KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else LoraError) as err:
                apply_loras(model, [LoraSpec(files["good"], 0.7)], mode=mode)
        if not isinstance(exc, KeyboardInterrupt):
            assert "good.safetensors" in str(err.value) and "undone" in str(err.value)
            assert err.value.__cause__ is exc
        snap.check(model)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("mode", MODES)
def test_out_of_memory_while_computing_a_delta_is_rolled_back(bases, files, monkeypatch, mode, storage):
    deltas = count_calls(monkeypatch, lora_mod, "_delta", bases[storage][0], files["good"], mode)
    for k in sorted({1, deltas}):
        model, snap = fresh(bases, storage)
        wrapped, _ = fail_on_call(lora_mod, "_delta", k, torch.OutOfMemoryError("out of memory"), after=False)
        monkeypatch.setattr(lora_mod, "_delta", wrapped)
        with pytest.raises(LoraError, match="OutOfMemoryError"):
            apply_loras(model, [LoraSpec(files["good"], 0.7)], mode=mode)
        monkeypatch.undo()
        snap.check(model)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_failed_hook_registration_removes_the_hooks_already_added(bases, files, monkeypatch, storage, k):
    model, snap = fresh(bases, storage)
    wrapped, _ = fail_on_call(nn.Module, "register_forward_hook", k, KeyboardInterrupt())
    monkeypatch.setattr(nn.Module, "register_forward_hook", wrapped)
    with pytest.raises(KeyboardInterrupt):
        apply_loras(model, [LoraSpec(files["good"], 0.7)], mode="unmerged")
    monkeypatch.undo()
    snap.check(model)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("mode", MODES)
def test_a_file_that_changes_after_it_was_checked_is_caught_and_rolled_back(bases, files, monkeypatch, mode,
                                                                             storage):
    """The values are checked again as they are applied: a NaN that appears between the
    check and the application (file rewritten meanwhile) is refused and undone."""
    model, snap = fresh(bases, storage)
    original, seen = TensorFile.read, set()
    victim = f"{P}head.head.lora_up.weight"   # applied late: other parameters changed before

    def read(self, key):
        t = original(self, key)
        if key == victim and key in seen:
            t = torch.full_like(t, math.nan)
        seen.add(key)
        return t
    monkeypatch.setattr(TensorFile, "read", read)
    with pytest.raises(LoraError, match="head.head.lora_up.weight.*NaN"):
        apply_loras(model, [LoraSpec(files["good"], 0.7)], mode=mode)
    snap.check(model)


# ---------------------------------------------------------------------------- after a failure


@pytest.mark.parametrize("mode", MODES)
def test_after_a_failure_a_good_lora_gives_what_it_gives_on_a_fresh_model(bases, files, mode):
    failed, _ = fresh(bases, "fp8")
    clean, _ = fresh(bases, "fp8")
    with pytest.raises(LoraError):
        apply_loras(failed, refused_specs(files, "nan_in_down"), mode=mode)
    apply_loras(failed, [LoraSpec(files["good"], 0.7)], mode=mode)
    apply_loras(clean, [LoraSpec(files["good"], 0.7)], mode=mode)
    with torch.no_grad():
        assert torch.equal(failed(**inputs()), clean(**inputs()))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(failed.parameters(), clean.parameters()))


def test_a_committed_merge_keeps_no_originals_and_unmerged_removal_is_exact(bases, files):
    model, _ = fresh(bases, "fp8")
    report = apply_loras(model, [LoraSpec(files["good"], 0.7)], mode="merge")
    assert report._undo == []   # the originals were released when the merge committed
    model, snap = fresh(bases, "fp8")
    with applied_loras(model, [LoraSpec(files["good"], 0.7)]) as report:
        assert len(report.matched) == 9
    snap.check(model)


@pytest.mark.parametrize("fault", ["nan_in_down", "wrong_shape", "values_overflow_float32", "not_a_safetensors_file"])
def test_without_rollback_bad_files_are_still_refused_before_any_change(bases, files, fault):
    """rollback=False (a loader about to drop the model on failure) skips the originals, not the checks."""
    model, snap = bases["fp8"]
    with pytest.raises(LoraError) as kept:
        apply_loras(model, refused_specs(files, fault), mode="merge")
    with pytest.raises(LoraError) as dropped:
        apply_loras(model, refused_specs(files, fault), mode="merge", rollback=False)
    assert str(dropped.value) == str(kept.value)
    snap.check(model, output=False)


@pytest.mark.parametrize("storage", STORAGES)
def test_without_rollback_a_merge_keeps_no_originals_and_gives_the_same_weights(bases, files, monkeypatch, storage):
    held, write = [], lora_mod._UndoLog.write

    def spy(self, p, new):
        write(self, p, new)
        held.append(len(self._entries))     # originals kept after each parameter write
    monkeypatch.setattr(lora_mod._UndoLog, "write", spy)
    model, _ = fresh(bases, storage)
    apply_loras(model, [LoraSpec(files["good"], 0.7)], mode="merge", rollback=False)
    assert len(held) == (14 if storage == "fp8" else 9) and set(held) == {0}
    held.clear()
    ref, _ = fresh(bases, storage)
    apply_loras(ref, [LoraSpec(files["good"], 0.7)], mode="merge")
    assert held == list(range(1, len(held) + 1))        # the default keeps every one until it commits
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(model.parameters(), ref.parameters()))


def test_without_rollback_a_late_failure_says_the_model_is_partly_merged(bases, files, monkeypatch):
    model, _ = fresh(bases, "fp8")
    wrapped, _ = fail_on_call(lora_mod._UndoLog, "write", 3, RuntimeError("injected"))
    monkeypatch.setattr(lora_mod._UndoLog, "write", wrapped)
    with pytest.raises(LoraError, match="partly merged.*discard it") as err:
        apply_loras(model, [LoraSpec(files["good"], 0.7)], mode="merge", rollback=False)
    assert "good.safetensors" in str(err.value) and isinstance(err.value.__cause__, RuntimeError)
    # "unmerged" keeps its originals whatever rollback says: remove() and a rollback need them
    model, snap = fresh(bases, "fp8")
    wrapped, _ = fail_on_call(lora_mod._UndoLog, "write", 2, RuntimeError("injected"))
    monkeypatch.setattr(lora_mod._UndoLog, "write", wrapped)
    with pytest.raises(LoraError, match="undone"):
        apply_loras(model, [LoraSpec(files["good"], 0.7)], mode="unmerged", rollback=False)
    snap.check(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_failed_merge_on_a_gpu_model_restores_it_from_the_host_copies(files, monkeypatch):
    model = build("fp8").cuda()
    x = {k: v.cuda() for k, v in inputs().items()}
    with torch.no_grad():
        ref = model(**x)
    snap = Snapshot(model)
    wrapped, _ = fail_on_call(lora_mod._UndoLog, "write", 12, RuntimeError("injected"))
    monkeypatch.setattr(lora_mod._UndoLog, "write", wrapped)
    with pytest.raises(LoraError):
        apply_loras(model, [LoraSpec(files["good"], 0.7)], mode="merge")
    snap.check(model)
    assert all(p.is_cuda for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(**x), ref)
