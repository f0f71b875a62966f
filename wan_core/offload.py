"""Where weights live while a stage runs: block swap with prefetch, and whole-model moves.

Every move here follows one rule: a parameter's **master** tensor (the one the loader made,
on the offload device, in its storage dtype, fp8 and ``scale_weight`` included) is never
changed or freed; running on the compute device means pointing ``param.data`` at a *copy*
on that device, and leaving means pointing it back at the master and dropping the copy.
Nothing is copied back, nothing is held twice in RAM, and a copy has exactly the master's
bits, so the output is bit-identical to running without any of this.

- :class:`BlockSwap` is a :class:`wan_core.runner.BlockExecutor`: the first ``K`` DiT blocks
  (and the small non-block parts: embeddings, time MLPs, head) get a copy on the compute
  device for the whole run; the other blocks stay on the offload device (pinned RAM when
  CUDA is there and RAM allows) and are streamed in one block ahead on a side CUDA stream
  with non-blocking copies, then dropped after use. At most two streamed blocks are on the
  device at once (the running one and the next).
- :func:`on_device` does the same for a whole model between stages (text encoder, CLIP,
  VAE): ``with on_device(vae, "cuda"): vae.decode(...)``.

On a CPU-only machine ``compute_device == offload_device == "cpu"`` runs the very same
bookkeeping (real copies, a no-op stream), which is what the CPU tests check.

Use::

    swap = BlockSwap(resident_blocks=10, compute_device="cuda").setup(dit)
    latents = sample(dit, text, settings, shape=..., runner=DiTRunner(dit, executor=swap))
    swap.release()      # device copies dropped; the model is back on the offload device
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["BlockSwap", "DeviceBytes", "on_device", "module_bytes", "block_bytes", "pin_limit_bytes", "meminfo_bytes"]

log = logging.getLogger("wan_core")


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters in their storage dtypes (fp8 scales included)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def block_bytes(blocks: Sequence[nn.Module]) -> list[int]:
    return [module_bytes(b) for b in blocks]


def meminfo_bytes(field: str) -> int | None:
    """Host RAM figure ``field`` of ``/proc/meminfo`` ("MemTotal", "MemAvailable", ...) in
    bytes, or None where there is no such file or field (not Linux). The one reader of it."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pin_limit_bytes() -> int:
    """Default cap on pinned RAM: half of physical RAM (pinned pages cannot be swapped out,
    and Windows/WSL drivers refuse much more than that); 8 GiB when RAM is unknown."""
    total = meminfo_bytes("MemTotal")
    return total // 2 if total is not None else 8 << 30


@dataclass(frozen=True)
class DeviceBytes:
    """Parameter bytes on the compute device under a block-swap plan.

    resident: non-block parts + the K resident blocks, for the whole run.
    streaming: the most the streamed blocks add at once (the two largest swapped blocks;
    one when only one block is swapped; 0 when all are resident).
    """

    resident: int
    streaming: int

    @property
    def peak(self) -> int:
        return self.resident + self.streaming

    def line(self) -> str:
        gib = 1 << 30
        return (f"device weights {self.resident / gib:.2f} GiB resident + {self.streaming / gib:.2f} GiB "
                f"streaming = {self.peak / gib:.2f} GiB peak")


class _Copies:
    """Device copies of a set of parameters, with their masters to point back at."""

    def __init__(self, items: list[tuple[nn.Parameter, Tensor, Tensor]], event=None) -> None:
        self.items = items          # (param, master, device copy)
        self.event = event

    def activate(self, stream) -> None:
        if self.event is not None:
            stream.wait_event(self.event)
        for p, _, dev in self.items:
            if stream is not None and dev.is_cuda:
                dev.record_stream(stream)   # allocator: keep this memory until compute is done
            p.data = dev

    def restore(self) -> None:
        for p, master, _ in self.items:
            p.data = master
        self.items = []


def _copy_params(params: Iterable[nn.Parameter], device: torch.device, *, force: bool, stream=None) -> _Copies:
    """Copy ``params`` to ``device`` (non-blocking, on the CUDA ``stream`` when given).

    ``force``: copy even when a master is already on ``device`` (streamed blocks, whose
    device copy must be droppable, and with it the CPU test path); otherwise such a
    parameter is used as it is (no copy, nothing to drop).
    """
    items = []
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        for p in params:
            master = p.data
            if master.device == device and not force:
                continue
            dev = torch.empty_like(master, device=device)
            dev.copy_(master, non_blocking=True)
            items.append((p, master, dev))
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
    return _Copies(items, event)


class BlockSwap:
    """Block executor with K resident blocks and one-block-ahead streaming of the rest.

    Args:
        resident_blocks: K, the number of leading blocks kept on the compute device (0..N;
            larger values are clipped to N).
        compute_device: where the blocks run ("cuda", "cuda:1", or "cpu" for the CPU path).
        offload_device: where the masters of the streamed blocks live (default "cpu").
        pin_memory: "auto" (pin the streamed masters when the compute device is CUDA and
            they fit under :func:`pin_limit_bytes`), True, or False.
        prefetch: stream the next block while the current one runs (default True); False
            copies each block just before it runs (for comparison; same numbers).
    """

    def __init__(self, resident_blocks: int, compute_device: torch.device | str = "cpu",
                 offload_device: torch.device | str = "cpu", *, pin_memory: bool | str = "auto",
                 prefetch: bool = True) -> None:
        if resident_blocks < 0:
            raise ValueError(f"resident_blocks must be >= 0, got {resident_blocks}")
        self.resident_blocks = resident_blocks
        self.compute_device = torch.device(compute_device)
        self.offload_device = torch.device(offload_device)
        if self.compute_device.type == "cuda" and self.compute_device.index is None:
            # without a CUDA runtime (a fake device, wan_core.memsim) there is only device 0
            index = torch.cuda.current_device() if torch.cuda.is_available() else 0
            self.compute_device = torch.device("cuda", index)
        self.pin_memory = pin_memory
        self.prefetch = prefetch
        self._blocks: nn.ModuleList | None = None
        self._resident: list[_Copies] = []
        self._pinned = False
        self._stream = None
        self._k = 0
        self._other_bytes = 0
        self.streamed_blocks = 0      # counters since setup, for tests and logs
        self.streamed_bytes = 0

    # -- placement ---------------------------------------------------------------------

    def setup(self, model: nn.Module) -> BlockSwap:
        """Place ``model`` (a WanDiT, or a bare ModuleList of blocks) for running.

        Non-block parameters and blocks ``0..K-1`` get copies on the compute device; the
        masters of the other blocks move to the offload device (pinned per ``pin_memory``).
        """
        self.release()
        blocks = model if isinstance(model, nn.ModuleList) else model.blocks
        k = min(self.resident_blocks, len(blocks))
        dev = self.compute_device
        self._other_bytes = 0
        if not isinstance(model, nn.ModuleList):
            in_blocks = {id(p) for p in blocks.parameters()}
            vace = getattr(model, "vace_blocks", None)
            if vace is not None and k < len(blocks):
                # VACE: while blocks stream, its control blocks stay on their masters too; the
                # model runs each on the device for its call (wan_core.vace.VaceStream, on_device)
                in_blocks |= {id(p) for p in vace.parameters()}
            rest = [p for p in model.parameters() if id(p) not in in_blocks]
            self._other_bytes = sum(p.numel() * p.element_size() for p in rest)
            self._resident.append(_copy_params(rest, dev, force=False))
        for block in blocks[:k]:
            self._resident.append(_copy_params(block.parameters(), dev, force=False))
        for c in self._resident:
            c.activate(None)
        swapped = list(blocks[k:])
        self._pinned = self._want_pin(sum(module_bytes(b) for b in swapped))
        for block in swapped:
            for p in block.parameters():
                t = p.data
                if t.device != self.offload_device:
                    t = t.to(self.offload_device)
                if self._pinned and not t.is_pinned():
                    try:
                        t = t.pin_memory()
                    except RuntimeError as err:    # out of lockable memory: run unpinned
                        warnings.warn(f"block swap: cannot pin the offloaded blocks ({err}); streaming "
                                      "from pageable memory (slower, same numbers)", RuntimeWarning, stacklevel=2)
                        self._pinned = False
                p.data = t
        if dev.type == "cuda" and self._stream is None and torch.cuda.is_available():
            # the side stream overlaps copies with compute on a real GPU; on a fake "cuda"
            # device (no CUDA runtime: wan_core.memsim) the same prefetch order runs without
            # streams or events, so the simulated peak has the same two blocks in flight
            self._stream = torch.cuda.Stream(device=dev)
        self._blocks = blocks
        self._k = k
        log.info("wan_core: block swap: %d of %d blocks resident on %s, %d streamed from %s%s; %s",
                 k, len(blocks), dev, len(swapped), self.offload_device, " (pinned)" if self._pinned else "",
                 self.device_bytes().line())
        return self

    def _want_pin(self, nbytes: int) -> bool:
        if nbytes == 0 or self.offload_device.type != "cpu" or self.compute_device.type != "cuda" \
                or not torch.cuda.is_available():
            return False
        if self.pin_memory == "auto":
            return nbytes <= pin_limit_bytes()
        return bool(self.pin_memory)

    def release(self) -> None:
        """Drop every device copy: parameters point at their masters again."""
        for c in self._resident:
            c.restore()
        self._resident = []
        self._blocks = None

    # -- accounting --------------------------------------------------------------------

    def device_bytes(self, blocks: Sequence[nn.Module] | None = None, other_bytes: int | None = None) -> DeviceBytes:
        """Parameter bytes this plan puts on the compute device (see :class:`DeviceBytes`).

        After :meth:`setup` it counts what was placed; before, pass ``blocks`` (and the
        non-block bytes) to get the figure for a model without placing it.
        """
        if blocks is None:
            if self._blocks is None:
                raise ValueError("device_bytes() before setup() needs the blocks")
            blocks = self._blocks
        other = self._other_bytes if other_bytes is None else other_bytes
        sizes = block_bytes(blocks)
        k = min(self.resident_blocks, len(sizes))
        swapped = sorted(sizes[k:], reverse=True)
        streaming = sum(swapped[:2]) if self.prefetch else sum(swapped[:1])
        return DeviceBytes(resident=other + sum(sizes[:k]), streaming=streaming)

    # -- running -----------------------------------------------------------------------

    def _fetch(self, block: nn.Module) -> _Copies:
        copies = _copy_params(block.parameters(), self.compute_device, force=True, stream=self._stream)
        self.streamed_blocks += 1
        self.streamed_bytes += sum(t.numel() * t.element_size() for _, t, _ in copies.items)
        return copies

    def run(self, blocks: nn.ModuleList, tokens: Tensor, inputs) -> Tensor:
        """Run ``blocks`` in order on ``tokens`` ``[B, L, dim]`` (on the compute device)."""
        if self._blocks is not blocks:
            self.setup(blocks)
        k, n = self._k, len(blocks)
        skip = getattr(inputs, "skip_blocks", ())   # Skip Layer Guidance: these blocks are passed over
        compute = torch.cuda.current_stream(self.compute_device) if self._stream is not None else None
        pending: dict[int, _Copies] = {}
        cur: _Copies | None = None
        try:
            if k < n and self.prefetch:
                pending[k] = self._fetch(blocks[k])
            for i, block in enumerate(blocks):
                if i < k:
                    tokens = tokens if i in skip else block(tokens, inputs)
                    continue
                cur = pending.pop(i) if i in pending else self._fetch(block)
                cur.activate(compute)
                if self.prefetch and i + 1 < n:
                    pending[i + 1] = self._fetch(blocks[i + 1])   # overlaps with this block's compute
                tokens = tokens if i in skip else block(tokens, inputs)
                cur.restore()
                cur = None
        finally:
            # interrupted (or a block raised): drop whatever was streamed in
            for c in ([cur] if cur is not None else []) + list(pending.values()):
                c.restore()
        return tokens


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | str, *, empty_cache: bool = True) -> Iterator[nn.Module]:
    """Run a stage with ``module`` on ``device``; afterwards it is back on its masters.

    Parameters already on ``device`` are used as they are; the others get a device copy
    for the duration of the block (nothing is copied back, the masters stay where they
    are). ``empty_cache``: return the freed CUDA memory to the driver on exit.
    """
    device = torch.device(device)
    copies = _copy_params(module.parameters(), device, force=False)
    copies.activate(None)
    try:
        yield module
    finally:
        copies.restore()
        if empty_cache and device.type == "cuda":
            torch.cuda.empty_cache()
