"""Everything the nodes need from the ComfyUI host, in one place.

This is the only module of the pack that touches ``comfy``, ``folder_paths`` or
``latent_preview``, and it imports them inside each function: the pack (and its tests)
import without ComfyUI. Outside ComfyUI (tests, scripts) the host services fall back to the
CPU, no progress bar, no previews and no interrupts; ``folder_paths`` has no fallback (a
test installs a stub module under that name).

What the host gets from us:
- models ComfyUI manages are unloaded before ours load or move to the GPU, and the CUDA
  cache is emptied after ours move back (ComfyUI's own memory manager cannot see our
  modules, so we make room ourselves);
- one ProgressBar tick per sampling step and per decoded latent frame, with a latent
  preview when the server runs with ``--preview-method``; every tick also delivers a
  pending ``/interrupt``, and the sampler checks it before every model evaluation.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["filename_list", "full_path", "torch_device", "offload_device", "free_host_models",
           "soft_empty_cache", "free_vram_bytes", "on_device", "check_interrupt", "Progress"]


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


def free_host_models() -> None:
    """Unload every model ComfyUI manages, so ours have the GPU to themselves."""
    mm = _mm()
    if mm is not None:
        mm.unload_all_models()
        mm.soft_empty_cache()


def soft_empty_cache() -> None:
    """Give cached, unused GPU memory back to the driver."""
    mm = _mm()
    if mm is not None:
        mm.soft_empty_cache()


def free_vram_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA ``device`` in bytes after ComfyUI's models are unloaded (what our
    memory plans budget against); None for any other device."""
    from ..wan_core.planner import free_vram_bytes as _free

    if torch.device(device).type != "cuda":
        return None
    free_host_models()
    return _free(device)


@contextlib.contextmanager
def on_device(*modules: nn.Module) -> Iterator[torch.device]:
    """Run ``modules`` on the compute device, then move them back to the offload device.

    Nothing moves when both are the same device (``--cpu``, ``--highvram``).
    """
    device, rest = torch_device(), offload_device()
    moved = device != rest
    if moved:
        free_host_models()
        for m in modules:
            m.to(device)
    try:
        yield device
    finally:
        if moved:
            for m in modules:
                m.to(rest)
            soft_empty_cache()


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
