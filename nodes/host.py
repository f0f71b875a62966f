"""Everything the nodes need from the ComfyUI host, in one place.

This is the only module of the pack that touches ``comfy``, ``folder_paths`` or
``latent_preview``, and it imports them inside each function: the pack (and its tests)
import without ComfyUI. Outside ComfyUI (tests, scripts) the host services fall back to the
CPU, no progress bar, no previews and no interrupts; ``folder_paths`` has no fallback (a
test installs a stub module under that name).

What the host gets from us:
- memory shared, not taken: before a stage (or a load) we ask ComfyUI's memory manager for
  the bytes the engine's plan needs (:func:`make_room`, ``free_memory``), so it unloads its
  own models only as far as that needs, and our plans budget against the free VRAM as the
  host reads it, less its ``--reserve-vram`` (:func:`free_vram_bytes`); ComfyUI's memory
  manager cannot see our modules, which rest on the offload device between stages and are
  put on the GPU per stage by ``wan_core`` (:func:`wan_core.offload.on_device`, block
  swap), never here; the host's ``--lowvram`` / ``--novram`` / ``--highvram`` /
  ``--gpu-only`` / ``--cpu`` arrive as :func:`vram_mode` and the devices;
- one ProgressBar tick per sampling step and per decoded latent frame, with a latent
  preview when the server runs with ``--preview-method``; every tick also delivers a
  pending ``/interrupt``, and the sampler checks it before every model evaluation.
"""
from __future__ import annotations

import importlib

import torch

__all__ = ["filename_list", "gguf_filename_list", "full_path", "torch_device", "offload_device", "vram_mode",
           "make_room", "make_room_to_load", "soft_empty_cache", "free_vram_bytes", "check_interrupt", "Progress"]


def _optional(name: str):
    """The host module ``name``, or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _mm():
    return _optional("comfy.model_management")


# ----------------------------------------------------------------------------- model files

def filename_list(key: str) -> list[str]:
    """Files under a ComfyUI model folder key (``diffusion_models``, ``vae``, ``text_encoders``,
    ``clip_vision``), relative names as shown in the combo boxes."""
    import folder_paths

    return list(folder_paths.get_filename_list(key))


def gguf_filename_list(key: str, gguf_key: str) -> list[str]:
    """The ``.gguf`` files of model folder ``key``, which ComfyUI's own list for it leaves out
    (it lists .safetensors/.pth/...): ComfyUI-GGUF's ``gguf_key`` list ("unet_gguf" /
    "clip_gguf") when that pack is installed, plus a walk of ``key``'s folders."""
    import os

    import folder_paths

    names: set[str] = set()
    if gguf_key in getattr(folder_paths, "folder_names_and_paths", {}):
        names.update(folder_paths.get_filename_list(gguf_key))
    for base in getattr(folder_paths, "get_folder_paths", lambda _key: [])(key):
        for root, _dirs, files in os.walk(base, followlinks=True):
            names.update(os.path.relpath(os.path.join(root, f), base) for f in files if f.lower().endswith(".gguf"))
    return sorted(names)


def full_path(key: str, name: str) -> str:
    """Absolute path of ``name`` in folder ``key``; raises FileNotFoundError naming both."""
    import folder_paths

    path = folder_paths.get_full_path(key, name)
    if not path:
        raise FileNotFoundError(f"'{name}' is not in the ComfyUI model folder '{key}' "
                                f"(models/{key}/); put the file there and refresh the node.")
    return path


# ----------------------------------------------------------------------------- devices and memory

def torch_device() -> torch.device:
    """The device ComfyUI computes on (``--cpu`` gives the CPU)."""
    mm = _mm()
    return torch.device(mm.get_torch_device()) if mm is not None else torch.device("cpu")


def offload_device() -> torch.device:
    """Where our models rest between nodes (CPU unless ComfyUI runs with ``--highvram``/``--gpu-only``)."""
    mm = _mm()
    return torch.device(mm.unet_offload_device()) if mm is not None else torch.device("cpu")


def vram_mode() -> str:
    """How the host was told to use the GPU: "low" (``--lowvram``), "none" (``--novram``),
    "high" (``--highvram`` / ``--gpu-only``), "off" (``--cpu``: no GPU) or "normal" (also
    outside ComfyUI)."""
    mm = _mm()
    state = getattr(getattr(mm, "vram_state", None), "name", "NORMAL_VRAM")
    return {"LOW_VRAM": "low", "NO_VRAM": "none", "HIGH_VRAM": "high", "DISABLED": "off"}.get(state, "normal")


def make_room(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to free ``nbytes`` on ``device`` for us: its memory manager unloads (or
    partly offloads) its own least-needed models until that much is free beside its
    ``--reserve-vram``, and keeps the others loaded. A no-op outside ComfyUI or for 0 bytes."""
    mm = _mm()
    if mm is None or nbytes <= 0:
        return
    reserve = mm.extra_reserved_memory() if hasattr(mm, "extra_reserved_memory") else 0
    mm.free_memory(int(nbytes) + reserve, torch.device(device))


def make_room_to_load(path: str) -> None:
    """Before a model file is loaded onto the offload device: room for its bytes when that
    device is a GPU (``--highvram`` / ``--gpu-only``); nothing when models rest on the CPU."""
    import os

    device = offload_device()
    if device.type != "cpu":
        make_room(os.path.getsize(path), device)


def soft_empty_cache() -> None:
    """Give cached, unused GPU memory back to the driver."""
    mm = _mm()
    if mm is not None:
        mm.soft_empty_cache()


def free_vram_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA ``device`` in bytes as ComfyUI reads it (driver-free + torch's
    cached blocks), less its ``--reserve-vram`` (which ``get_free_memory`` itself does not
    subtract; the engine's own reserve is a separate allowance for allocator fragmentation):
    what our memory plans budget against. None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    mm = _mm()
    if mm is None:
        from ..wan_core.planner import free_vram_bytes as _free

        return _free(device)
    reserve = mm.extra_reserved_memory() if hasattr(mm, "extra_reserved_memory") else 0
    return max(0, int(mm.get_free_memory(device)) - int(reserve))


# ----------------------------------------------------------------------------- progress and interrupts

def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (``/interrupt``)."""
    mm = _mm()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """A ComfyUI progress bar of ``total`` ticks on node ``node_id``, with optional latent previews.

    ``update(done, total, x0)``: ``done`` ticks so far out of ``total`` (default: the
    constructor's); ``x0`` normalised Wan latents ``[16, T', h, w]`` to preview (only when the
    server runs with a preview method). A no-op outside ComfyUI.
    """

    def __init__(self, total: int, node_id: str | None = None, preview: bool = False) -> None:
        utils = _optional("comfy.utils")
        self._bar = utils.ProgressBar(total, node_id=node_id) if utils is not None else None
        self._previewer = _previewer() if preview and self._bar is not None else None
        self.total = total

    def update(self, done: int, total: int | None = None, x0: torch.Tensor | None = None) -> None:
        if total is not None:
            self.total = total
        if self._bar is None:
            return
        image = None
        if self._previewer is not None and x0 is not None:
            # Latent2RGB reads the first frame of [B, 16, T', h, w] in the model's (normalised) space.
            image = self._previewer.decode_latent_to_preview_image("JPEG", x0[None].float().cpu())
        self._bar.update_absolute(done, self.total, image)


def _previewer():
    latent_preview = _optional("latent_preview")
    formats = _optional("comfy.latent_formats")
    if latent_preview is None or formats is None or not hasattr(formats, "Wan21"):
        return None
    return latent_preview.get_previewer(torch.device("cpu"), formats.Wan21())
