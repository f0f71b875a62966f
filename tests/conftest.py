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

import torch  # noqa: E402

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
