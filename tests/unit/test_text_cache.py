"""Prompt-embedding cache and text-encoder lifecycle: a cached prompt runs (and loads) no
encoder, the cache stays within its entry and byte bounds, encoders never share entries,
and generate() with a cache gives the same frames as without."""
from __future__ import annotations

import gc

import factory
import pytest
import torch

from wan_core import generate, load_dit, load_text_encoder, load_vae, loaders
from wan_core.text_cache import PromptCache, encode_and_release, file_identity


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("te")
    return {"te": factory.write_checkpoint(d, "t5", "hf_with_spiece"),
            "dit": factory.write_checkpoint(d, "dit", "official", variant="t2v"),
            "vae": factory.write_checkpoint(d, "vae", "official")}


@pytest.fixture(scope="module")
def te(paths):
    return load_text_encoder(paths["te"], dtype=torch.float32)


class Spy:
    def __init__(self, te) -> None:
        self.te, self.calls = te, []

    def __call__(self, prompts: list[str]) -> list[torch.Tensor]:
        self.calls.append(list(prompts))
        return self.te.encode(prompts)


def test_second_encode_of_the_same_prompt_does_not_run_the_model(te) -> None:
    cache, spy = PromptCache(), Spy(te)
    key = cache.identity(te)
    first = cache.encode(key, ["a cat", "a dog"], spy)
    again = cache.encode(key, ["a dog", "a cat"], spy)
    assert spy.calls == [["a cat", "a dog"]]
    assert torch.equal(first[0], again[1]) and torch.equal(first[1], again[0])
    assert torch.equal(first[0], te.encode(["a cat"])[0])
    cache.encode(key, ["a cat", "a bird"], spy)
    assert spy.calls[-1] == ["a bird"] and (cache.hits, cache.misses) == (3, 3)
    assert all(e.device.type == "cpu" for e in first)


def test_cached_embeddings_own_their_memory(te) -> None:
    cache = PromptCache()
    (e,) = cache.encode(cache.identity(te), ["a cat"], te.encode)
    # the encoder returns a view of its padded [512, dim] output; the cache keeps only the tokens
    assert e.untyped_storage().nbytes() == e.nbytes
    assert cache.nbytes == e.nbytes


def test_eviction_by_bytes_and_by_entries_drops_the_least_recently_used() -> None:
    emb = {p: torch.full((4, 8), float(i)) for i, p in enumerate("abcde")}   # 128 bytes each
    cache = PromptCache(max_entries=10, max_bytes=3 * 128)
    fn = lambda ps: [emb[p] for p in ps]
    cache.encode("k", ["a", "b", "c"], fn)
    cache.encode("k", ["a"], fn)            # a is now the most recent
    cache.encode("k", ["d"], fn)            # over 384 bytes: b goes
    assert len(cache) == 3 and cache.nbytes == 384
    assert cache.get("k", "b") is None and cache.get("k", "a") is not None
    big = PromptCache(max_bytes=100)
    assert torch.equal(big.encode("k", ["a"], fn)[0], emb["a"]) and len(big) == 0   # too big: served, not kept
    few = PromptCache(max_entries=2)
    few.encode("k", ["a", "b", "c"], fn)
    assert len(few) == 2 and few.get("k", "a") is None


def test_different_encoders_do_not_share_entries(paths, te) -> None:
    other = load_text_encoder(paths["te"], dtype=torch.float32)
    cache = PromptCache()
    a, b = Spy(te), Spy(other)
    cache.encode(cache.identity(te), ["a cat"], a)
    cache.encode(cache.identity(other), ["a cat"], b)
    assert a.calls == b.calls == [["a cat"]]
    assert cache.identity(te) != cache.identity(other)
    assert file_identity(paths["te"], torch.float32) != file_identity(paths["te"], torch.bfloat16)
    # a dropped encoder's entries go with it (a new model at a recycled id must not see them)
    del other, b
    gc.collect()
    assert len(cache) == 1


def test_encode_and_release_runs_on_device_copies_and_not_on_a_hit(te, monkeypatch) -> None:
    import wan_core.text_cache as text_cache

    placements = []
    real = text_cache.on_device
    monkeypatch.setattr(text_cache, "on_device", lambda m, d: (placements.append(str(d)), real(m, d))[1])
    masters = [p.data_ptr() for p in te.model.parameters()]
    cache = PromptCache()
    first = encode_and_release(te, ["a cat"], cache, device="cpu")
    assert placements == ["cpu"]
    # the resting weights never moved: the very same tensors before and after
    assert [p.data_ptr() for p in te.model.parameters()] == masters
    again = encode_and_release(te, ["a cat"], cache, device="cpu")
    assert placements == ["cpu"] and again[0] is first[0]


def test_generate_with_a_cache_loads_no_text_encoder_for_a_requeued_prompt(paths, monkeypatch) -> None:
    dit, vae = load_dit(paths["dit"], dtype=torch.float32), load_vae(paths["vae"])
    common = dict(dit=dit, vae=vae, text_encoder=paths["te"], prompt="a cat", width=32, height=32, frames=1,
                  steps=2, seed=3)
    plain = generate(**common)
    loads = []
    real = loaders.load_text_encoder
    monkeypatch.setattr(loaders, "load_text_encoder", lambda *a, **k: (loads.append(1), real(*a, **k))[1])
    cache = PromptCache()
    first = generate(**common, prompt_cache=cache)
    second = generate(**common, prompt_cache=cache)
    assert len(loads) == 1 and cache.hits == 2
    assert torch.equal(first, plain) and torch.equal(second, plain)
