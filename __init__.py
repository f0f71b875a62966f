"""ComfyUI entry point of the Wan Core node pack.

ComfyUI imports this file by path; only relative imports work here, and nothing heavy may
run at import time (no CUDA, no weights). The engine lives in ``wan_core/`` and never
imports ComfyUI; ``nodes/`` adapts it to the host.

Two ways in, one set of declarations (``nodes.NODE_CLASS_MAPPINGS``):
- V3 (ComfyUI >= 0.3.64, ``comfy_api.latest``): ``comfy_entrypoint`` returns a
  ``ComfyExtension`` listing every node rendered as an ``io.ComfyNode``. ComfyUI uses it
  only when the module has no ``NODE_CLASS_MAPPINGS`` (that one wins), so on such a host
  the mappings are not exported here.
- V1 (older hosts, and tools that import the pack without ComfyUI): ``NODE_CLASS_MAPPINGS``
  and ``NODE_DISPLAY_NAME_MAPPINGS``.
"""
from .nodes import NODE_CLASS_MAPPINGS as _NODE_CLASSES
from .nodes import NODE_DISPLAY_NAME_MAPPINGS as _DISPLAY_NAMES
from .nodes.host import v3_available, v3_extension


async def comfy_entrypoint():
    """The V3 extension of the pack (called by ComfyUI when it loads the module)."""
    return v3_extension(_NODE_CLASSES, _DISPLAY_NAMES)


if v3_available():
    __all__ = ["comfy_entrypoint"]
else:
    NODE_CLASS_MAPPINGS = _NODE_CLASSES
    NODE_DISPLAY_NAME_MAPPINGS = _DISPLAY_NAMES
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
