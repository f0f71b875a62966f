"""torch.compile of the DiT blocks: same numbers as the plain model, reversible, never breaks.

The fast tests trace with ``backend="eager"`` (dynamo capture without code generation); the
inductor test generates C++ and runs only with WAN_CORE_TEST_INDUCTOR=1 (marked slow).
Measured on the tiny t2v DiT (latent [1, 16, 2, 4, 4], float32, 2 busy CPU cores): backends
"eager" and "aot_eager" give bit-identical output; inductor max abs difference 4.2e-7 on
outputs ~2, first call 118 s (C++ compile), next calls 0.2 s, a new latent size 79 s more.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

import tiny
from wan_core.compile import compile_blocks, compiled_blocks
from wan_core.dit import WanDiT
from wan_core.runner import DiTRunner

INDUCTOR_ATOL = 1e-5   # measured 4.2e-7 max abs


def tiny_dit() -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(tiny.TINY_DIT_T2V).eval().requires_grad_(False)


def inputs(f: int = 2, h: int = 4, w: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(1, 16, f, h, w, generator=g), "t": torch.tensor([700.0]),
            "context": torch.randn(1, 5, tiny.TINY_DIT_T2V.text_dim, generator=g)}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # no graph cached by an earlier test (they are keyed on the code object)
    yield
    torch._dynamo.reset()


def test_compiled_blocks_match_the_plain_model_and_restore():
    model = tiny_dit()
    x, x2 = inputs(), inputs(f=3, h=6, w=4, seed=2)
    ref, ref2 = model(**x), model(**x2)
    handle = compile_blocks(model, backend="eager")
    assert torch.equal(model(**x), ref)
    assert torch.equal(model(**x2), ref2)                     # a new token count still works
    assert torch.equal(DiTRunner(model)(**x), ref)            # the runner picks it up unchanged
    assert not handle.fell_back
    assert list(dict(model.named_parameters())) == list(dict(tiny_dit().named_parameters()))
    handle.restore()
    handle.restore()
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert torch.equal(model(**x), ref)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(caplog, fresh_dynamo):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C compiler found")

    model = tiny_dit()
    x = inputs()
    ref = model(**x)
    with caplog.at_level(logging.WARNING, logger="wan_core"), compiled_blocks(model, backend=broken_backend) as h:
        out1, out2 = model(**x), model(**x)
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    assert h.fell_back
    warnings = [r for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "no C compiler" in warnings[0].getMessage()
    assert all("forward" not in b.__dict__ for b in model.blocks)


def test_errors_of_the_model_itself_still_raise():
    model = tiny_dit()
    with compiled_blocks(model, backend="eager") as h:
        tokens, inp = model.prepare(**inputs())
        with pytest.raises(RuntimeError):
            model.blocks[0](tokens[..., :100], inp)  # wrong width: eager fails as well
        assert not h.fell_back


def test_unmerged_lora_hooks_work_on_compiled_blocks(tmp_path):
    from safetensors.torch import save_file

    from wan_core.lora import LoraSpec, apply_loras

    model = tiny_dit()
    x = inputs()
    ref = model(**x)
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "l.safetensors"
    save_file({"diffusion_model.blocks.1.self_attn.q.lora_A.weight": torch.randn(4, 256, generator=g),
               "diffusion_model.blocks.1.self_attn.q.lora_B.weight": 0.1 * torch.randn(256, 4, generator=g)}, str(path))
    report = apply_loras(model, [LoraSpec(path, 1.0)], mode="unmerged")
    want = model(**x)
    report.remove()
    with compiled_blocks(model, backend="eager"):
        assert torch.equal(model(**x), ref)
        report = apply_loras(model, [LoraSpec(path, 1.0)], mode="unmerged")  # hook added after compiling
        assert torch.equal(model(**x), want)
        report.remove()
        assert torch.equal(model(**x), ref)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("WAN_CORE_TEST_INDUCTOR"),
                    reason="inductor compiles C++ for ~2 min on 2 cores; set WAN_CORE_TEST_INDUCTOR=1")
def test_inductor_on_cpu_matches_the_plain_model(fresh_dynamo):
    model = tiny_dit()
    x = inputs()
    ref = model(**x)
    with compiled_blocks(model) as h:
        out = model(**x)
    if h.fell_back:
        pytest.skip(f"inductor unavailable here: {h._state.error}")
    assert torch.allclose(out, ref, rtol=0, atol=INDUCTOR_ATOL)
