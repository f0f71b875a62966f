"""Test set-up shared by every test file.

The repository root and ``tests/`` go on ``sys.path`` so tests import ``wan_core`` and the
helpers in ``tests/`` (``tiny``, ``factory``) without an installed package. There is no
``tests/__init__.py``: ComfyUI has a ``tests`` package of its own.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread beats a two-thread pool (by 10x on a busy machine).
    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_vae():
    """The tiny Wan VAE (tests/tiny.py) with the factory's weights for seed 7, built on meta."""
    import factory
    from tiny import TINY_VAE, built
    from wan_core.vae import WanVAE

    return built(WanVAE, TINY_VAE, factory.vae_official(TINY_VAE, 7))
