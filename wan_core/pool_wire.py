"""Jobs for :mod:`wan_core.worker_pool` as plain data, whatever name the engine was imported under.

ComfyUI imports this pack under its folder name, so the host's classes live in
``<pack>.wan_core.*`` while a worker imports the engine as ``wan_core``: a pickle of the
host's objects would name modules the worker cannot import. :func:`to_wire` turns the
engine's dataclasses into ``{"__wan_core__": "module:Class", "fields": {...}}`` (module
relative to the package), containers element by element, and leaves tensors, numbers,
strings, dtypes, devices and paths as they are; :func:`from_wire` rebuilds them with the
classes of the process it runs in (their ``__post_init__`` checks run again).
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["to_wire", "from_wire"]

_PACKAGE = __name__.rpartition(".")[0]          # "wan_core", or "<pack>.wan_core" inside ComfyUI


def to_wire(value):
    """``value`` as plain data a worker can rebuild whatever name the host imported the engine
    under: the engine's dataclasses as ``{"__wan_core__": "module:Class", "fields": {...}}``,
    containers element by element, tensors / numbers / strings / dtypes / paths as they are."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, Tensor, torch.dtype, torch.device, Path)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith(_PACKAGE + "."):
            raise TypeError(f"{cls.__module__}.{cls.__qualname__} is not a wan_core type and cannot be sent to the "
                            "multi-GPU workers")
        fields = {f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return {"__wan_core__": f"{cls.__module__[len(_PACKAGE) + 1:]}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, (tuple, list, frozenset)):
        return type(value)(to_wire(v) for v in value)
    if isinstance(value, dict) and "__wan_core__" not in value:
        return {k: to_wire(v) for k, v in value.items()}
    raise TypeError(f"a {type(value).__name__} cannot be sent to the multi-GPU workers")


def from_wire(value):
    """Inverse of :func:`to_wire`, with this process's engine classes."""
    if isinstance(value, dict):
        if "__wan_core__" not in value:
            return {k: from_wire(v) for k, v in value.items()}
        module, _, qualname = value["__wan_core__"].partition(":")
        cls = getattr(importlib.import_module(f"{_PACKAGE}.{module}"), qualname)
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{value['__wan_core__']} is not a wan_core dataclass")
        return cls(**{k: from_wire(v) for k, v in value["fields"].items()})
    if isinstance(value, (tuple, list, frozenset)):
        return type(value)(from_wire(v) for v in value)
    return value
