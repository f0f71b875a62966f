"""wan_core.attention: SDPA is exact, optional kernels degrade to SDPA with one warning."""
from __future__ import annotations

import sys
import warnings

import factory
import nodepack
import pytest
import tiny
import torch

import wan_core.attention as attn_mod
from wan_core.attention import BACKENDS, attention, available_backends
from wan_core.dit import WanDiT
from wan_core.loaders import load_dit


def _qkv(lq: int = 24, lk: int = 24, b: int = 2, h: int = 3, d: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, lq, h, d, generator=g), torch.randn(b, lk, h, d, generator=g),
            torch.randn(b, lk, h, d, generator=g))


def _naive(q, k, v):
    """softmax(Q K^T / sqrt(D)) V in float64, layout [B, L, H, D]."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.fixture(autouse=True)
def fresh_warning_registry(monkeypatch):
    # Each test starts as a fresh process would: no fallback warned yet.
    monkeypatch.setattr(attn_mod, "_WARNED", set())


def _calls_with_warnings(backend: str, q, k, v, n: int = 3):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [attention(q, k, v, backend) for _ in range(n)]
    return outs, [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("lk", [24, 9], ids=["self", "cross"])
def test_sdpa_matches_naive_softmax_attention(lk):
    q, k, v = _qkv(lk=lk)
    out = attention(q, k, v, "sdpa")
    assert out.shape == q.shape and out.dtype == q.dtype
    # measured max abs error 7.2e-7 (fp32 SDPA vs the float64 reference), values ~N(0,1)
    torch.testing.assert_close(out.double(), _naive(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sage", "flash"])
def test_cuda_backend_on_cpu_falls_back_to_sdpa_with_one_warning(backend):
    q, k, v = _qkv()
    outs, warned = _calls_with_warnings(backend, q, k, v)
    assert len(warned) == 1
    assert backend in str(warned[0].message) and "SDPA" in str(warned[0].message)
    ref = attention(q, k, v, "sdpa")
    assert all(torch.equal(o, ref) for o in outs)


def test_auto_on_cpu_is_sdpa_without_warning():
    q, k, v = _qkv()
    outs, warned = _calls_with_warnings("auto", q, k, v)
    assert warned == []
    assert torch.equal(outs[0], attention(q, k, v, "sdpa"))
    assert available_backends("cpu") == ["sdpa"]


def test_missing_package_is_not_offered_and_falls_back_once(monkeypatch):
    monkeypatch.setattr(attn_mod, "_installed", lambda package: False)
    assert available_backends("cuda") == ["sdpa"]
    monkeypatch.setattr(attn_mod, "_installed", lambda package: True)
    assert available_backends("cuda") == ["sage", "flash", "sdpa"]

    # Pretend the tensors' device could run kernels but the package is absent.
    monkeypatch.setattr(attn_mod, "_installed", lambda package: False)
    real_reason = attn_mod._unusable_reason
    monkeypatch.setattr(attn_mod, "_unusable_reason",
                        lambda b, device: real_reason(b, torch.device("cuda")))
    q, k, v = _qkv()
    outs, warned = _calls_with_warnings("flash", q, k, v)
    assert len(warned) == 1 and "not installed" in str(warned[0].message)
    assert all(torch.equal(o, attention(q, k, v, "sdpa")) for o in outs)


@pytest.mark.parametrize("backend", ["sage", "flash", "auto"])
def test_failing_kernel_falls_back_to_sdpa_with_one_warning(monkeypatch, backend):
    calls = []

    def broken(q, k, v):
        calls.append(q.shape)
        raise RuntimeError(f"kernel does not support shape {tuple(q.shape)}")

    monkeypatch.setattr(attn_mod, "_unusable_reason", lambda b, device: None)  # "installed, on CUDA"
    monkeypatch.setattr(attn_mod, "_sage", broken)
    monkeypatch.setattr(attn_mod, "_flash", broken)
    q, k, v = _qkv()
    outs, warned = _calls_with_warnings(backend, q, k, v)
    assert len(calls) == 3  # still tried each call (another shape may work), warned once
    assert len(warned) == 1 and "RuntimeError" in str(warned[0].message)
    assert all(torch.equal(o, attention(q, k, v, "sdpa")) for o in outs)


def test_unknown_backend_raises_value_error_listing_valid_names():
    q, k, v = _qkv()
    with pytest.raises(ValueError) as err:
        attention(q, k, v, "xformers")
    for name in BACKENDS:
        assert name in str(err.value)


def test_attention_backend_is_a_loader_and_constructor_option(tmp_path):
    """``load_dit(attention=...)`` builds the DiT with that backend (no attribute patched on
    afterwards); an unknown name is refused by both, listing the valid ones."""
    path = factory.write_checkpoint(tmp_path, "dit", "official", variant="t2v")
    assert load_dit(path).attention_backend == "sdpa"
    assert load_dit(path, attention="auto").attention_backend == "auto"
    for bad in (lambda: load_dit(path, attention="xformers"),
                lambda: WanDiT(tiny.TINY_DIT_T2V, attention_backend="xformers")):
        with pytest.raises(ValueError) as err:
            bad()
        assert all(name in str(err.value) for name in BACKENDS)


def test_loader_node_offers_exactly_the_backends_default_first(monkeypatch):
    """One choice list: the DiT loader node's combo is ``BACKENDS`` in order (saved workflows
    keep the order), its default the loaders' default."""
    monkeypatch.setitem(sys.modules, "folder_paths", nodepack.fake_folder_paths({}))
    combo = nodepack.load_pack().nodes.WanCoreLoadDiT.INPUT_TYPES()["required"]["attention"]
    assert combo[0] == list(BACKENDS) and combo[1]["default"] == BACKENDS[0] == "sdpa"
