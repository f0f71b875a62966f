"""One process of a :class:`wan_core.worker_pool.WorkerPool`: joins the world, keeps the DiT, runs jobs.

Started by the pool (main module :mod:`wan_core.pool_entry`, engine imported as ``wan_core``).
Messages to the host are tuples ``(kind, job_id, rank, ...)``:
``("ready", 0, rank, pid)``, ``("fatal", 0, rank, type, message)`` (could not join),
``("step", job, 0, step, total, sigma, timestep, x, x0)`` (rank 0 only; the
:class:`~wan_core.pipeline.StepInfo` fields, tensors on the CPU), ``("done", job, rank,
latents or None)`` (latents from rank 0), ``("error", job, rank, type, message)``,
``("aborted", job, rank)`` (another rank failed before sampling), ``("interrupted", job, rank)``.
From the host: ``("job", job_id, wire, fingerprint)`` and ``("stop",)``.

Every rank takes every collective decision with the others (:meth:`_Worker._agree` after the
set-up, :meth:`_Worker._interrupt` before each model evaluation: the same number of calls on
every rank, on a gloo group of its own), so a failure or an interrupt never leaves a rank
waiting alone in a collective.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import queue
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from .conditioning import check_conditioning
from .context_windows import plan_shape
from .distributed import DistributedError, ParallelConfig, make_groups
from .pipeline import sample
from .run_plan import CompiledModels, prepare_run
from .pool_wire import from_wire

__all__ = ["serve"]

log = logging.getLogger("wan_core")


class _Stopped(Exception):
    """The ranks agreed to stop (the host asked, or the host process is gone)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:2000] or "(no message)"


def serve(rank: int, spec: dict, inbox, outbox, cancel) -> None:
    """Run jobs from ``inbox`` until ``("stop",)`` or the host process is gone; never returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C in the host's console is the host's to handle
    device = spec["devices"][rank]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[wan_core worker {rank} {device}] %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        worker = _Worker(rank, spec, outbox, cancel)
    except Exception as exc:  # noqa: BLE001 - reported to the host, traceback logged here
        log.error("could not join the multi-GPU pool", exc_info=True)
        outbox.put(("fatal", 0, rank, type(exc).__name__, _one_line(exc)))
        _exit(outbox, 1)
    outbox.put(("ready", 0, rank, os.getpid()))
    parent = multiprocessing.parent_process()
    while True:
        try:
            msg = inbox.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                break
            continue
        if msg[0] == "stop":
            break
        worker.run(*msg[1:])
        worker.release()
    _exit(outbox, 0)


def _exit(outbox, code: int) -> None:
    outbox.close()
    outbox.join_thread()   # the last messages reach the host
    os._exit(code)         # no destroy_process_group: a dead peer must not make the exit hang


class _Worker:
    def __init__(self, rank: int, spec: dict, outbox, cancel) -> None:
        self.rank, self.outbox, self.cancel = rank, outbox, cancel
        self.device = torch.device(spec["devices"][rank])
        self.world = len(spec["devices"])
        # the ranks share the host's cores (CPU ranks compute there; GPU ranks load, merge LoRAs, copy)
        torch.set_num_threads(spec["threads"] or max(1, (os.cpu_count() or 1) // self.world))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(spec["backend"], init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank,
                                world_size=self.world, timeout=timedelta(seconds=spec["collective_timeout_s"]))
        # control flags on the CPU even under NCCL: no GPU sync for a one-number decision
        self.control = dist.new_group(list(range(self.world)), backend="gloo")
        self.groups = make_groups(ParallelConfig(**spec["parallel"]))
        self.parent = multiprocessing.parent_process()
        self.dit = None
        self.key = None
        self.compiled = CompiledModels()

    def _send(self, *msg) -> None:
        self.outbox.put(msg)

    def _vote(self, value: int, op) -> int:
        flag = torch.tensor([value], dtype=torch.int32)
        try:
            dist.all_reduce(flag, op=op, group=self.control)
        except RuntimeError as exc:
            raise DistributedError(f"rank {self.rank}: the control all_reduce failed ({type(exc).__name__}); "
                                   "another rank has probably died") from exc
        return int(flag.item())

    def _agree(self, ok: bool) -> bool:
        """True when every rank is ready (all_reduce MIN of the ready flags)."""
        return self._vote(int(ok), dist.ReduceOp.MIN) == 1

    def _interrupt(self) -> None:
        """Before every model evaluation, on every rank: stop together when any rank sees the
        host's request (or its host process gone)."""
        gone = self.parent is not None and not self.parent.is_alive()
        if self._vote(int(self.cancel.is_set() or gone), dist.ReduceOp.MAX):
            raise _Stopped

    def _model(self, source, fingerprint):
        key = (source, fingerprint)
        if self.key != key:
            self.dit = self.key = None   # the old model goes before the new one is read
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.dit = source.load("cpu")
            self.key = key
        return self.dit

    def _progress(self, job_id: int):
        def callback(info) -> None:
            self._send("step", job_id, self.rank, info.step, info.total, info.sigma, info.timestep,
                       info.x.detach().to("cpu", copy=True), info.x0.detach().to("cpu", copy=True))
        return callback

    def run(self, job_id: int, wire, fingerprint) -> None:
        with contextlib.ExitStack() as stack:
            failure: Exception | None = None
            try:
                job = from_wire(wire)
                dit = self._model(job.source, fingerprint)
                self.groups.config.check(self.world, dit.cfg.num_heads)
                shape = job.shape
                if job.vace is not None or job.fun is not None:
                    shape = (job.vace or job.fun).latent_shape
                elif shape is None:
                    init = None if job.init_latents is None else tuple(job.init_latents.shape)
                    shape = check_conditioning(dit.cfg, job.image, shape=None, init_shape=init)
                # this rank's plan (wan_core.parallel_plan): its token chunk; whole, FSDP2-sharded or
                # block-swapped weights for the free memory of its own device
                plan = stack.enter_context(prepare_run(dit, plan_shape(shape, job.context), job.options,
                                                       self.device, "cpu", None, compiled=self.compiled,
                                                       parallel=self.groups))
                runner = self.groups.wrap_runner(stack.enter_context(plan.sampling()))
            except Exception as exc:  # noqa: BLE001 - reported after the ranks agree
                failure = exc
            try:
                ready = self._agree(failure is None)
            except DistributedError as exc:
                self._fail(job_id, exc)
                return
            if failure is not None:
                self._fail(job_id, failure)
                return
            if not ready:
                self._send("aborted", job_id, self.rank)
                return
            try:
                out = sample(dit, job.text, job.settings, shape=shape, image=job.image,
                             init_latents=job.init_latents, callback=self._progress(job_id) if self.rank == 0 else None,
                             interrupt=self._interrupt, runner=runner, guidance=job.guidance, context=job.context,
                             vace=job.vace, fun=job.fun, cfg_parallel=self.groups.cfg_parallel())
            except _Stopped:
                self._send("interrupted", job_id, self.rank)
                return
            except Exception as exc:  # noqa: BLE001 - reported to the host, traceback logged here
                self._fail(job_id, exc)
                return
        self._send("done", job_id, self.rank, out if self.rank == 0 else None)

    def release(self) -> None:
        """Between jobs the GPU holds nothing of ours: the host process (VAE decode on the same
        GPU, its own models) gets the memory back from PyTorch's cache."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail(self, job_id: int, exc: Exception) -> None:
        log.error("job %d failed: %s: %s", job_id, type(exc).__name__, _one_line(exc), exc_info=exc)
        self._send("error", job_id, self.rank, type(exc).__name__, _one_line(exc))
