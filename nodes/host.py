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
  pending ``/interrupt``, and the sampler checks it before every model evaluation;
- our DiT as a core ``MODEL`` (:func:`core_model`, WanCore DiT To Model): a ModelPatcher
  the host loads, patches (core LoRA) and unloads like its own; before our own sampling
  stage :func:`release_from_core` gives the DiT back unpatched;
- our nodes as V3 nodes (``comfy_api.latest``) where the host has that schema
  (:func:`v3_available`: ComfyUI >= 0.3.64): :func:`v3_extension` renders every class of
  ``NODE_CLASS_MAPPINGS`` (:mod:`.v3`, from the one V1 declaration read by :mod:`.schema`);
  the root ``__init__.py`` hands it to ComfyUI through ``comfy_entrypoint``.
"""
from __future__ import annotations

import importlib
import os
import re
import weakref

import torch

from .v3 import render_nodes

__all__ = ["filename_list", "gguf_filename_list", "model_folder_list", "full_path", "torch_device", "offload_device", "vram_mode",
           "make_room", "make_room_to_load", "soft_empty_cache", "free_vram_bytes", "check_interrupt", "Progress",
           "core_model", "release_from_core", "progress_text",
           "V3_MIN_COMFYUI", "v3_available", "v3_extension"]


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

    import folder_paths

    names: set[str] = set()
    if gguf_key in getattr(folder_paths, "folder_names_and_paths", {}):
        names.update(folder_paths.get_filename_list(gguf_key))
    for base in _folder_paths(key):
        for root, _dirs, files in os.walk(base, followlinks=True):
            names.update(os.path.relpath(os.path.join(root, f), base) for f in files if f.lower().endswith(".gguf"))
    return sorted(names)


def model_folder_list(key: str) -> list[str]:
    """The model *folders* under ``key``'s folders, which ComfyUI's file lists leave out:
    relative names ending in ``/`` (``Wan2.1-T2V-1.3B-Diffusers/transformer/``).

    A folder is listed when it holds a ``*.safetensors.index.json`` (a sharded diffusers model)
    or a diffusers ``config.json``, and the engine can tell its weights file
    (:func:`wan_core.files.weights_in_folder`). A folder holding just a loose weights file is
    not: that file is listed already. :func:`full_path` resolves these names.
    """
    from pathlib import Path

    from ..wan_core import INDEX_SUFFIX, CheckpointError, weights_in_folder

    names: set[str] = set()
    for base in _folder_paths(key):
        for root, _dirs, files in os.walk(base, followlinks=True):
            rel = os.path.relpath(root, base)
            if rel == "." or not ("config.json" in files or any(f.lower().endswith(INDEX_SUFFIX) for f in files)):
                continue
            try:
                weights_in_folder(Path(root))
            except (CheckpointError, OSError):
                continue        # no weights, or several: the files themselves stay listed
            names.add(Path(rel).as_posix() + "/")
    return sorted(names)


def _folder_paths(key: str) -> list[str]:
    """The folders of model folder ``key`` (ComfyUI's ``get_folder_paths``; none in a stub without it)."""
    import folder_paths

    return list(getattr(folder_paths, "get_folder_paths", lambda _key: [])(key))


def _model_folder(key: str, name: str) -> str | None:
    """The folder a :func:`model_folder_list` name stands for, or None. Only names inside one of
    ``key``'s folders resolve (no absolute paths, no ``..``)."""
    from pathlib import PurePosixPath

    rel = PurePosixPath(name.replace("\\", "/"))
    parts = rel.parts
    if not parts or rel.is_absolute() or ":" in parts[0] or any(p in (".", "..") for p in parts):
        return None
    for base in _folder_paths(key):
        path = os.path.join(base, *parts)
        if os.path.isdir(path):
            return path
    return None


def full_path(key: str, name: str) -> str:
    """Absolute path of ``name`` in folder ``key`` (a file, or a folder named with a trailing
    ``/`` as :func:`model_folder_list` lists it); raises FileNotFoundError naming both."""
    import folder_paths

    path = _model_folder(key, name) if name.endswith("/") else folder_paths.get_full_path(key, name)
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

    device = offload_device()
    if device.type != "cpu":
        make_room(_weights_bytes(path), device)


def _weights_bytes(path: str) -> int:
    """Bytes of a weights file, or of the weights files of a model folder (all its shards)."""

    if not os.path.isdir(path):
        return os.path.getsize(path)
    suffixes = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin", ".gguf")
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file() and e.name.lower().endswith(suffixes))


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
        from ..wan_core import free_vram_bytes as _free

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

    def __init__(self, total: int, node_id: str | None = None, preview: bool = False,
                 latent_channels: int = 16) -> None:
        utils = _optional("comfy.utils")
        self._bar = utils.ProgressBar(total, node_id=node_id) if utils is not None else None
        self._previewer = _previewer(latent_channels) if preview and self._bar is not None else None
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


def _previewer(latent_channels: int = 16):
    latent_preview = _optional("latent_preview")
    formats = _optional("comfy.latent_formats")
    name = "Wan22" if latent_channels == 48 else "Wan21"   # Wan 2.2 TI2V-5B: 48 channels
    if latent_preview is None or formats is None or not hasattr(formats, name):
        return None
    return latent_preview.get_previewer(torch.device("cpu"), getattr(formats, name)())


def progress_text(text: str, node_id: str | None) -> None:
    """Show ``text`` under node ``node_id`` in the graph editor (ComfyUI's progress text);
    a no-op outside ComfyUI."""
    server = _optional("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and node_id is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, node_id)


# ----------------------------------------------------------------------------- core MODEL bridge

def core_model(dit: torch.nn.Module, shift: float):
    """Our loaded :class:`wan_core.dit.WanDiT` as a core ``MODEL``: a ``ModelPatcher`` over a
    ``comfy.model_base.WAN21`` whose ``diffusion_model`` *is* ``dit`` (the official parameter
    names, so core LoRA loaders find their keys) and whose sampling is Wan's flow matching
    (``ModelSamplingDiscreteFlow`` + ``CONST``, ``shift``; ModelSamplingSD3 may change it).

    Only the model call is ours: ComfyUI builds the conditioning (text ``c_crossattn``,
    ``clip_fea``, the I2V ``c_concat``), scales the input and turns the velocity into the
    denoised prediction exactly as for its native Wan model. Weights are not copied: the
    patcher moves ``dit`` itself between ``torch_device()`` and ``offload_device()``.
    """
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dit.cfg
    variant = comfy.supported_models.WAN21_I2V if cfg.has_image_input else comfy.supported_models.WAN21_T2V
    unet_config = {"image_model": "wan2.1", "model_type": cfg.model_type, "in_dim": cfg.in_dim, "dim": cfg.dim,
                   "disable_unet_model_creation": True}
    model_config = variant(unet_config)
    model_config.sampling_settings["shift"] = float(shift)
    model = _bridged_wan_class(comfy.model_base)(model_config, image_to_video=cfg.has_image_input,
                                                 device=offload_device())
    model.diffusion_model = dit
    release_from_core(dit)   # weights still patched by an earlier bridge must not become this one's "originals"
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch_device(), offload_device=offload_device())
    _CORE_BACKUPS.setdefault(dit, []).append(patcher.backup)   # shared by the patcher's clones (core LoRA)
    return patcher


# dit -> the weight-backup dicts of its core MODELs. ComfyUI patches weights (core LoRA) in place
# and keeps the originals in the patcher's ``backup``; when the patchers die while loaded (their
# graph nodes leave the cache) the host forgets the model unrestored. Our DiT outlives them, so
# the originals are kept here (they hold no reference to the DiT) and put back by release_from_core.
_CORE_BACKUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def release_from_core(module: torch.nn.Module) -> None:
    """Unload every core MODEL over ``module`` (made by :func:`core_model`): ComfyUI applies a
    loaded model's weight patches (core LoRA loaders) to the weights in place and restores
    them only when it unloads the model, so our own stages must not run on a module the host
    still holds patched. A no-op outside ComfyUI or when no such model is loaded."""
    loaded_models = getattr(_mm(), "current_loaded_models", [])
    for i in reversed(range(len(loaded_models))):
        loaded = loaded_models[i]
        if getattr(getattr(loaded.model, "model", None), "diffusion_model", None) is module:
            loaded.model_unload()
            loaded_models.pop(i)
    prefix = "diffusion_model."
    for backup in _CORE_BACKUPS.get(module, ()):
        for key, saved in list(backup.items()):   # left patched by a patcher the host has forgotten
            name = key[len(prefix):] if key.startswith(prefix) else key
            owner, leaf = module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            if saved.inplace_update:
                getattr(owner, leaf).data.copy_(saved.weight)
            else:
                setattr(owner, leaf, saved.weight if isinstance(saved.weight, torch.nn.Parameter)
                        else torch.nn.Parameter(saved.weight, requires_grad=False))
        backup.clear()


def _bridged_wan_class(model_base):
    class WanCoreBridgedWAN21(model_base.WAN21):
        """ComfyUI's WAN21 with the model call replaced by a Wan Core DiT forward."""

        def get_dtype(self):
            return self.diffusion_model.resolved_compute_dtype()

        def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                         **kwargs):
            sigma = t
            dit = self.diffusion_model
            xc = self.model_sampling.calculate_input(sigma, x)
            device = dit.patch_embedding.weight.device
            if c_concat is not None:   # I2V: mask + image latents on channels, as the native model
                xc = torch.cat([xc, c_concat.to(xc)], dim=1)
            timestep = self.model_sampling.timestep(t).float().to(device)
            context = c_crossattn.to(device)
            if context.shape[1] > dit.cfg.text_len:   # core umT5 pads to 512; longer prompts are kept whole
                context = context[:, :dit.cfg.text_len]
            clip_fea = kwargs.get("clip_fea")
            if clip_fea is not None:
                clip_fea = clip_fea.to(device)
            velocity = dit(xc.to(device).float(), timestep, context, clip_fea)
            return self.model_sampling.calculate_denoised(sigma, velocity.to(x.device).float(), x)

    return WanCoreBridgedWAN21


# ----------------------------------------------------------------------------- V3 schema

# The ComfyUI whose V3 schema (comfy_api.latest, marked unstable upstream) the rendering was
# checked against; older hosts load the V1 classes, which are the same declarations.
V3_MIN_COMFYUI = (0, 3, 64)
_V3_NAMES = ("ComfyNode", "Schema", "NodeOutput", "Hidden", "Custom", "NumberDisplay", "Combo")


def v3_available() -> bool:
    """True inside a ComfyUI that loads V3 nodes as :mod:`.v3` renders them: ``comfy_api.latest``
    with the names used there and a version of at least :data:`V3_MIN_COMFYUI`. False outside
    ComfyUI, on older hosts (they get the V1 classes), and when the environment variable
    ``WANCORE_V1_NODES=1`` asks for the V1 classes (a way out should a later host's V3 differ)."""
    if os.environ.get("WANCORE_V1_NODES") == "1":
        return False
    version, latest = _optional("comfyui_version"), _optional("comfy_api.latest")
    if version is None or latest is None:
        return False
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", str(getattr(version, "__version__", "")))
    io = getattr(latest, "io", None)
    return (found is not None and tuple(int(p) for p in found.groups()) >= V3_MIN_COMFYUI
            and hasattr(latest, "ComfyExtension") and all(hasattr(io, name) for name in _V3_NAMES))


def v3_extension(classes: dict[str, type], display_names: dict[str, str]):
    """The ``ComfyExtension`` that ``comfy_entrypoint`` returns: every class of ``classes``
    (``NODE_CLASS_MAPPINGS``) rendered as an ``io.ComfyNode`` by :func:`.v3.render_nodes`."""
    from comfy_api.latest import ComfyExtension, io

    nodes = render_nodes(io, classes, display_names)

    class WanCoreExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return list(nodes)

    return WanCoreExtension()
