"""Main module of a :class:`wan_core.worker_pool.WorkerPool` process (run by ``multiprocessing``).

The pool starts its processes with this file standing in for the host's ``__main__``, so a
worker runs none of the host's start-up code (ComfyUI's ``main.py`` parses arguments, runs
prestartup scripts and touches CUDA device 0 at import). Only the standard library is
imported at the top: the pool also executes this file in the host process to build the
stand-in, and the host must not get a second copy of the engine.

:func:`worker_entry` runs in the worker: it puts the folder holding the ``wan_core``
package first on ``sys.path`` and imports the engine by its own name (the host may have
imported it under another one, e.g. ComfyUI's ``<pack folder>.wan_core``), then serves jobs.
"""
from __future__ import annotations

import sys


def worker_entry(root: str, rank: int, spec: dict, inbox, outbox, cancel) -> None:
    """Process target: ``root`` is the folder that holds ``wan_core/``; the rest goes to
    :func:`wan_core.pool_worker.serve`."""
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)
    from wan_core.pool_worker import serve

    serve(rank, spec, inbox, outbox, cancel)
