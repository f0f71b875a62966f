"""Import the repository as a ComfyUI node pack, the way ComfyUI does, without ComfyUI.

ComfyUI imports the pack's ``__init__.py`` as a package whose name is its folder path, so
``nodes/`` reaches the engine through relative imports (``from ..wan_core import ...``).
Tests do the same under the name ``wancore_pack``; the engine is then
``wancore_pack.wan_core``, a module separate from a plain ``import wan_core``, so tests that
call the nodes compare against ``pack.wan_core`` (and its classes).

``folder_paths`` is ComfyUI's module; :func:`fake_folder_paths` builds a stand-in that
lists files of a ``{key: folder}`` mapping.
"""
from __future__ import annotations

import importlib.util
import sys
import types
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
