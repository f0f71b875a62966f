"""ComfyUI node classes of Wan Core (thin adapters over ``wan_core``).

Node ids start with ``WanCore`` and, once released, are never renamed; widgets are only
ever appended. The node set lands with issue 6; until then the pack registers no nodes.
"""
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
