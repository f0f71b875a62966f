"""A pool of worker processes, one per GPU, that samples one video together.

A host that runs its graph in one process (ComfyUI) cannot run :mod:`wan_core.distributed`
(Ulysses / Ring / CFG parallelism on ``torch.distributed`` process groups) itself: that needs
one process per GPU. :class:`WorkerPool` starts those processes once (the ``spawn`` start
method: CUDA cannot be forked), keeps them and their copy of the DiT between jobs, and runs
:func:`wan_core.pipeline.sample` in all of them for each job; the host sends the job
(conditioning + settings) and receives rank 0's progress and latents.

Lifecycle
- start (first job or :meth:`WorkerPool.start`): ``world = ulysses x ring (x 2 with CFG
  parallelism)`` processes, one per device; each joins the process group (NCCL on GPUs, gloo
  on the CPU, plus a gloo group for the control flags), builds its
  :class:`~wan_core.distributed.ParallelGroups` and reports ready. The pool is closed at
  interpreter exit. :class:`WorkerPools` keeps one pool: another configuration closes it.
- model: a job names its DiT by a :class:`DiTSource` (file + load options + merged LoRAs); a
  worker loads it resting on the CPU on first use and keeps it while the source and the
  files' size / modification time stay the same.
- job: every rank loads the model and plans its run (:func:`wan_core.run_plan.prepare_run`
  on its own device), then the ranks agree (one ``all_reduce``) that all are ready: a failure
  on one rank ends the job on all of them, without a hang, and the pool stays up.
- interrupt: the host's check is polled while waiting; when it raises, a shared Event is set,
  and before every model evaluation the ranks ``all_reduce`` that flag, so they all stop at
  the same evaluation (a rank stopping alone would leave the others waiting in a collective);
  then the host's own exception is raised.
- errors: a worker logs its exception with the traceback (console, tagged with its rank) and
  sends its type and message; the host raises :class:`PoolError` naming the rank. A worker
  that dies, or ranks that have not stopped ``stop_timeout_s`` after an error or interrupt
  (waiting in a collective for a failed peer), end the job at once: the pool is torn down and
  starts again on the next job.

Why the workers never run the host's main module: ``spawn`` re-runs the parent's
``__main__`` in each child (ComfyUI's ``main.py``: argument parsing, prestartup scripts, CUDA
on device 0) and unpickles the process target by the parent's module names (ComfyUI imports
this pack under its folder name, which a child cannot import). So, while the processes
start, ``__main__`` is a stand-in built from :mod:`wan_core.pool_entry`, which imports the
engine in the child as ``wan_core``, and jobs cross as plain data
(:func:`wan_core.pool_wire.to_wire`: the engine's dataclasses by their names inside the
package, tensors, numbers, strings).

Limits: each worker holds a whole copy of the DiT in host RAM (N copies for N GPUs, beside
the host's own); Wan 2.2 models, Fun V1.1 reference models, and VACE or step caches with
sequence parallelism are refused before any process starts; the NCCL path is not verified here (CPU / gloo only).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import Tensor

from .checkpoint import inspect_checkpoint
from .conditioning import ImageEmbeds, TextEmbeds
from .context_windows import ContextOptions
from .distributed import ParallelConfig
from .fun import FunControlEmbeds
from .guidance import GuidanceOptions
from .loaders import load_dit
from .lora import apply_loras
from .lora_files import LoraSpec
from .pipeline import SamplerSettings, StepInfo
from .pool_wire import to_wire
from .quant import is_quantized
from .run_options import RunOptions
from .vace_conditioning import VaceEmbeds

__all__ = ["PoolConfig", "DiTSource", "PoolJob", "PoolError", "WorkerPool", "WorkerPools", "parse_devices",
           "check_job"]

log = logging.getLogger("wan_core")

#: Seconds between two looks at the workers' health and the host's interrupt while waiting.
POLL_S = 0.05
_ENTRY = Path(__file__).with_name("pool_entry.py")
_MAIN_SWAP = threading.Lock()                   # __main__ is replaced only while processes start


class PoolError(RuntimeError):
    """Multi-GPU sampling failed in a worker, or a worker died; the message names the rank."""


def parse_devices(text: str) -> tuple[str, ...]:
    """``"0,1,2,3"`` / ``"0-3"`` / ``"cuda:0, cuda:1"`` / ``"cpu,cpu"`` -> device names, one per process."""
    devices: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if part.isdigit():
            devices.append(f"cuda:{int(part)}")
        elif "-" in part and all(s.strip().isdigit() for s in part.split("-", 1)):
            a, b = (int(s) for s in part.split("-", 1))
            if b < a:
                raise ValueError(f"device range {part!r} runs backwards; write it as {b}-{a}")
            devices += [f"cuda:{i}" for i in range(a, b + 1)]
        elif part == "cpu" or (part.startswith("cuda:") and part[5:].isdigit()):
            devices.append(part)
        else:
            raise ValueError(f"{part!r} in devices {text!r} is not a device: list GPU indices (0,1,2,3 or 0-3), "
                             "cuda:N names, or cpu (one per process, for testing on the CPU)")
    if not devices:
        raise ValueError("devices is empty: list the GPUs to use, e.g. 0,1")
    return tuple(devices)


@dataclass(frozen=True)
class PoolConfig:
    """The processes of a pool and how they share the work.

    devices: one device per process (``"cuda:N"``, or ``"cpu"`` any number of times), rank
    order. parallel: the :class:`~wan_core.distributed.ParallelConfig`; its world size must be
    ``len(devices)``. backend: None = NCCL on GPUs, gloo on the CPU. start_timeout_s: for the
    processes to start and join (imports, process group). collective_timeout_s: the process
    group's timeout (a rank waiting longer for its peers fails). stop_timeout_s: after an
    error or an interrupt, how long the other ranks may take to stop before the pool is torn
    down. threads: torch CPU threads per worker (None: the host's cores shared out evenly).
    """

    devices: tuple[str, ...]
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    backend: str | None = None
    start_timeout_s: float = 300.0
    collective_timeout_s: float = 600.0
    stop_timeout_s: float = 60.0
    threads: int | None = None

    def __post_init__(self) -> None:
        devices = tuple(str(d) for d in self.devices)
        object.__setattr__(self, "devices", devices)
        kinds = {d.split(":")[0] for d in devices}
        if not devices or not kinds <= {"cpu", "cuda"} or any(d.startswith("cuda") and ":" not in d for d in devices):
            raise ValueError(f"devices must be cuda:N or cpu names, one per process; got {devices}")
        if len(kinds) > 1:
            raise ValueError(f"devices {', '.join(devices)} mix GPUs and the CPU; use GPUs only (or cpu only, to test)")
        cuda = "cuda" in kinds
        if cuda and len(set(devices)) != len(devices):
            raise ValueError(f"devices {', '.join(devices)} name a GPU twice; each process needs its own GPU")
        if len(devices) != self.parallel.world_size:
            raise ValueError(f"{len(devices)} devices ({', '.join(devices)}) but {self.parallel.describe()} "
                             f"(ulysses x ring{' x 2 with cfg parallel' if self.parallel.cfg_parallel else ''}); "
                             f"list {self.parallel.world_size} devices or change ulysses / ring / cfg parallel")
        backend = self.backend or ("nccl" if cuda else "gloo")
        if backend not in ("nccl", "gloo") or (backend == "nccl" and not cuda):
            raise ValueError(f"backend {backend!r}: use nccl with GPUs or gloo (CPU or GPUs)")
        object.__setattr__(self, "backend", backend)
        for name in ("start_timeout_s", "collective_timeout_s", "stop_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds; got {getattr(self, name)!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or None to share the cores out evenly); got {self.threads}")

    def check_devices(self) -> None:
        """Refuse GPUs this machine does not have (asks CUDA; run before any process starts)."""
        wanted = [int(d.split(":")[1]) for d in self.devices if d.startswith("cuda")]
        if not wanted:
            return
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = [i for i in wanted if i >= count]
        if missing:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            seen = f"{count} CUDA device(s) (0..{count - 1})" if count else "no CUDA device"
            names = ", ".join(f"cuda:{i}" for i in missing)
            raise ValueError(f"{'GPUs' if len(missing) > 1 else 'GPU'} {names} "
                             f"{'do' if len(missing) > 1 else 'does'} not exist: this process sees {seen}"
                             f"{f' with CUDA_VISIBLE_DEVICES={visible}' if visible is not None else ''}; list existing "
                             "GPU indices in devices")


@dataclass(frozen=True)
class DiTSource:
    """How to load a DiT again in another process: the file (or diffusers folder) and the
    options :func:`wan_core.loaders.load_dit` took, plus the LoRAs merged at load.

    dtype: storage dtype (None = as in the file); weight_dtype: fp8 storage ("fp8_e4m3fn",
    "fp8_e5m2", "keep" or None); attention: the kernel; loras: merged (unmerged on GGUF
    weights, which cannot take a merge), in order.
    """

    path: str
    dtype: torch.dtype | None = None
    weight_dtype: str | None = None
    attention: str = "sdpa"
    loras: tuple[LoraSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        object.__setattr__(self, "loras", tuple(self.loras))

    def load(self, device: torch.device | str = "cpu"):
        """The DiT, resting on ``device``, with the LoRAs applied (the WanCore loader's policy)."""
        dit = load_dit(self.path, dtype=self.dtype, device=device, weight_dtype=self.weight_dtype,
                       attention=self.attention)
        if self.loras:
            # GGUF weights cannot take a merge (it would re-quantize them): unmerged, which is exact.
            # rollback=False: the model is dropped if this fails, so no originals are kept (14 GB for 14B fp8)
            apply_loras(dit, list(self.loras), mode="unmerged" if is_quantized(dit) else "merge", rollback=False)
        return dit

    def fingerprint(self) -> tuple:
        """(path, size, mtime_ns) of every file it reads: a changed file means a reload."""
        paths = [Path(self.path)] + [Path(spec.path) for spec in self.loras]
        stamps = []
        for p in paths:
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
            for f in files:
                try:
                    st = f.stat()
                except OSError:
                    stamps.append((str(f), None, None))   # the loader names the missing file
                    continue
                stamps.append((str(f), st.st_size, st.st_mtime_ns))
        return tuple(stamps)


@dataclass(frozen=True, eq=False)
class PoolJob:
    """One sampling run for the pool: the arguments of :func:`wan_core.pipeline.sample`
    (``shape``, ``image``, ``init_latents``, ``vace``, ``fun``, ``guidance``, ``context`` as there) with
    the DiT named by its ``source`` and the memory / LoRA / step-cache / compile ``options``
    each worker plans its own device with."""

    source: DiTSource
    text: TextEmbeds
    settings: SamplerSettings
    shape: tuple[int, ...] | None = None
    image: ImageEmbeds | None = None
    init_latents: Tensor | None = None
    vace: VaceEmbeds | None = None
    fun: FunControlEmbeds | None = None
    options: RunOptions = field(default_factory=RunOptions)
    guidance: GuidanceOptions | None = None
    context: ContextOptions | None = None


def check_job(config: PoolConfig, job: PoolJob) -> None:
    """Refuse, from the DiT file's header alone, a job the pool cannot run (before any process
    starts or weight is read): heads the Ulysses degree does not divide, Wan 2.2 models, VACE
    or step caches with sequence parallelism, Fun V1.1 reference tokens."""
    if not isinstance(job.source, DiTSource):
        raise TypeError(f"PoolJob.source must be a DiTSource (the DiT's file and load options); got "
                        f"{type(job.source).__name__}")
    det = inspect_checkpoint(job.source.path)
    name = Path(job.source.path).name
    if det.kind != "dit":
        raise ValueError(f"{name} is not a diffusion model ({det.kind}); multi-GPU sampling loads the DiT file")
    cfg = det.config
    if cfg.model_type in ("ti2v", "i2v_noclip"):
        raise ValueError(f"{name} is a Wan 2.2 model ({cfg.variant}); multi-GPU sampling runs Wan 2.1 models only "
                         "for now: disconnect WanCore Multi-GPU Options")
    par = config.parallel
    try:
        par.check(par.world_size, cfg.num_heads)
    except ValueError as err:
        raise ValueError(f"{name}: {err} (WanCore Multi-GPU Options: the ulysses and ring widgets)") from None
    if cfg.ref_in_dim and par.world_size > 1:   # as generate(parallel=...) refuses them
        raise ValueError(f"{name} is a Fun V1.1 Control model: its reference tokens cannot run across several "
                         "processes yet; use one GPU")
    if par.sequence_degree > 1:
        if job.options.step_cache is not None:
            raise ValueError("step caches (TeaCache/MagCache) decide per rank and cannot run with ulysses/ring > 1; "
                             "disconnect the step cache or use cfg parallel alone")
        if job.vace is not None or cfg.vace_layers:
            raise ValueError(f"{name} is a VACE model: VACE hints are full-sequence and do not run with ulysses/ring "
                             "> 1 yet; use cfg parallel alone or one GPU")


# --------------------------------------------------------------------------- the pool


@contextlib.contextmanager
def _stand_in_main() -> Iterator[Callable]:
    """``__main__`` replaced by a module run from pool_entry.py while processes start (see the
    module docstring); yields its ``worker_entry``, which pickles as ``__main__.worker_entry``."""
    stand_in = types.ModuleType("__main__")
    stand_in.__file__ = str(_ENTRY)
    exec(compile(_ENTRY.read_text(encoding="utf-8"), str(_ENTRY), "exec"), stand_in.__dict__)   # stdlib only
    with _MAIN_SWAP:
        real = sys.modules["__main__"]
        sys.modules["__main__"] = stand_in
        try:
            yield stand_in.worker_entry
        finally:
            sys.modules["__main__"] = real


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class WorkerPool:
    """``world`` worker processes, one per device of ``config``, started once and reused.

    ``sample(job, callback=, interrupt=)`` runs one :class:`PoolJob` on every rank and returns
    rank 0's latents ``[16, T', H/8, W/8]`` float32 on the CPU (normalised, as
    :func:`wan_core.pipeline.sample`). callback: gets rank 0's :class:`StepInfo` after each
    step. interrupt: the host's check, called while waiting; whatever it raises stops the
    ranks (before their next model evaluation) and is re-raised. One job at a time.
    """

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self._procs: list = []
        self._inboxes: list = []
        self._outbox = None
        self._cancel = None
        self._jobs = 0
        self._idle = True        # every rank has answered the last job
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return bool(self._procs)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self._procs)

    def start(self, interrupt: Callable[[], None] | None = None) -> None:
        """Start the processes and wait until every rank has joined (no-op when running).
        interrupt: the host's check, polled meanwhile; what it raises ends the start (and the pool)."""
        if self._procs:
            return
        cfg = self.config
        cfg.check_devices()
        ctx = mp.get_context("spawn")
        world = len(cfg.devices)
        self._outbox, self._cancel = ctx.Queue(), ctx.Event()
        self._inboxes = [ctx.Queue() for _ in range(world)]
        spec = {"devices": cfg.devices, "backend": cfg.backend, "port": _free_port(), "threads": cfg.threads,
                "collective_timeout_s": cfg.collective_timeout_s,
                "parallel": dataclasses.asdict(cfg.parallel)}
        root = str(Path(__file__).resolve().parents[1])
        atexit.register(self.close)
        try:
            with _stand_in_main() as entry:
                for rank in range(world):
                    p = ctx.Process(target=entry, args=(root, rank, spec, self._inboxes[rank], self._outbox,
                                                        self._cancel), name=f"wan_core worker {rank}", daemon=True)
                    p.start()
                    self._procs.append(p)
            ready: set[int] = set()
            deadline = time.monotonic() + cfg.start_timeout_s
            while len(ready) < world:
                msg = self._next("start")
                if interrupt is not None:
                    interrupt()
                if msg is None:
                    if time.monotonic() > deadline:
                        raise PoolError(f"the multi-GPU workers did not start within {cfg.start_timeout_s:g} s "
                                        f"({len(ready)} of {world} ready); see the console for their log")
                    continue
                if msg[0] == "fatal":
                    raise PoolError(f"multi-GPU worker rank {msg[2]} ({cfg.devices[msg[2]]}) could not start: "
                                    f"{msg[3]}: {msg[4]} (its log is in the console)")
                if msg[0] == "ready":
                    ready.add(msg[2])
        except BaseException:
            self._teardown()
            raise
        log.info("wan_core multi-GPU: %s on %s (pids %s)", cfg.parallel.describe(), ", ".join(cfg.devices),
                 ", ".join(str(p) for p in self.pids))

    def _next(self, what: str):
        """The next message, or None after POLL_S; PoolError (pool torn down) when a worker died."""
        try:
            return self._outbox.get(timeout=POLL_S)
        except queue.Empty:
            pass
        for rank, p in enumerate(self._procs):
            if p.exitcode is not None:
                device, pid, code = self.config.devices[rank], p.pid, p.exitcode
                self._teardown()
                raise PoolError(f"multi-GPU worker rank {rank} ({device}, pid {pid}) {_exit_text(code)} during the "
                                f"{what}; the pool was shut down and starts again on the next run (out of memory? "
                                "see the console)")
        return None

    def sample(self, job: PoolJob, callback: Callable[[StepInfo], None] | None = None,
               interrupt: Callable[[], None] | None = None) -> Tensor:
        with self._lock:
            check_job(self.config, job)
            wire, fingerprint = to_wire(job), job.source.fingerprint()
            if self._procs and any(p.exitcode is not None for p in self._procs):
                log.warning("wan_core multi-GPU: a worker had exited since the last run; restarting the pool")
                self._teardown()
            self.start(interrupt)
            self._jobs += 1
            self._cancel.clear()
            for inbox in self._inboxes:
                inbox.put(("job", self._jobs, wire, fingerprint))
            self._idle = False
            try:
                return self._collect(self._jobs, callback, interrupt)
            finally:
                if self._procs and not self._idle:
                    self._teardown()   # ranks still running or stuck after a failure: never leave them behind

    def _collect(self, job_id: int, callback, interrupt) -> Tensor:
        world = len(self._procs)
        finished: dict[int, tuple] = {}
        latents = None
        stopped: BaseException | None = None     # what the host's interrupt or our callback raised
        failed_callback = False
        deadline = float("inf")                  # set once the ranks are asked to stop
        while len(finished) < world:
            try:
                msg = self._next("run")
            except PoolError:
                if stopped is not None:
                    raise stopped from None
                raise
            if msg is not None and msg[1] == job_id:
                kind, rank = msg[0], msg[2]
                if kind == "step":
                    # steps finished while the ranks stop still reach the callback (the progress
                    # bar shows where they stopped), unless the callback itself raised
                    if callback is not None and not failed_callback:
                        try:
                            callback(StepInfo(*msg[3:]))
                        except BaseException as exc:  # noqa: BLE001 - stop the ranks, then re-raise it
                            failed_callback = True
                            if stopped is None:
                                stopped, deadline = exc, time.monotonic() + self.config.stop_timeout_s
                                self._cancel.set()
                    continue
                finished[rank] = msg
                if kind == "done" and rank == 0:
                    latents = msg[3]
                if kind == "error" and deadline == float("inf"):
                    deadline = time.monotonic() + self.config.stop_timeout_s
                    self._cancel.set()
            if interrupt is not None and stopped is None:
                try:
                    interrupt()
                except BaseException as exc:  # noqa: BLE001 - the host's own exception, re-raised below
                    stopped, deadline = exc, time.monotonic() + self.config.stop_timeout_s
                    self._cancel.set()
            if time.monotonic() > deadline:   # ranks waiting in a collective for a failed peer
                self._teardown()
                if stopped is not None:
                    raise stopped
                errors = [m for m in finished.values() if m[0] == "error"]
                raise PoolError(self._describe(errors, f"the other ranks did not stop within "
                                                       f"{self.config.stop_timeout_s:g} s, so the pool was shut "
                                                       "down; it starts again on the next run"))
        self._idle = True   # every rank answered: they wait for the next job
        errors = [m for m in finished.values() if m[0] == "error"]
        if errors:
            raise PoolError(self._describe(errors, "the pool stays up for the next run"))
        if stopped is not None:
            raise stopped
        if latents is None:
            raise PoolError("the multi-GPU workers stopped without a result (their host process check failed); "
                            "see the console")
        return latents

    def _describe(self, errors: list[tuple], then: str) -> str:
        # the cause first: a DistributedError is what the others see when a peer failed; ranks
        # failing the same way (the same numbers everywhere: NaN, a missing file) are named once
        same: dict[tuple[str, str], list[int]] = {}
        for m in sorted(errors, key=lambda m: (m[3] == "DistributedError", m[2])):
            same.setdefault((m[3], m[4]), []).append(m[2])
        parts = []
        for (kind, message), ranks in list(same.items())[:2]:
            where = ", ".join(f"{r} ({self.config.devices[r]})" for r in ranks)
            parts.append(f"rank{'s' if len(ranks) > 1 else ''} {where}: {kind}: {message.rstrip('.')}")
        more = f" (+{len(same) - 2} more errors)" if len(same) > 2 else ""
        return (f"multi-GPU sampling failed on {'; '.join(parts)}{more}. The worker's traceback is in the "
                f"console; {then}.")

    def _teardown(self) -> None:
        """Kill every worker at once (they may be stuck in a collective) and forget the pool."""
        for p in self._procs:
            if p.exitcode is None:
                p.kill()
        for p in self._procs:
            p.join(5)
        for q in (*self._inboxes, self._outbox):
            if q is not None:
                q.cancel_join_thread()
                q.close()
        self._procs, self._inboxes, self._outbox, self._cancel = [], [], None, None
        atexit.unregister(self.close)

    def close(self) -> None:
        """Ask the workers to exit, wait a little, kill what is left."""
        if not self._procs:
            return
        for inbox in self._inboxes:
            with contextlib.suppress(Exception):
                inbox.put(("stop",))
        deadline = time.monotonic() + 10.0
        for p in self._procs:
            p.join(max(0.1, deadline - time.monotonic()))
        self._teardown()


class WorkerPools:
    """At most one live :class:`WorkerPool` (the GPUs are shared): :meth:`get` with another
    configuration closes the current pool first. A host keeps one of these for its lifetime."""

    def __init__(self) -> None:
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()

    def get(self, config: PoolConfig) -> WorkerPool:
        with self._lock:
            if self._pool is not None and self._pool.config != config:
                log.info("wan_core multi-GPU: new configuration, closing the pool on %s",
                         ", ".join(self._pool.config.devices))
                self._pool.close()
                self._pool = None
            if self._pool is None:
                self._pool = WorkerPool(config)
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
