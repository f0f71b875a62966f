"""VACE with the run features: context windows cut the VACE context per window, a step cache
skips the control branch with the blocks, compiled blocks give the eager numbers."""
from __future__ import annotations

import pytest
import torch

from vace_factory import TINY_VACE, vace_official
from wan_core import SamplerSettings, TextEmbeds, sample
from wan_core.compile import compiled_blocks
from wan_core.context_windows import ContextOptions
from wan_core.runner import DiTRunner
from wan_core.step_cache import TeaCache
from wan_core.vace import WanVaceDiT
from wan_core.vace_conditioning import VaceEmbeds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dit():
    model = WanVaceDiT(TINY_VACE).eval()
    model.load_state_dict(vace_official(TINY_VACE))
    return model


def _embeds(frames: int, refs: int = 0) -> VaceEmbeds:
    g = torch.Generator().manual_seed(2)
    t = (frames - 1) // 4 + 1 + refs
    return VaceEmbeds(torch.randn(96, t, 2, 4, generator=g), refs, 32, 16, frames)


def _text():
    g = torch.Generator().manual_seed(3)
    return TextEmbeds(torch.randn(5, TINY_VACE.text_dim, generator=g), torch.randn(3, TINY_VACE.text_dim, generator=g))


def test_context_windows_slice_the_vace_context_per_window(dit):
    seen = []

    class Spy(DiTRunner):
        def __call__(self, x, t, context, clip_fea=None, y=None, *args, **kwargs):
            seen.append((x.shape[2], None if y is None else y.shape[2]))
            return super().__call__(x, t, context, clip_fea, y, *args, **kwargs)

    embeds = _embeds(17)                           # 5 latent frames, windows of 3 (9 pixel frames)
    out = sample(dit, _text(), SamplerSettings(steps=2, seed=1), vace=embeds, runner=Spy(dit),
                 context=ContextOptions(context_frames=9, overlap=4))
    assert out.shape == (16, 5, 2, 4) and torch.isfinite(out).all()
    assert seen and all(f == yf == 3 for f, yf in seen)


def test_step_cache_runs_with_vace_and_skips_steps(dit):
    cache = TeaCache(threshold=10.0, cfg=TINY_VACE, coefficients=(1.0, 0.0))
    runner = DiTRunner(dit, step_cache=cache)
    out = sample(dit, _text(), SamplerSettings(steps=4, seed=1), vace=_embeds(5, refs=1), runner=runner)
    assert out.shape == (16, 2, 2, 4) and torch.isfinite(out).all()
    assert cache.counts()["cond"].reused == 2       # steps 1 and 2 reuse step 0's residual (hints included)


@torch.no_grad()
def test_compiled_blocks_give_the_eager_numbers(dit):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(1, 16, 2, 2, 4, generator=g), torch.randn(1, 96, 2, 2, 4, generator=g)
    ctx, t = torch.randn(1, 5, TINY_VACE.text_dim, generator=g), torch.tensor([700.0])
    eager = dit(x, t, ctx, y=y, vace_strength=0.5)
    with compiled_blocks(dit, backend="eager"):
        compiled = dit(x, t, ctx, y=y, vace_strength=0.5)
    assert torch.equal(compiled, eager)
