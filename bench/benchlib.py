"""Shared by the benches: this process's RSS from /proc, and the official Wan 2.1 code as a peer.

The official code is never part of this repository: ``WAN21_SRC`` names an exported
Wan-Video/Wan2.1 tree. Its packages are entered without their ``__init__`` (which pulls
configs and extra packages), its flash attention is replaced by float32 SDPA in the
bench process only, and ``ftfy`` / ``torchvision.transforms`` (imported by the tokenizer and
by ``clip.py`` for preprocessing the benches do not run) are empty modules when missing.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from unittest import mock

__all__ = ["status_kib", "reset_peak", "official_src", "import_official"]


def status_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def official_src(marker: str = "wan/modules/model.py") -> Path | None:
    """The exported official tree named by ``WAN21_SRC``, when it holds ``marker``."""
    src = os.environ.get("WAN21_SRC")
    return Path(src) if src and (Path(src) / marker).is_file() else None


def _flash_as_sdpa(q, k, v, q_lens=None, k_lens=None, *args, **kwargs):
    """The official ``flash_attention(q, k, v, ...)`` on [B, L, N, D] as SDPA: float32 on the
    CPU; on a GPU in the half dtype flash-attn computes in (bf16 for float32 inputs, as the
    official wrapper casts); ``k_lens`` masks padded keys."""
    import torch
    import torch.nn.functional as F

    mask = None
    if k_lens is not None:
        keep = torch.arange(k.shape[1], device=q.device)[None, :] < k_lens.to(q.device)[:, None]
        mask = keep[:, None, None, :]
    dtype = q.dtype
    work = torch.float32 if q.device.type == "cpu" else (
        dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16)
    out = F.scaled_dot_product_attention(q.transpose(1, 2).to(work), k.transpose(1, 2).to(work),
                                         v.transpose(1, 2).to(work), attn_mask=mask)
    return out.transpose(1, 2).contiguous().to(dtype)


def import_official(module: str, src: Path | None = None, keep_flash: bool = False):
    """``wan.<module>`` (e.g. ``modules.model``, ``text2video``) of the exported official tree,
    with flash attention -> SDPA (``keep_flash``: the official flash-attn call stays, for a GPU
    with flash-attn installed)."""
    import torch

    src = src or official_src()
    for name in ("wan", "wan.modules", "wan.utils", "wan.distributed"):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(src.joinpath(*name.split(".")))]
            sys.modules[name] = pkg
    try:
        import ftfy  # noqa: F401  (the official tokenizer's text cleaning)
    except ImportError:
        sys.modules["ftfy"] = types.ModuleType("ftfy")   # only the tokenizer's cleaning would need it
    stubs = {}
    if module == "modules.clip" and importlib.util.find_spec("torchvision") is None:
        import diffusers  # noqa: F401  (both probe for torchvision once, when first imported: before the stubs)
        import transformers  # noqa: F401
        # clip.py imports torchvision.transforms for CLIPModel's preprocessing, which the visual tower
        # never uses: empty modules while it is imported only (transformers probes for the real one)
        stubs = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.transforms": types.ModuleType("torchvision.transforms")}
        stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    # t5.py evaluates ``torch.cuda.current_device()`` as a default argument at import time
    with mock.patch.object(torch.cuda, "current_device", lambda: 0):
        sys.modules.update(stubs)
        try:
            mod = importlib.import_module(f"wan.{module}")
        finally:
            for name in stubs:
                sys.modules.pop(name, None)
    if hasattr(mod, "flash_attention") and not keep_flash:
        mod.flash_attention = _flash_as_sdpa
    return mod
