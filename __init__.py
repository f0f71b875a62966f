"""ComfyUI entry point of the Wan Core node pack.

ComfyUI imports this file by path; only relative imports work here, and nothing heavy may
run at import time (no CUDA, no weights). The engine lives in ``wan_core/`` and never
imports ComfyUI; ``nodes/`` adapts it to the host.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
