"""Import the repository as a ComfyUI node pack, the way ComfyUI does, without ComfyUI.

ComfyUI imports the pack's ``__init__.py`` as a package whose name is its folder path, so
``nodes/`` reaches the engine through relative imports (``from ..wan_core import ...``).
Tests do the same under the name ``wancore_pack``; the engine is then
``wancore_pack.wan_core``, a module separate from a plain ``import wan_core``, so tests that
call the nodes compare against ``pack.wan_core`` (and its classes).

``folder_paths`` is ComfyUI's module; :func:`fake_folder_paths` builds a stand-in that
lists files of a ``{key: folder}`` mapping, :func:`using_folders` installs it for a block.
:func:`selftest_model_folders` / :func:`load_selftest_models` give the node tests the tiny
random selftest models, in model folders and loaded through the loader nodes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "wancore_pack"


def load_pack():
    """The repository imported as a package (``NODE_CLASS_MAPPINGS``, ``.nodes``, ``.wan_core``)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    for sub in ("wan_core", "wan_core.configs", "wan_core.vae", "wan_core.vae_tiling", "wan_core.selftest"):
        importlib.import_module(f"{PACK_NAME}.{sub}")
    return module


def fake_folder_paths(folders: dict[str, Path]) -> types.ModuleType:
    """A ``folder_paths`` stand-in: ``get_filename_list(key)`` / ``get_full_path(key, name)``."""
    mod = types.ModuleType("folder_paths")

    def get_filename_list(key: str) -> list[str]:
        folder = folders.get(key)
        if folder is None or not Path(folder).is_dir():
            return []
        return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())

    def get_full_path(key: str, name: str):
        folder = folders.get(key)
        path = Path(folder) / name if folder is not None else None
        return str(path) if path is not None and path.is_file() else None

    mod.get_filename_list = get_filename_list
    mod.get_full_path = get_full_path
    return mod


@contextlib.contextmanager
def using_folders(folders: dict[str, Path]) -> Iterator[None]:
    """``sys.modules["folder_paths"]`` is :func:`fake_folder_paths` of ``folders`` inside the block."""
    saved = sys.modules.get("folder_paths")
    sys.modules["folder_paths"] = fake_folder_paths(folders)
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop("folder_paths", None)
        else:
            sys.modules["folder_paths"] = saved


def selftest_model_folders(pack, root: Path, extra: Sequence[str] = ()) -> dict[str, Path]:
    """The selftest checkpoints (tiny random T2V / I2V DiTs, VAE, umT5, CLIP vision) moved into
    ComfyUI model folders under ``root`` (``{key: folder}``); ``extra``: more, empty, folders."""
    paths = pack.wan_core.selftest.write_selftest_models(root / "all")
    folders = {k: root / k for k in ("diffusion_models", "vae", "text_encoders", "clip_vision", *extra)}
    for folder in folders.values():
        folder.mkdir()
    for key, path in (("diffusion_models", paths.dit_t2v), ("diffusion_models", paths.dit_i2v),
                      ("vae", paths.vae), ("text_encoders", paths.text_encoder), ("clip_vision", paths.clip_vision)):
        path.rename(folders[key] / path.name)
    return folders


def load_selftest_models(pack, folders: dict[str, Path]) -> types.SimpleNamespace:
    """The models of :func:`selftest_model_folders` loaded by the loader nodes in float32:
    ``t2v``, ``i2v`` (DIT socket values), ``vae``, ``te``, ``clip``."""
    n = pack.nodes
    with using_folders(folders):
        return types.SimpleNamespace(
            t2v=n.WanCoreLoadDiT().load("wan_tiny_t2v.safetensors", "fp32", "sdpa")[0],
            i2v=n.WanCoreLoadDiT().load("wan_tiny_i2v.safetensors", "fp32", "sdpa")[0],
            vae=n.WanCoreLoadVAE().load("wan_tiny_vae.safetensors", "fp32")[0],
            te=n.WanCoreLoadTextEncoder().load("umt5_tiny.safetensors", "fp32")[0],
            clip=n.WanCoreLoadCLIPVision().load("clip_vision_tiny.safetensors", "fp32")[0])


def write_tiny_lora(path: Path, dit, seed: int = 5, extra: dict | None = None) -> Path:
    """A random rank-2 LoRA on ``blocks.0.self_attn.q`` and ``blocks.1.ffn.0`` of the tiny DiT
    ``dit`` (ComfyUI keys: ``diffusion_model.<name>.lora_down/up.weight``), plus the tensors
    of ``extra``, written to ``path``."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.0"):
        out_f, in_f = dit.get_submodule(name).weight.shape
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(2, in_f, generator=g)
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, 2, generator=g) * 0.5
    save_file({**sd, **(extra or {})}, str(path))
    return Path(path)
