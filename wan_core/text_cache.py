"""Text-encoder lifecycle: a bounded prompt-embedding cache, and encode-then-release.

umT5-XXL is the largest model that runs only once per job (11 GB in bf16), and ComfyUI
users re-queue the same prompt over and over. :class:`PromptCache` keeps the embeddings
``[L, 4096]`` of recent prompts on the CPU, keyed by (encoder identity, prompt text), so a
re-queued prompt runs no encoder and, when the encoder is given as a file, loads none.
The cache is bounded by entries and by bytes (least recently used out first) and owned by
the caller (a node, a CLI session): nothing here is global.

Encoder identity: a checkpoint file is identified by its resolved path, size, mtime and the
requested dtype (a reloaded file hits the entries of the first load); a loaded model by the
object itself, held weakly (its entries are dropped when it is garbage collected, so a new
model at a recycled ``id`` can never see them).
"""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .offload import on_device

__all__ = ["PromptCache", "encode_and_release", "file_identity"]

EncodeFn = Callable[[list[str]], list[Tensor]]


def file_identity(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple:
    """Identity of a text-encoder checkpoint: (resolved path, size, mtime_ns, dtype). A file
    rewritten in place gets a new identity, so stale embeddings are never served."""
    p = Path(path).resolve()
    st = p.stat()
    return ("file", str(p), st.st_size, st.st_mtime_ns, str(dtype))


class PromptCache:
    """LRU cache of prompt embeddings on the CPU, bounded by ``max_entries`` and ``max_bytes``.

    An embedding bigger than ``max_bytes`` is returned but not stored. ``hits`` / ``misses``
    count prompts served from the cache / encoded.
    """

    def __init__(self, max_entries: int = 64, max_bytes: int = 256 * 2**20) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("PromptCache: max_entries and max_bytes must be >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, Tensor] = OrderedDict()
        self._nbytes = 0
        self._tokens: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._next_token = 0
        self.hits = 0
        self.misses = 0

    # ---- identity

    def identity(self, encoder: object) -> Hashable:
        """The cache identity of ``encoder``: a path (see :func:`file_identity`), a
        ``TextEncoder`` / module (held weakly), or any hashable key the caller chose."""
        if isinstance(encoder, (str, os.PathLike)):
            return file_identity(encoder)
        target = getattr(encoder, "model", encoder)  # TextEncoder -> its module
        if isinstance(target, torch.nn.Module):
            token = self._tokens.get(target)
            if token is None:
                token = self._next_token
                self._next_token += 1
                self._tokens[target] = token
                weakref.finalize(target, _forget, weakref.ref(self), token)
            return ("module", token)
        if isinstance(encoder, Hashable):
            return ("key", encoder)
        raise TypeError(f"PromptCache: cannot identify a text encoder of type {type(encoder).__name__}; "
                        "pass a path, a TextEncoder / module, or a hashable key")

    # ---- storage

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached embeddings."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, identity: Hashable, prompt: str) -> Tensor | None:
        key = (identity, prompt)
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, identity: Hashable, prompt: str, embedding: Tensor) -> Tensor:
        """Store ``embedding`` (moved to the CPU, detached) and evict down to the bounds;
        returns the stored CPU tensor."""
        value = embedding.detach().to("cpu")
        if value is embedding or value.untyped_storage().nbytes() > value.nbytes:
            value = value.clone()  # own our memory: no alias of the caller's tensor or a larger buffer
        key = (identity, prompt)
        self._drop(key)
        size = value.nbytes
        if size <= self.max_bytes and self.max_entries > 0:
            self._entries[key] = value
            self._nbytes += size
            while len(self._entries) > self.max_entries or self._nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
        return value

    def _drop(self, key: tuple) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._nbytes -= old.nbytes

    def forget(self, identity: Hashable) -> None:
        """Drop every entry of one encoder."""
        for key in [k for k in self._entries if k[0] == identity]:
            self._drop(key)

    def clear(self) -> None:
        self._entries.clear()
        self._nbytes = 0

    # ---- the operation

    def encode(self, identity: Hashable, prompts: Sequence[str], encode: EncodeFn) -> list[Tensor]:
        """Embeddings of ``prompts`` (CPU tensors, in order). Only the prompts missing from the
        cache go to ``encode(list_of_prompts) -> list_of_tensors``, in one call, and only when
        one is missing, so ``encode`` may load the model lazily."""
        found = {p: self.get(identity, p) for p in dict.fromkeys(prompts)}
        missing = [p for p, v in found.items() if v is None]
        self.hits += sum(1 for p in prompts if found[p] is not None)
        if missing:
            fresh = encode(missing)
            if len(fresh) != len(missing):
                raise RuntimeError(f"text encoder returned {len(fresh)} embeddings for {len(missing)} prompts")
            self.misses += len(missing)
            for p, e in zip(missing, fresh):
                found[p] = self.put(identity, p, e)
        return [found[p] for p in prompts]


def _forget(cache_ref: weakref.ref, token: int) -> None:
    cache = cache_ref()
    if cache is not None:
        cache.forget(("module", token))


def encode_and_release(text_encoder, prompts: Sequence[str], cache: PromptCache | None = None, *,
                       device: str | torch.device | None = None) -> list[Tensor]:
    """Encode ``prompts`` -> CPU ``[L_i, dim]`` tensors with a loaded ``TextEncoder``: served
    from ``cache`` when possible; otherwise run with the weights on ``device`` (default: where
    they rest) for this call only, through :func:`wan_core.offload.on_device`: the resting
    copy never moves, and the device copy is dropped straight after, so the encoder never
    sits on the GPU while the DiT samples."""
    def run(missing: list[str]) -> list[Tensor]:
        model = text_encoder.model
        target = device if device is not None else next(model.parameters()).device
        with on_device(model, target):
            return [e.to("cpu") for e in text_encoder.encode(list(missing))]

    if cache is None:
        return run(list(prompts))
    return cache.encode(cache.identity(text_encoder), prompts, run)
